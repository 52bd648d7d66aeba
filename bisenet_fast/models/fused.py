"""The inference form of BiSeNetV2: what `model.fuse()` returns.

Every BatchNorm is folded into the conv before it (weight * gamma / sqrt(var + eps), bias
beta - mean * gamma / sqrt(var + eps)), computed in float64 from the running statistics
and then cast to the requested dtype. The CEBlock's standalone BN after global pooling is
folded into conv_gap's input side (W' = W * s, b' = b + W @ t), so no BN remains. Each
Gather-and-Expansion layer runs conv1 through ATen/cuDNN and the rest as the fused GE op
(bisenet_fast.ops.ge_layer_stride1/2, which picks its backend through bisenet_fast.backends),
or with fuse(autotune=True) the fastest of that op's backends and cuDNN's folded convs,
timed per input size (FusedGELayer).
The BGA layer runs detail_dwconv's 1x1 conv and the aggregation after it as one op
(bisenet_fast.ops.bga_pointwise_aggregate).
On float32 CPU tensors, dense 3x3 stride-1 convs with 32+ channels run as Winograd
F(4x4, 3x3) (bisenet_fast.ops.conv3x3_winograd) and the final resize of the logits as
bisenet_fast.ops.resize_bilinear; both are CPU kernels (cuDNN and ATen run those steps on
a GPU) and step aside when a backend other than cpp is forced.
Activations are channels_last; ReLUs after convs run in place on the conv's fresh output.

The fused modules hold their folded weights as buffers (nothing to train) and refuse
`.train()`; the source model is not modified.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from bisenet_fast import backends as bf_backends
from bisenet_fast import ops
from bisenet_fast.models.autotune import LayerAutotuner
from bisenet_fast.models.bisenetv2 import (
    BGALayer,
    BiSeNetV2,
    CEBlock,
    DetailBranch,
    GELayer,
    SemanticBranch,
    StemBlock,
    resize_bilinear,
)
from bisenet_fast.models.conv_module import ConvModule
from bisenet_fast.models.fcn_head import FCNHead
from bisenet_fast.ops._checks import FLOAT_DTYPES, check_non_empty, check_tensor
from bisenet_fast.ops.ge_layer import GPU_PREFERENCE as GE_GPU_PREFERENCE

INFERENCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.no_grad()
def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 with bn(v) == v * s + t in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fuse(): BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


@torch.no_grad()
def fold_conv_module(module: ConvModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded (weight, bias) of conv -> bn in float64; the bias is always present."""
    weight = module.conv.weight.detach().double()
    bias = module.conv.bias.detach().double() if module.conv.bias is not None else weight.new_zeros(weight.shape[0])
    if module.bn is None:
        return weight, bias
    scale, shift = bn_scale_shift(module.bn)
    return weight * scale[:, None, None, None], bias * scale + shift


class InferenceModule(nn.Module):
    """Base of the fused modules: buffers only, eval mode only."""

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(
                f"{type(self).__name__} is the inference form returned by fuse() (BN folded, no backward); "
                "train the unfused model instead"
            )
        return super().train(False)


