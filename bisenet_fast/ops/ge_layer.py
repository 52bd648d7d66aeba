"""Gather-and-Expansion layer (spec §2.2), inference form: every BN already folded into its
conv (weight and bias), so the layer is a chain of biased convs. The dense 3x3 `conv1`
(x -> y) stays with cuDNN/ATen; these ops fuse everything after it, keeping the 6x
expanded tensor on chip (in shared memory in the CUDA kernels; the Triton stride-2 kernel
writes dw0's half-resolution output once: see triton_kernels/ge_layer.py for why):

stride 1 (cin == cout):
    out = relu(x + pw(relu(dw(y))))                dw: 3x3 grouped (groups=cin), cin -> mid
stride 2:
    out = relu(pw(relu(dw1(dw0(y)))) + sc_pw(sc_dw(x)))
          dw0: 3x3 grouped stride 2, cin -> mid (no ReLU); dw1: 3x3 depthwise stride 1 on
          mid (ReLU); sc_dw: 3x3 depthwise stride 2 on x; pw/sc_pw: 1x1 projections.

Every conv carries its folded bias; pw weights are 2-D (cout, cin_of_that_conv). mid is
any multiple of cin (6 * cin in BiSeNetV2; output channel m of dw reads input channel
m // (mid // cin), as in PyTorch's grouped conv). Outputs are channels_last.

Inference only: no backward is defined, and calling with tensors that require grad while
grad mode is on raises.

The Triton kernels take their weights packed (pack_triton_stride1/2: expanded channels
reordered so a chunk of them reads contiguous input channels, projections transposed). The
ops pack on every call unless given `triton_weights`, the packed weights computed once
(FusedGELayer keeps them beside its weights); packing costs a few small kernels per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bisenet_fast import _C  # noqa: F401  (defines the schemas read below)
from bisenet_fast import backends
from bisenet_fast.ops._checks import (
    FLOAT_DTYPES,
    check_inference_only,
    fake_inference_only,
    fake_on_one_device,
    check_non_empty,
    check_shape,
    check_tensor,
    plain_tensors_match,
)
from bisenet_fast.ops._triton_device import on_tensors_device

# Triton first: it has been run and timed on GPUs; the CUDA kernels (csrc/cuda/ge_layer.cu)
# have been tested only as CPU-emulated block code (tests/cuda_emulation) so far.
GPU_PREFERENCE = ("triton", "cuda")
# The ops' argument names, read from their schemas in csrc/ops.cpp (error messages name these).
STRIDE1_ARGUMENTS = tuple(a.name for a in torch.ops.bisenet_fast.ge_layer_stride1.default._schema.arguments)
STRIDE2_ARGUMENTS = tuple(a.name for a in torch.ops.bisenet_fast.ge_layer_stride2.default._schema.arguments)


def ge_layer_stride1_reference(x, y, dw_weight, dw_bias, pw_weight, pw_bias):
    """Eager oracle: the folded-BN ops in plain PyTorch."""
    mid = F.relu(F.conv2d(y, dw_weight, dw_bias, stride=1, padding=1, groups=y.shape[1]))
    return F.relu(F.conv2d(mid, pw_weight[:, :, None, None], pw_bias) + x)


def ge_layer_stride2_reference(
    x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias
):
    """Eager oracle: the folded-BN ops in plain PyTorch."""
    mid = F.conv2d(y, dw0_weight, dw0_bias, stride=2, padding=1, groups=y.shape[1])
    mid = F.relu(F.conv2d(mid, dw1_weight, dw1_bias, stride=1, padding=1, groups=mid.shape[1]))
    main = F.conv2d(mid, pw_weight[:, :, None, None], pw_bias)
    short = F.conv2d(x, sc_dw_weight, sc_dw_bias, stride=2, padding=1, groups=x.shape[1])
    short = F.conv2d(short, sc_pw_weight[:, :, None, None], sc_pw_bias)
    return F.relu(main + short)


def _check_weight(name, value, shape, like):
    check_shape(name, value, shape, dtype=like.dtype, device=like.device)


def _activations_valid(x, y) -> bool:
    """Whether _check_activations passes (its fast path; see plain_tensors_match)."""
    return (type(x) is torch.Tensor and x.dim() == 4 and x.dtype in FLOAT_DTYPES and x.numel() > 0
            and plain_tensors_match(x, ((y, x.shape),)))


def _check_activations(x, y):
    if _activations_valid(x, y):
        return
    check_tensor("x", x, dim=4, dtypes=FLOAT_DTYPES)
    check_tensor("y", y, dim=4, dtypes=(x.dtype,), device=x.device)
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"y (conv1's output) must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    check_non_empty("x", x)


def _check_mid(name, dw_weight, cin, like):
    check_tensor(name, dw_weight, dim=4, dtypes=(like.dtype,), device=like.device)
    mid = dw_weight.shape[0]
    if tuple(dw_weight.shape[1:]) != (1, 3, 3) or mid % cin != 0 or mid == 0:
        raise ValueError(
            f"{name} must have shape (k * {cin}, 1, 3, 3) for a 3x3 grouped conv with groups={cin}, "
            f"got {tuple(dw_weight.shape)}"
        )
    return mid


def _leading_size(value, dim: int) -> int:
    """value.shape[0] of a plain `dim`-D tensor, else 0 (which fails the fast checks)."""
    return value.shape[0] if type(value) is torch.Tensor and value.dim() == dim else 0


def _stride1_valid(x, y, dw_weight, dw_bias, pw_weight, pw_bias) -> bool:
    """Whether check_stride1_inputs' shape, dtype and device checks pass (their fast path)."""
    if not _activations_valid(x, y):
        return False
    cin, mid = x.shape[1], _leading_size(dw_weight, 4)
    return mid > 0 and mid % cin == 0 and plain_tensors_match(
        x, ((dw_weight, (mid, 1, 3, 3)), (dw_bias, (mid,)), (pw_weight, (cin, mid)), (pw_bias, (cin,)))
    )


