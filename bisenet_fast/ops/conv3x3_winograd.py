"""Dense 3x3 convolution (stride 1, padding 1) + bias (+ ReLU) by Winograd's F(2x2, 3x3),
inference only, for the CPU.

On the CPU the fused model spends most of its time in oneDNN's direct 3x3 convs, which
already run near the cores' peak FLOP rate; F(2x2, 3x3) needs 2.25x fewer multiplies
(16 per 2x2 output tile and channel pair instead of 36). The weight is transformed once,
by `winograd_weight`, into the (16, cin, cout) Winograd domain; `conv3x3_winograd` then
transforms 4x4 input tiles (B^T d B), runs 16 GEMMs against it and transforms back
(A^T M A), adding the bias and applying the ReLU on the way out.

Backends: cpp (the C++ kernel, float32/float64 CPU tensors) and eager (the same algorithm in
plain PyTorch, below). There is no GPU kernel: on CUDA, cuDNN already picks Winograd or
implicit-GEMM algorithms for these convs, and the fused model calls F.conv2d there (see
bisenet_fast/models/fused.py). Float16/bfloat16 are not offered either: the transforms'
cancellations need float32 accumulation at every step, which the GEMMs' half-precision
outputs would not keep.

Rounding differs from a direct conv's (sums in another order, through the transforms): in
float32 the output differs from F.conv2d's by ~1e-6 of its scale; float64 agrees to ~1e-15.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bisenet_fast import backends
from bisenet_fast.ops._checks import check_tensor

DTYPES = (torch.float32, torch.float64)

# F(2x2, 3x3) matrices (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks").
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_BT = ((1.0, 0.0, -1.0, 0.0), (0.0, 1.0, 1.0, 0.0), (0.0, -1.0, 1.0, 0.0), (0.0, 1.0, 0.0, -1.0))
_AT = ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0))


def _matrix(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


@torch.no_grad()
def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(cout, cin, 3, 3) conv weight -> (16, cin, cout) Winograd-domain weight G w G^T,
    computed in float64 and returned in weight's dtype; point k = 4 * row + column."""
    check_tensor("weight", weight, dim=4, dtypes=DTYPES)
    if tuple(weight.shape[2:]) != (3, 3) or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have shape (cout, cin, 3, 3) with cout, cin > 0, got {tuple(weight.shape)}")
    w64 = weight.double()
    g = _matrix(_G, w64)
    packed = torch.einsum("ai,ocij,bj->abco", g, w64, g)  # (4, 4, cin, cout)
    return packed.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def conv3x3_winograd_reference(x, packed_weight, bias, relu=False):
    """Eager oracle of the algorithm: unfold 4x4 tiles with stride 2, transform, 16 matmuls,
    transform back, crop. Tests also compare it with F.conv2d on the untransformed weight."""
    n, cin, height, width = x.shape
    tiles_h, tiles_w = (height + 1) // 2, (width + 1) // 2
    padded = F.pad(x, (1, 2 * tiles_w + 1 - width, 1, 2 * tiles_h + 1 - height))
    tiles = padded.unfold(2, 4, 2).unfold(3, 4, 2)  # (n, cin, tiles_h, tiles_w, 4, 4)
    bt, at = _matrix(_BT, x), _matrix(_AT, x)
    v = torch.einsum("ai,nchwij,bj->abnhwc", bt, tiles, bt).reshape(16, -1, cin)
    m = torch.bmm(v, packed_weight).reshape(4, 4, n, tiles_h, tiles_w, -1)
    y = torch.einsum("ai,ijnhwo,bj->nohawb", at, m, at).reshape(n, -1, 2 * tiles_h, 2 * tiles_w)
    y = y[:, :, :height, :width] + bias[None, :, None, None]
    y = F.relu(y) if relu else y
    return y.contiguous(memory_format=torch.channels_last)


def check_inputs(x, packed_weight, bias):
    check_tensor("x", x, dim=4, dtypes=DTYPES)
    check_tensor("packed_weight", packed_weight, dim=3, dtypes=(x.dtype,), device=x.device)
    check_tensor("bias", bias, dim=1, dtypes=(x.dtype,), device=x.device)
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    cin = x.shape[1]
    if packed_weight.shape[0] != 16 or packed_weight.shape[1] != cin or packed_weight.shape[2] == 0:
        raise ValueError(
            f"packed_weight must have shape (16, {cin}, cout) (winograd_weight of a (cout, {cin}, 3, 3) weight), "
            f"got {tuple(packed_weight.shape)}"
        )
    if bias.shape[0] != packed_weight.shape[2]:
        raise ValueError(f"bias must have shape ({packed_weight.shape[2]},), got {tuple(bias.shape)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, packed_weight, bias)):
        raise RuntimeError(
            "conv3x3_winograd is an inference-only op (no backward); run it under torch.no_grad() or "
            "torch.inference_mode(), or use F.conv2d for training"
        )


@torch.library.register_fake("bisenet_fast::conv3x3_winograd")
def _conv3x3_winograd_fake(x, packed_weight, bias, relu):
    n, _, height, width = x.shape
    return torch.empty((n, packed_weight.shape[2], height, width), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def conv3x3_winograd(x, packed_weight, bias, *, relu=False):
    """conv2d(x, w, bias, stride=1, padding=1) (then ReLU) with packed_weight = winograd_weight(w).
    Output channels_last."""
    check_inputs(x, packed_weight, bias)
    backend = backends.resolve("conv3x3_winograd", x.device, gpu_preference=())
    if backend == "eager":
        return conv3x3_winograd_reference(x, packed_weight, bias, relu)
    return torch.ops.bisenet_fast.conv3x3_winograd(x, packed_weight, bias, relu)