class FusedConv(InferenceModule):
    """conv with folded BN as its bias, then an optional in-place ReLU.

    Dense 3x3 stride-1 convs with at least WINOGRAD_MIN_CHANNELS input and output channels
    also keep their Winograd-domain weight and, on float32 CPU tensors, run as
    ops.conv3x3_winograd with F(4x4, 3x3) (4x fewer multiplies than oneDNN's direct conv;
    narrower convs lose more to the transforms than they gain) unless another backend than
    cpp is forced. Elsewhere they run F.conv2d (on CUDA that is cuDNN, which has its own
    Winograd)."""

    WINOGRAD_MIN_CHANNELS = 32
    WINOGRAD_TILE = 4

    def __init__(self, weight, bias, *, stride=1, padding=0, groups=1, relu=False):
        super().__init__()
        self.register_buffer("weight", weight.float().contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", bias.float())
        self.stride, self.padding, self.groups, self.relu = stride, padding, groups, relu
        cout, cin = weight.shape[:2]
        self.winograd = (
            tuple(weight.shape[2:]) == (3, 3) and _pair(stride) == (1, 1) and _pair(padding) == (1, 1)
            and groups == 1 and min(cin, cout) >= self.WINOGRAD_MIN_CHANNELS
        )
        if self.winograd:
            self.register_buffer("winograd_weight", ops.winograd_weight(weight.double(), self.WINOGRAD_TILE).float())

    @classmethod
    def from_conv_module(cls, module: ConvModule) -> "FusedConv":
        weight, bias = fold_conv_module(module)
        conv = module.conv
        return cls(weight, bias, stride=conv.stride, padding=conv.padding, groups=conv.groups,
                   relu=module.activate is not None)

    def forward(self, x):
        if self.winograd and x.dtype == torch.float32 and bf_backends.cpu_kernel_selected(x.device):
            return ops.conv3x3_winograd(x, self.winograd_weight, self.bias, relu=self.relu)
        return self.aten(x)

    def aten(self, x, weight=None):
        """The conv through ATen (cuDNN on a GPU); weight: this conv's weight in another
        memory format (ATen runs a conv channels_last if either operand is)."""
        x = F.conv2d(x, self.weight if weight is None else weight, self.bias, self.stride, self.padding, 1, self.groups)
        return F.relu_(x) if self.relu else x


def _fold_sequence(modules) -> nn.Sequential:
    return nn.Sequential(*(FusedConv.from_conv_module(m) for m in modules))


class FusedDetailBranch(InferenceModule):
    def __init__(self, branch: DetailBranch):
        super().__init__()
        self.stages = nn.Sequential(*(_fold_sequence(stage) for stage in branch.detail_branch))

    def forward(self, x):
        return self.stages(x)


class FusedStemBlock(InferenceModule):
    def __init__(self, stem: StemBlock):
        super().__init__()
        self.conv_first = FusedConv.from_conv_module(stem.conv_first)
        self.convs = _fold_sequence(stem.convs)
        self.pool = stem.pool
        self.fuse_last = FusedConv.from_conv_module(stem.fuse_last)

    def forward(self, x):
        x = self.conv_first(x)
        return self.fuse_last(torch.cat([self.convs(x), self.pool(x)], dim=1))


# The GE ops' weight arguments, in order (bisenet_fast.ops.ge_layer_stride1/2).
STRIDE1_WEIGHTS = ("dw_weight", "dw_bias", "pw_weight", "pw_bias")
STRIDE2_WEIGHTS = ("dw0_weight", "dw0_bias", "dw1_weight", "dw1_bias", "pw_weight", "pw_bias",
                   "sc_dw_weight", "sc_dw_bias", "sc_pw_weight", "sc_pw_bias")


def _repack_after_load(layer: "FusedGELayer", _incompatible_keys) -> None:
    layer._repack()


class FusedGELayer(InferenceModule):
    """conv1 (dense 3x3, ATen/cuDNN) then the fused GE op on (x, conv1(x)).

    With autotune=True, each input signature runs the fastest of (timed on its first call;
    bisenet_fast/models/autotune.py):
      fused-<backend>  the fused op on each fused backend the device has (cpp; cuda, triton)
      aten             the folded-BN convs after conv1 through ATen/cuDNN, channels_last
      aten-nchw        the same in NCHW, the output converted back to channels_last (cuDNN's
                       grouped convs are up to 8x faster in one layout than the other,
                       depending on the layer and dtype)
    A backend forced for the GE op (bisenet_fast.backends.use) bypasses the autotuner."""

    def __init__(self, layer: GELayer, autotune: bool = False):
        super().__init__()
        self.stride = layer.stride
        self.op_name = "ge_layer_stride1" if layer.stride == 1 else "ge_layer_stride2"
        self.conv1 = FusedConv.from_conv_module(layer.conv1)
        pw_weight, pw_bias = fold_conv_module(layer.conv2[0])
        tensors = {"pw_weight": pw_weight.flatten(1), "pw_bias": pw_bias}
        if layer.stride == 1:
            tensors["dw_weight"], tensors["dw_bias"] = fold_conv_module(layer.dwconv[0])
        else:
            tensors["dw0_weight"], tensors["dw0_bias"] = fold_conv_module(layer.dwconv[0])
            tensors["dw1_weight"], tensors["dw1_bias"] = fold_conv_module(layer.dwconv[1])
            separable = layer.shortcut[0]
            tensors["sc_dw_weight"], tensors["sc_dw_bias"] = fold_conv_module(separable.depthwise_conv)
            sc_pw_weight, tensors["sc_pw_bias"] = fold_conv_module(separable.pointwise_conv)
            tensors["sc_pw_weight"] = sc_pw_weight.flatten(1)
        self.weight_names = STRIDE1_WEIGHTS if layer.stride == 1 else STRIDE2_WEIGHTS
        for name, value in tensors.items():
            self.register_buffer(name, value.float().contiguous())
        # The Triton kernels' layout of the same weights, packed once here rather than on
        # every call; not in the state_dict (derived, and repacked when one is loaded), but
        # moved and cast with the module. Weights changed any other way (in place, or swapped
        # by torch.func.functional_call) leave them stale: call _repack() after.
        self.packed_names = []
        for i, value in enumerate(self._pack()):
            self.packed_names.append(f"triton_packed_{i}")
            self.register_buffer(self.packed_names[-1], value, persistent=False)
        self.register_load_state_dict_post_hook(_repack_after_load)  # a module-level function: picklable
        self.autotuner = LayerAutotuner(self.candidates, self.run) if autotune else None

    def _pack(self) -> tuple[torch.Tensor, ...]:
        pack = ops.pack_triton_stride1 if self.stride == 1 else ops.pack_triton_stride2
        return pack(*self.weights())

    @torch.no_grad()
    def _repack(self) -> None:
        for name, value in zip(self.packed_names, self._pack()):
            getattr(self, name).copy_(value)

    # Both read the buffers from _buffers: nn.Module.__getattr__ reaches them only after
    # failing a normal attribute lookup, ~1 us each, 14 per call of a stride-2 layer.
    def weights(self) -> list[torch.Tensor]:
        """The op's weight arguments, in order."""
        return [self._buffers[name] for name in self.weight_names]

    def triton_weights(self) -> tuple[torch.Tensor, ...]:
        """The same weights packed for the Triton kernels (the op's triton_weights)."""
        return tuple(self._buffers[name] for name in self.packed_names)

    def forward(self, x):
        if self.autotuner is None or bf_backends.current(self.op_name) != "auto":
            return self._fused(x)
        return self.autotuner(x)

    def _fused(self, x, backend=None):
        op = ops.ge_layer_stride1 if self.stride == 1 else ops.ge_layer_stride2
        return op(x, self.conv1(x), *self.weights(), triton_weights=self.triton_weights(), backend=backend)

    def _aten(self, x, y):
        reference = ops.ge_layer_stride1_reference if self.stride == 1 else ops.ge_layer_stride2_reference
        return reference(x, y, *self.weights())

    def candidates(self, device: torch.device) -> list[str]:
        """The autotuner's candidates on `device`, the default (the fused op's own choice) first."""
        fused = [f"fused-{backend}" for backend in bf_backends.fused_backends(device, GE_GPU_PREFERENCE)]
        return [*fused, "aten", "aten-nchw"]

    def run(self, candidate: str, x: torch.Tensor) -> torch.Tensor:
        """The layer's output through one of candidates(x.device)."""
        if candidate == "aten":
            return self._aten(x, self.conv1(x))
        if candidate == "aten-nchw":
            x = x.contiguous()
            y = self.conv1.aten(x, weight=self.conv1.weight.contiguous())
            return self._aten(x, y).contiguous(memory_format=torch.channels_last)
        if not candidate.startswith("fused-"):
            raise ValueError(f"FusedGELayer: unknown candidate {candidate!r}; expected one of {self.candidates(x.device)}")
        return self._fused(x, backend=candidate.removeprefix("fused-"))


class FusedCEBlock(InferenceModule):
    """relu(W' mean(x) + b') broadcast-added to x, then conv_last; gap's BN is inside W', b'."""

    def __init__(self, block: CEBlock):
        super().__init__()
        scale, shift = bn_scale_shift(block.gap[1])
        weight, bias = fold_conv_module(block.conv_gap)
        weight = weight.flatten(1)
        self.register_buffer("gap_weight", (weight * scale[None, :]).float())
        self.register_buffer("gap_bias", (bias + weight @ shift).float())
        self.conv_last = FusedConv.from_conv_module(block.conv_last)

    def forward(self, x):
        context = F.relu(F.linear(x.mean(dim=(2, 3)), self.gap_weight, self.gap_bias))
        return self.conv_last(x + context[:, :, None, None])


class FusedSemanticBranch(InferenceModule):
    def __init__(self, branch: SemanticBranch, autotune: bool = False):
        super().__init__()
        self.stage_names = list(branch.stage_names)
        for name in self.stage_names:
            module = getattr(branch, name)
            if isinstance(module, StemBlock):
                fused = FusedStemBlock(module)
            elif isinstance(module, CEBlock):
                fused = FusedCEBlock(module)
            else:
                fused = nn.Sequential(*(FusedGELayer(layer, autotune) for layer in module))
            self.add_module(name, fused)

    def forward(self, x):
        outs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs


class FusedBGALayer(InferenceModule):
    """detail_dwconv's 1x1 conv runs inside bga_pointwise_aggregate (a GEMM whose epilogue
    applies the gate and the sum), so its 128-channel 1/8-resolution output is never written
    to memory; the depthwise conv before it stays with ATen/cuDNN."""

    def __init__(self, bga: BGALayer):
        super().__init__()
        self.detail_dwconv = _fold_sequence(
            (bga.detail_dwconv[0].depthwise_conv, bga.detail_dwconv[0].pointwise_conv)
        )
        if self.detail_dwconv[1].relu:
            raise ValueError("fuse(): BGALayer.detail_dwconv's pointwise conv must have no activation (mmseg's has none)")
        self.detail_down = nn.Sequential(FusedConv.from_conv_module(bga.detail_down[0]), bga.detail_down[1])
        self.semantic_conv = _fold_sequence(bga.semantic_conv)
        self.semantic_dwconv = _fold_sequence(
            (bga.semantic_dwconv[0].depthwise_conv, bga.semantic_dwconv[0].pointwise_conv)
        )
        self.conv = FusedConv.from_conv_module(bga.conv)

    def forward(self, x_d, x_s):
        depthwise, pointwise = self.detail_dwconv
        fused = ops.bga_pointwise_aggregate(
            depthwise(x_d), pointwise.weight.flatten(1), pointwise.bias,
            self.semantic_conv(x_s), self.detail_down(x_d), self.semantic_dwconv(x_s),
        )
        return self.conv(fused)


def _autocast_off(x: torch.Tensor):
    """The fused model computes in the dtype it was fused to, with weights of that dtype: under
    an enclosing autocast, ATen's convs would cast their outputs to the autocast dtype while
    the fused ops' weights stay in the model's, so autocast is switched off inside."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _check_input(x) -> None:
    """The model's input, named as the caller passed it: a 4-D floating tensor (any floating
    dtype is cast to the model's; an integer image, raw 0-255 pixels not normalised, would give
    meaningless logits, and the eager model refuses it too) with at least one image (an empty
    batch would otherwise fail inside an inner op, naming an intermediate shape)."""
    check_tensor("x", x, dim=4, dtypes=FLOAT_DTYPES)
    check_non_empty("x", x)


def _prepare_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (checked by _check_input) in the model's dtype, channels_last."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            "the fused model is inference-only (BN folded, no backward): call it under torch.no_grad() or "
            "torch.inference_mode() with an input that does not require grad"
        )
    if dtype not in INFERENCE_DTYPES:
        raise TypeError(
            f"the fused model holds {dtype} weights (cast by .to()/.double()?); it runs in one of "
            f"{INFERENCE_DTYPES}: cast it to one of those, or fuse(dtype=...) the unfused model again"
        )
    return x.to(dtype=dtype, memory_format=torch.channels_last)


def _buffer_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a fused model computes in: its buffers', set by fuse(dtype=...) and followed
    by a later .half()/.to(dtype) (from a float32 fusion the same buffers as fusing to that
    dtype, both casting the float32 fold; from float16 or bfloat16 the earlier rounding stays)."""
    return next(module.buffers()).dtype