def check_stride1_inputs(x, y, dw_weight, dw_bias, pw_weight, pw_bias):
    if not _stride1_valid(x, y, dw_weight, dw_bias, pw_weight, pw_bias):  # find what is wrong
        _check_activations(x, y)
        cin = x.shape[1]
        mid = _check_mid("dw_weight", dw_weight, cin, x)
        _check_weight("dw_bias", dw_bias, (mid,), x)
        _check_weight("pw_weight", pw_weight, (cin, mid), x)  # residual: cout == cin
        _check_weight("pw_bias", pw_bias, (cin,), x)
    check_inference_only("ge_layer_stride1", dict(zip(STRIDE1_ARGUMENTS, (x, y, dw_weight, dw_bias, pw_weight, pw_bias))),
                         "train the unfused model")


def _stride2_valid(x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight, sc_dw_bias,
                   sc_pw_weight, sc_pw_bias) -> bool:
    """Whether check_stride2_inputs' shape, dtype and device checks pass (their fast path)."""
    if not _activations_valid(x, y):
        return False
    cin, mid, cout = x.shape[1], _leading_size(dw0_weight, 4), _leading_size(pw_weight, 2)
    return mid > 0 and mid % cin == 0 and cout > 0 and plain_tensors_match(x, (
        (dw0_weight, (mid, 1, 3, 3)), (dw0_bias, (mid,)), (dw1_weight, (mid, 1, 3, 3)), (dw1_bias, (mid,)),
        (pw_weight, (cout, mid)), (pw_bias, (cout,)), (sc_dw_weight, (cin, 1, 3, 3)), (sc_dw_bias, (cin,)),
        (sc_pw_weight, (cout, cin)), (sc_pw_bias, (cout,)),
    ))


def check_stride2_inputs(x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias):
    if not _stride2_valid(x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight,
                          sc_dw_bias, sc_pw_weight, sc_pw_bias):  # find what is wrong
        _check_activations(x, y)
        _check_stride2_weights_for(x.shape[1], x, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias,
                                   sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias)
    check_inference_only(
        "ge_layer_stride2",
        dict(zip(STRIDE2_ARGUMENTS, (x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight,
                                     sc_dw_bias, sc_pw_weight, sc_pw_bias))),
        "train the unfused model",
    )


def _pack_conv3x3(weight, bias, ratio):
    """(mid, 1, 3, 3) grouped-conv weight and (mid,) bias, expanded channel m = c * ratio + r,
    -> [9, mid] and [mid] with channel m at position r * (mid // ratio) + c."""
    mid = weight.shape[0]
    cin = mid // ratio
    return (weight.reshape(cin, ratio, 9).permute(2, 1, 0).reshape(9, mid).contiguous(),
            bias.reshape(cin, ratio).t().reshape(mid).contiguous())


