"""BiSeNetV2 with fused C++/CUDA/Triton kernels, drop-in compatible with mmsegmentation.

    import bisenet_fast as bf
    model = bf.BiSeNetV2Segmentor(num_classes=19)
    bf.load_mmseg_checkpoint(model, "bisenetv2_fcn_4x4_1024x1024_160k_cityscapes.pth")
"""
import torch  # noqa: F401  (loads libc10/libtorch before the extension)

try:
    from bisenet_fast import _C  # noqa: F401  (registers the torch.ops.bisenet_fast operators)
except ImportError as err:  # unbuilt, or built against another torch: say what to do
    raise ImportError(
        f"bisenet_fast's compiled extension bisenet_fast._C could not be loaded ({err}); build it "
        "with the torch it runs with: `make setup`, or `pip install --no-build-isolation -e .` in the checkout"
    ) from err
from bisenet_fast import backends, ops
from bisenet_fast._build_info import build_info
from bisenet_fast.checkpoint import load_mmseg_checkpoint
from bisenet_fast.models import BiSeNetV2, BiSeNetV2Segmentor, FCNHead

__version__ = "0.1.0"

__all__ = [
    "BiSeNetV2",
    "BiSeNetV2Segmentor",
    "FCNHead",
    "backends",
    "build_info",
    "load_mmseg_checkpoint",
    "ops",
]