def _check_dtype(dtype) -> torch.dtype:
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"fuse(dtype=...) must be one of {INFERENCE_DTYPES}, got {dtype}")
    return dtype


def _check_autotune(autotune) -> None:
    if not isinstance(autotune, bool):
        raise TypeError(f"fuse(autotune=...) must be True or False, got {autotune!r}")


class FusedBiSeNetV2(InferenceModule):
    """Inference form of BiSeNetV2: same outputs (out_indices) in `dtype`, channels_last.

    The input is converted to the model's dtype and to channels_last; an enclosing autocast
    has no effect (fuse(dtype=torch.float16) gives a float16 model). autotune: see
    FusedGELayer."""

    def __init__(self, backbone: BiSeNetV2, dtype: torch.dtype | None = None, autotune: bool = False):
        super().__init__()
        dtype = _check_dtype(dtype)
        _check_autotune(autotune)
        self.out_indices = tuple(backbone.out_indices)
        self.detail = FusedDetailBranch(backbone.detail)
        self.semantic = FusedSemanticBranch(backbone.semantic, autotune)
        self.bga = FusedBGALayer(backbone.bga)
        device = next(backbone.parameters()).device
        self.to(device=device, dtype=dtype)
        super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return _buffer_dtype(self)

    def forward(self, x):
        _check_input(x)  # before _autocast_off reads x.device
        with _autocast_off(x):
            x = _prepare_input(x, self.dtype)
            x_detail = self.detail(x)
            semantic_outs = self.semantic(x)
            outs = [self.bga(x_detail, semantic_outs[-1])] + semantic_outs[:-1]
            return tuple(outs[i] for i in self.out_indices)