def _pack_projection(weight, ratio):
    """(cout, mid) 1x1-conv weight -> [mid, cout] with its rows in _pack_conv3x3's order."""
    cout, mid = weight.shape
    return weight.reshape(cout, mid // ratio, ratio).permute(2, 1, 0).reshape(mid, cout).contiguous()


def _check_stride1_weights(dw_weight, dw_bias, pw_weight, pw_bias):
    """The stride-1 weights agree in shape, dtype and device (a residual layer: cin == cout,
    read from pw_weight)."""
    check_tensor("pw_weight", pw_weight, dim=2, dtypes=FLOAT_DTYPES)
    cin = pw_weight.shape[0]
    if cin == 0:
        raise ValueError(f"pw_weight must have shape (cin, mid) with cin > 0, got {tuple(pw_weight.shape)}")
    mid = _check_mid("dw_weight", dw_weight, cin, pw_weight)
    _check_weight("dw_bias", dw_bias, (mid,), pw_weight)
    _check_weight("pw_weight", pw_weight, (cin, mid), pw_weight)
    _check_weight("pw_bias", pw_bias, (cin,), pw_weight)


def _check_stride2_weights(dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias,
                           sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias):
    """The stride-2 weights agree in shape, dtype and device (cin read from sc_dw_weight)."""
    check_tensor("sc_dw_weight", sc_dw_weight, dim=4, dtypes=FLOAT_DTYPES)
    cin = sc_dw_weight.shape[0]
    if cin == 0:
        raise ValueError(f"sc_dw_weight must have shape (cin, 1, 3, 3) with cin > 0, got {tuple(sc_dw_weight.shape)}")
    _check_stride2_weights_for(cin, sc_dw_weight, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias,
                               sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias)


def _check_stride2_weights_for(cin, like, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias,
                               sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias):
    """The stride-2 weights of a layer of cin input channels, each of like's dtype and device."""
    mid = _check_mid("dw0_weight", dw0_weight, cin, like)
    _check_weight("dw0_bias", dw0_bias, (mid,), like)
    _check_weight("dw1_weight", dw1_weight, (mid, 1, 3, 3), like)
    _check_weight("dw1_bias", dw1_bias, (mid,), like)
    check_tensor("pw_weight", pw_weight, dim=2, dtypes=(like.dtype,), device=like.device)
    cout = pw_weight.shape[0]
    if pw_weight.shape[1] != mid or cout == 0:
        raise ValueError(f"pw_weight must have shape (cout, {mid}), got {tuple(pw_weight.shape)}")
    _check_weight("pw_bias", pw_bias, (cout,), like)
    _check_weight("sc_dw_weight", sc_dw_weight, (cin, 1, 3, 3), like)
    _check_weight("sc_dw_bias", sc_dw_bias, (cin,), like)
    _check_weight("sc_pw_weight", sc_pw_weight, (cout, cin), like)
    _check_weight("sc_pw_bias", sc_pw_bias, (cout,), like)


def pack_triton_stride1(dw_weight, dw_bias, pw_weight, pw_bias):
    """The stride-1 weights in the Triton kernel's layout (see the module docstring)."""
    _check_stride1_weights(dw_weight, dw_bias, pw_weight, pw_bias)
    ratio = dw_weight.shape[0] // pw_weight.shape[0]
    return (*_pack_conv3x3(dw_weight, dw_bias, ratio), _pack_projection(pw_weight, ratio), pw_bias.contiguous())


def pack_triton_stride2(dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias,
                        sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias):
    """The stride-2 weights in the Triton kernels' layout: dw0's output is stored in the
    packed channel order, so dw1 and pw follow that order too."""
    _check_stride2_weights(dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias,
                           sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias)
    ratio = dw0_weight.shape[0] // sc_dw_weight.shape[0]
    return (
        *_pack_conv3x3(dw0_weight, dw0_bias, ratio),
        *_pack_conv3x3(dw1_weight, dw1_bias, ratio),
        _pack_projection(pw_weight, ratio),
        pw_bias.contiguous(),
        *_pack_conv3x3(sc_dw_weight, sc_dw_bias, 1),
        _pack_projection(sc_pw_weight, 1),
        sc_pw_bias.contiguous(),
    )


def _check_triton_weights(op, packed, shapes, like, names=None):
    """Packed weights must have the shapes pack_triton_* gives this call's weights; named
    triton_weights[i] (the fronts' argument) unless `names` gives the raw op's."""
    if (isinstance(packed, (tuple, list)) and len(packed) == len(shapes) and plain_tensors_match(like, zip(packed, shapes))
            and all(t.is_contiguous() for t in packed)):
        return  # the checks below find what is wrong
    if not isinstance(packed, (tuple, list)) or len(packed) != len(shapes):
        raise TypeError(
            f"{op}: triton_weights must be the {len(shapes)} tensors pack_triton_* returns, got {packed!r:.80}"
        )
    for i, (t, shape) in enumerate(zip(packed, shapes)):
        name = f"triton_weights[{i}]" if names is None else names[i]
        _check_weight(name, t, shape, like)
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, as pack_triton_* returns it")


def _packed_size(op, name, packed, dim, cin=None):
    """Size `dim` of a packed 2-D weight (9, mid) or (mid, cout); mid a multiple of cin if given."""
    check_tensor(name, packed, dim=2)
    size = packed.shape[dim]
    if size == 0 or (cin is not None and (packed.shape[0] != 9 or size % cin)):
        raise ValueError(f"{op}: {name} must be packed as pack_triton_* gives it, got shape {tuple(packed.shape)}")
    return size


def _check_packed_stride1(x, y, dw_weight, dw_bias, pw_weight, pw_bias):
    """The Triton op's own checks (a direct torch.ops call skips the public front's)."""
    op = "ge_layer_stride1"
    _check_activations(x, y)
    cin = x.shape[1]
    mid = _packed_size(op, "dw_weight", dw_weight, 1, cin)
    _check_triton_weights(op, (dw_weight, dw_bias, pw_weight, pw_bias), [(9, mid), (mid,), (mid, cin), (cin,)], x,
                          STRIDE1_ARGUMENTS[2:])
    check_inference_only(op, dict(zip(STRIDE1_ARGUMENTS, (x, y, dw_weight, dw_bias, pw_weight, pw_bias))),
                         "train the unfused model")


def _check_packed_stride2(x, y, *packed):
    op = "ge_layer_stride2"
    _check_activations(x, y)
    cin = x.shape[1]
    mid = _packed_size(op, "dw0_weight", packed[0], 1, cin)
    cout = _packed_size(op, "pw_weight", packed[4], 1)
    shapes = [(9, mid), (mid,), (9, mid), (mid,), (mid, cout), (cout,), (9, cin), (cin,), (cin, cout), (cout,)]
    _check_triton_weights(op, packed, shapes, x, STRIDE2_ARGUMENTS[2:])
    check_inference_only(op, dict(zip(STRIDE2_ARGUMENTS, (x, y, *packed))), "train the unfused model")


def _empty_like_output(x, cout, height, width):
    return torch.empty(
        (x.shape[0], cout, height, width), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
    )


def _stride2_size(size):
    return (size - 1) // 2 + 1


@torch.library.register_fake("bisenet_fast::ge_layer_stride1")
@fake_on_one_device("ge_layer_stride1")
@fake_inference_only("ge_layer_stride1", "train the unfused model")
def _ge_layer_stride1_fake(x, y, dw_weight, dw_bias, pw_weight, pw_bias):
    return _empty_like_output(x, pw_weight.shape[0], x.shape[2], x.shape[3])


@torch.library.register_fake("bisenet_fast::ge_layer_stride2")
@fake_on_one_device("ge_layer_stride2")
@fake_inference_only("ge_layer_stride2", "train the unfused model")
def _ge_layer_stride2_fake(x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias):
    return _empty_like_output(x, pw_weight.shape[0], _stride2_size(x.shape[2]), _stride2_size(x.shape[3]))


@torch.library.custom_op("bisenet_fast_triton::ge_layer_stride1", mutates_args=())
@on_tensors_device
def _ge_layer_stride1_triton(
    x: torch.Tensor, y: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, pw_weight: torch.Tensor, pw_bias: torch.Tensor
) -> torch.Tensor:
    from bisenet_fast.triton_kernels.ge_layer import ge_layer_stride1_triton

    _check_packed_stride1(x, y, dw_weight, dw_bias, pw_weight, pw_bias)
    return ge_layer_stride1_triton(x, y, dw_weight, dw_bias, pw_weight, pw_bias)


@_ge_layer_stride1_triton.register_fake
@fake_on_one_device("ge_layer_stride1")
def _(x, y, dw_weight, dw_bias, pw_weight, pw_bias):  # packed weights: pw_weight is (mid, cout)
    return _empty_like_output(x, pw_weight.shape[1], x.shape[2], x.shape[3])


@torch.library.custom_op("bisenet_fast_triton::ge_layer_stride2", mutates_args=())
@on_tensors_device
def _ge_layer_stride2_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    dw0_weight: torch.Tensor,
    dw0_bias: torch.Tensor,
    dw1_weight: torch.Tensor,
    dw1_bias: torch.Tensor,
    pw_weight: torch.Tensor,
    pw_bias: torch.Tensor,
    sc_dw_weight: torch.Tensor,
    sc_dw_bias: torch.Tensor,
    sc_pw_weight: torch.Tensor,
    sc_pw_bias: torch.Tensor,
) -> torch.Tensor:
    from bisenet_fast.triton_kernels.ge_layer import ge_layer_stride2_triton

    _check_packed_stride2(x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight,
                          sc_dw_bias, sc_pw_weight, sc_pw_bias)
    return ge_layer_stride2_triton(
        x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias
    )