class FusedFCNHead(InferenceModule):
    def __init__(self, head: FCNHead):
        super().__init__()
        self.in_index = head.in_index
        self.convs = _fold_sequence(head.convs)
        seg = head.conv_seg
        self.conv_seg = FusedConv(seg.weight.detach().double(), seg.bias.detach().double())

    def forward(self, inputs):
        return self.conv_seg(self.convs(inputs[self.in_index]))


class FusedBiSeNetV2Segmentor(InferenceModule):
    """Inference form of BiSeNetV2Segmentor: forward(x) -> logits (N, classes, H, W) in `dtype`,
    from the decode head only (the auxiliary heads only matter for training); an enclosing
    autocast has no effect, as for FusedBiSeNetV2."""

    def __init__(self, segmentor, dtype: torch.dtype | None = None, autotune: bool = False):
        super().__init__()
        dtype = _check_dtype(dtype)
        self.num_classes = segmentor.num_classes
        self.backbone = FusedBiSeNetV2(segmentor.backbone, dtype, autotune)
        self.decode_head = FusedFCNHead(segmentor.decode_head)
        self.to(device=next(segmentor.parameters()).device, dtype=dtype)
        super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return _buffer_dtype(self)

    def forward(self, x):
        _check_input(x)
        size = x.shape[-2:]
        with _autocast_off(x):
            logits = self.decode_head(self.backbone(x))
            if bf_backends.cpu_kernel_selected(logits.device):
                return ops.resize_bilinear(logits, size)
            return resize_bilinear(logits, size)