@_ge_layer_stride2_triton.register_fake
@fake_on_one_device("ge_layer_stride2")
def _(x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight, sc_dw_bias, sc_pw_weight,
      sc_pw_bias):  # packed: pw_weight is (mid, cout)
    return _empty_like_output(x, pw_weight.shape[1], _stride2_size(x.shape[2]), _stride2_size(x.shape[3]))


def ge_layer_stride1(x, y, dw_weight, dw_bias, pw_weight, pw_bias, *, triton_weights=None, backend=None):
    """relu(x + pw(relu(dw(y)))) with folded-BN weights; see the module docstring.
    triton_weights: pack_triton_stride1 of these weights, used by the Triton backend.
    backend: run on this backend, as if forced for this op (default: bisenet_fast.backends' choice)."""
    check_stride1_inputs(x, y, dw_weight, dw_bias, pw_weight, pw_bias)
    args = (x, y, dw_weight, dw_bias, pw_weight, pw_bias)
    backend = backends.resolve("ge_layer_stride1", x.device, GPU_PREFERENCE, backend)
    if backend == "eager":
        return ge_layer_stride1_reference(*args)
    if backend == "triton":
        if triton_weights is None:
            triton_weights = pack_triton_stride1(dw_weight, dw_bias, pw_weight, pw_bias)
        else:
            mid, cout = pw_weight.shape[1], pw_weight.shape[0]
            _check_triton_weights("ge_layer_stride1", triton_weights, [(9, mid), (mid,), (mid, cout), (cout,)], x)
        return torch.ops.bisenet_fast_triton.ge_layer_stride1(x, y, *triton_weights)
    return torch.ops.bisenet_fast.ge_layer_stride1(*args)


def ge_layer_stride2(x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight, sc_dw_bias,
                     sc_pw_weight, sc_pw_bias, *, triton_weights=None, backend=None):
    """relu(pw(relu(dw1(dw0(y)))) + sc_pw(sc_dw(x))) with folded-BN weights; see the module docstring.
    triton_weights: pack_triton_stride2 of these weights, used by the Triton backend.
    backend: run on this backend, as if forced for this op (default: bisenet_fast.backends' choice)."""
    args = (x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias)
    check_stride2_inputs(*args)
    backend = backends.resolve("ge_layer_stride2", x.device, GPU_PREFERENCE, backend)
    if backend == "eager":
        return ge_layer_stride2_reference(*args)
    if backend == "triton":
        if triton_weights is None:
            triton_weights = pack_triton_stride2(*args[2:])
        else:
            cin, (cout, mid) = x.shape[1], pw_weight.shape
            shapes = [(9, mid), (mid,), (9, mid), (mid,), (mid, cout), (cout,), (9, cin), (cin,), (cin, cout), (cout,)]
            _check_triton_weights("ge_layer_stride2", triton_weights, shapes, x)
        return torch.ops.bisenet_fast_triton.ge_layer_stride2(x, y, *triton_weights)
    return torch.ops.bisenet_fast.ge_layer_stride2(*args)