def capture_cuda_graph(model: nn.Module, example: torch.Tensor, warmup: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """Record model(example) as a CUDA graph; returns run(x) that replays it.

    For fixed input sizes on a GPU: run(x) copies x (same shape, dtype and device as
    `example`) into the graph's static input and replays every kernel in one launch. The
    returned tensor is the graph's static output, overwritten by the next call: clone it
    to keep it. Kernels are compiled/autotuned during the `warmup` eager calls first. The
    graph holds the addresses of the model's buffers: weights loaded in place
    (load_state_dict) are seen by later replays, but a model cast or moved after capture
    (.half(), .to()) leaves the graph reading freed memory; capture again after either.

        fused = model.fuse(dtype=torch.float16).cuda()
        run = capture_cuda_graph(fused, torch.empty(1, 3, 1024, 2048, device="cuda"))
        logits = run(image)
    """
    if example.device.type != "cuda":
        raise ValueError(f"capture_cuda_graph needs a CUDA example input, got one on {example.device}")
    static_input = example.detach().clone()
    side = torch.cuda.Stream(example.device)
    side.wait_stream(torch.cuda.current_stream(example.device))
    with torch.inference_mode(), torch.cuda.stream(side):
        for _ in range(warmup):
            model(static_input)
    torch.cuda.current_stream(example.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        static_output = model(static_input)

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape != static_input.shape or x.dtype != static_input.dtype or x.device != static_input.device:
            raise ValueError(
                f"this CUDA graph was captured for input {tuple(static_input.shape)} {static_input.dtype} on "
                f"{static_input.device}, got {tuple(x.shape)} {x.dtype} on {x.device}"
            )
        static_input.copy_(x)
        graph.replay()
        return static_output

    return run
