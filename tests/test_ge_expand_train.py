"""ge_expand_train (grouped 3x3 conv -> BN with batch statistics -> ReLU, backward recomputing
the conv output) against eager Conv2d + BatchNorm2d(train) + ReLU: every GE configuration of
BiSeNetV2, every implementation, forward, statistics, running-stat update and all gradients;
gradcheck in float64; layouts; bad input; torch.compile; the model-level switch."""
import copy

import pytest
import torch
from torch import nn

import bisenet_fast as bf
from bisenet_fast.models import BiSeNetV2Segmentor, use_fused_ge_training
from bisenet_fast.models.conv_module import ConvModule
from bisenet_fast.models.fused_training import FusedExpandConvModule
from bisenet_fast.ops.ge_expand_train import ge_expand_train
from tests.helpers import assert_fake_kernel_refuses_mixed_devices, requires_triton, triton_device

# (cin, ratio, stride, relu) of every expansion conv in BiSeNetV2's GE layers: the 6x grouped
# conv (ReLU only at stride 1) and, at stride 2, the depthwise conv on the expanded tensor.
NETWORK_CONFIGS = [
    (16, 6, 2, False), (96, 1, 1, True), (32, 6, 1, True), (32, 6, 2, False), (192, 1, 1, True),
    (64, 6, 1, True), (64, 6, 2, False), (384, 1, 1, True), (128, 6, 1, True),
]
NAMES = ["x", "weight", "bn_weight", "bn_bias"]


def make_inputs(n, cin, ratio, height, width, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mid = cin * ratio
    x = torch.randn(n, cin, height, width, generator=g, dtype=torch.float64) + 0.5  # nonzero mean
    weight = torch.randn(mid, 1, 3, 3, generator=g, dtype=torch.float64) / 3
    bn_weight = torch.rand(mid, generator=g, dtype=torch.float64) + 0.5
    bn_bias = torch.randn(mid, generator=g, dtype=torch.float64) * 0.5
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, weight, bn_weight, bn_bias)]


def run(backend, args, stride, relu, grad_seed=1, eps=1e-5):
    with bf.backends.use(backend):
        out, mean, var = ge_expand_train(*args, stride, relu, eps)
    g = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, args, grad_out)
    return out, mean, var, grads


def assert_close_to_scale(actual, expected, rel, what):
    # Floor 0.1: with few values per channel grad_x nearly cancels (the exact answer is ~0
    # while its terms are ~grad_out ~1), and rounding is relative to those terms.
    scale = max(expected.abs().max().item(), 0.1)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} * scale {scale:.3g}"


def assert_matches_reference(backend, args, stride, relu, rel, eps=1e-5):
    out, mean, var, grads = run(backend, args, stride, relu, eps=eps)
    ref = [t.detach().double().requires_grad_() for t in args]
    r_out, r_mean, r_var, r_grads = run("eager", ref, stride, relu, eps=eps)
    assert out.dtype == args[0].dtype and out.shape == r_out.shape
    assert mean.dtype == var.dtype == (torch.float64 if args[0].dtype == torch.float64 else torch.float32)
    assert_close_to_scale(out, r_out, rel, "out")
    assert_close_to_scale(mean, r_mean, rel, "mean")
    assert_close_to_scale(var, r_var, rel, "var")
    for name, a, e in zip(NAMES, grads, r_grads):
        assert a.dtype == args[NAMES.index(name)].dtype and a.shape == e.shape
        assert_close_to_scale(a, e, rel, f"grad {name}")


# ---- Against the eager reference ---------------------------------------------------------


@pytest.mark.parametrize("cin, ratio, stride, relu", NETWORK_CONFIGS)
def test_cpp_matches_eager_network_configs(cin, ratio, stride, relu):
    assert_matches_reference("cpp", make_inputs(2, cin, ratio, 9, 11), stride, relu, 1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("n, height, width", [(1, 2, 1), (1, 5, 7), (3, 6, 4), (2, 13, 3)])
def test_cpp_odd_sizes(n, height, width, stride, relu):
    if n * ((height - 1) // stride + 1) * ((width - 1) // stride + 1) < 2:
        pytest.skip("one value per channel: BatchNorm rejects it (tested in test_bad_inputs)")
    assert_matches_reference("cpp", make_inputs(n, 3, 2, height, width), stride, relu, 1e-5)


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
def test_cpp_low_precision(dtype, rel):
    assert_matches_reference("cpp", make_inputs(2, 4, 6, 7, 8, dtype=dtype), 2, False, rel)


def test_cpp_batch_statistics_are_as_accurate_as_atens():
    """The statistics sum N*H*W values per channel. Eight float32 running sums over 2**18
    values of mean ~300 erred 8e-7 (mean) and 5e-6 (variance) relative, 10-300x ATen's;
    blocks added in double keep them at ATen's ~1e-7."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 256, 256, generator=generator) * 30 + 300
    weight = torch.randn(2, 1, 3, 3, generator=generator)
    with bf.backends.use("cpp"):
        _, mean, var = ge_expand_train(x, weight, torch.ones(2), torch.zeros(2), 1, False)
    z = torch.nn.functional.conv2d(x.double(), weight.double(), padding=1, groups=2)
    torch.testing.assert_close(mean.double(), z.mean((0, 2, 3)), rtol=2e-7, atol=0)
    torch.testing.assert_close(var.double(), z.var((0, 2, 3), unbiased=False), rtol=2e-7, atol=0)


def test_cpp_float32_bn_params_with_float16_input():
    x, weight, bn_weight, bn_bias = make_inputs(2, 4, 6, 7, 8, dtype=torch.float16)
    bn_weight = bn_weight.detach().float().requires_grad_()
    bn_bias = bn_bias.detach().float().requires_grad_()
    out, _, _, grads = run("cpp", [x, weight, bn_weight, bn_bias], 1, True)
    assert out.dtype == torch.float16
    assert grads[2].dtype == grads[3].dtype == torch.float32
    ref = [t.detach().double().requires_grad_() for t in (x, weight, bn_weight, bn_bias)]
    r_out, _, _, r_grads = run("eager", ref, 1, True)
    assert_close_to_scale(out, r_out, 1e-2, "out")
    for name, a, e in zip(NAMES, grads, r_grads):
        assert_close_to_scale(a, e, 2e-2, f"grad {name}")


@pytest.mark.parametrize("stride, relu", [(1, True), (2, False), (2, True)])
def test_cpp_gradcheck_float64(stride, relu):
    args = make_inputs(2, 2, 3, 5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: ge_expand_train(*a, stride, relu)[0], args)


BACKENDS = ["cpp", pytest.param("triton", marks=requires_triton)]


def device_of(backend):
    return triton_device() if backend == "triton" else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_layouts(backend, layout):
    x, weight, bn_weight, bn_bias = make_inputs(2, 4, 6, 6, 10, device=device_of(backend))
    if layout == "channels_last":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    else:
        x = x.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
        assert not x.is_contiguous()
    assert_matches_reference(backend, [x, weight, bn_weight, bn_bias], 2, True, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_eps_other_than_the_default(backend, stride):
    """A large eps next to a small batch variance: an op that ignored eps is off by ~10 %."""
    args = [t.detach() for t in make_inputs(2, 3, 2, 5, 7, device=device_of(backend))]
    args[0] = (args[0] * 0.1).requires_grad_()
    args[1:] = [t.requires_grad_() for t in args[1:]]
    assert_matches_reference(backend, args, stride, True, 1e-5, eps=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("height, width", [(5, 7), (6, 3)])
def test_batch_of_one(backend, stride, height, width):
    assert_matches_reference(backend, make_inputs(1, 3, 2, height, width, device=device_of(backend)), stride,
                             stride == 1, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grad_out(backend):
    """out.sum() hands the backward a stride-0 (expanded) grad_out."""
    args = make_inputs(2, 4, 6, 6, 10, device=device_of(backend))
    with bf.backends.use(backend):
        out = ge_expand_train(*args, 1, True)[0]
    grads = torch.autograd.grad(out.sum(), args)
    ref = [t.detach().double().requires_grad_() for t in args]
    with bf.backends.use("eager"):
        expected = torch.autograd.grad(ge_expand_train(*ref, 1, True)[0].sum(), ref)
    for name, actual, e in zip(NAMES, grads, expected):
        assert_close_to_scale(actual, e, 1e-5, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_gradient_is_zero_where_the_output_is_exactly_zero(backend):
    """x = 0 and bn_bias = 0 make every BN output exactly 0, where relu passes no gradient
    (torch's relu backward: grad * (out > 0))."""
    x, weight, bn_weight, bn_bias = make_inputs(2, 3, 2, 6, 5, device=device_of(backend))
    x = torch.zeros_like(x).requires_grad_()
    bn_bias = torch.zeros_like(bn_bias).requires_grad_()
    assert_matches_reference(backend, [x, weight, bn_weight, bn_bias], 1, True, 1e-5)


@requires_triton
@pytest.mark.parametrize("cin, ratio, stride, relu", [(16, 6, 2, False), (32, 6, 1, True), (24, 1, 1, True)])
def test_triton_matches_eager(cin, ratio, stride, relu):
    args = [t.detach().to(triton_device()).requires_grad_() for t in make_inputs(2, cin, ratio, 7, 9)]
    assert_matches_reference("triton", args, stride, relu, 1e-5)


@requires_triton
@pytest.mark.parametrize("stride", [1, 2])
def test_triton_odd_sizes_more_than_one_block(stride):
    # 2 * 27 * 25 = 1350 outputs at stride 1: two blocks of BLOCK=1024 and a partial one.
    args = [t.detach().to(triton_device()).requires_grad_() for t in make_inputs(2, 2, 3, 27, 25)]
    assert_matches_reference("triton", args, stride, True, 1e-5)


@requires_triton
def test_triton_pixel_split_past_32_bit_planes():
    """The (n, oh, ow) split shared by the GE kernels (ge_expand_train's and ge_layer's) at
    a plane of 46341 x 46341 > 2**31 pixels, which the ops accept: the sizes are 32-bit
    arguments, so a split through their product wrapped it (to a negative divisor) and gave
    negative image indices (from the plane's last 9266 pixels on). Probed with a kernel of its
    own: no such tensor fits a test."""
    from tests.triton_probes import split_pixels

    side = 46341
    plane = side * side
    assert plane >= 2**31
    offsets = [0, 1, side, plane - 1, plane, plane + side + 3, 3 * plane + 7 * side + 5, 2**40 + 12345]
    expected = [(o // plane, o // side % side, o % side) for o in offsets]
    assert split_pixels(offsets, side, side, triton_device()) == expected


@requires_triton
def test_triton_rejects_more_expanded_channels_than_the_grid_takes():
    from bisenet_fast.triton_kernels.ge_expand_train import ge_expand_train_triton

    # Each expanded channel takes a grid y index (at most 65535): more are refused by name.
    x = torch.zeros(1, 1, 2, 2, device=triton_device())
    weight = torch.zeros(65536, 1, 3, 3, device=triton_device())
    bn = torch.ones(65536, device=triton_device())
    with pytest.raises(ValueError, match=r"weight's 65536 expanded channels would need 65536 programs along one "
                                         r"launch axis.*cpp backend"):
        ge_expand_train_triton(x, weight, bn, bn, 1, True, 1e-5)


@requires_triton
@pytest.mark.parametrize("dtype, rel", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
def test_triton_low_precision_with_float32_bn_params(dtype, rel):
    x, weight, bn_weight, bn_bias = (t.detach().to(triton_device()) for t in make_inputs(2, 4, 6, 7, 8))
    args = [x.to(dtype), weight.to(dtype), bn_weight, bn_bias]
    args = [t.requires_grad_() for t in args]
    out, _, _, grads = run("triton", args, 2, False)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[2].dtype == torch.float32
    ref = [t.detach().double().requires_grad_() for t in args]
    r_out, _, _, r_grads = run("eager", ref, 2, False)
    assert_close_to_scale(out, r_out, rel, "out")
    for name, a, e in zip(NAMES, grads, r_grads):
        assert_close_to_scale(a, e, 2 * rel, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relu_gradient_masked_where_the_forward_output_is_zero(backend, dtype):
    """A gradient only where the forward's ReLU output is 0 must give zero gradients, as
    eager's ReLU does (it masks by its output). The Triton backward rebuilt the mask from the
    unrounded conv output with another formula, so in float16/bfloat16 some pixels the
    forward clamped passed their gradient (bfloat16: 13 of ~27k)."""
    g = torch.Generator().manual_seed(0)
    device = device_of(backend)
    x = (torch.rand(2, 2, 32, 32, generator=g) + 1).to(device=device, dtype=dtype)  # positive, as after a ReLU
    weight = (torch.rand(4, 1, 3, 3, generator=g) / 3).to(device=device, dtype=dtype)
    bn_weight, bn_bias = torch.ones(4, device=device), torch.zeros(4, device=device)
    with bf.backends.use(backend):
        out, mean, var = bf.ops.ge_expand_train(x, weight, bn_weight, bn_bias, 1, True)
    assert (out == 0).sum() > 1000  # about half the values: zero-mean BN output, clamped
    op = getattr(torch.ops, "bisenet_fast_triton" if backend == "triton" else "bisenet_fast").ge_expand_train_backward
    grads = op((out == 0).to(dtype), x, weight, bn_weight, bn_bias, mean, var, 1, True, 1e-5)
    for name, grad in zip(NAMES, grads):
        assert not grad.any(), f"grad {name}: {grad.abs().max().item()}"


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=requires_triton)])
def test_deterministic(backend):
    device = triton_device() if backend == "triton" else "cpu"
    args = [t.detach().to(device).requires_grad_() for t in make_inputs(2, 3, 6, 9, 7)]
    first, second = run(backend, args, 1, True), run(backend, args, 1, True)
    for a, b in zip([*first[:3], *first[3]], [*second[:3], *second[3]]):
        assert torch.equal(a, b)


# ---- Bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(x=a["x"].int()), TypeError, "x must have dtype"),
        (lambda a: a.update(x=a["x"][0]), ValueError, "x must be 4-D"),
        (lambda a: a.update(weight=a["weight"][:5]), ValueError, r"weight must have shape \(k \* 4, 1, 3, 3\)"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight must have dtype"),
        (lambda a: a.update(bn_weight=a["bn_weight"][:3]), ValueError, r"bn_weight must have shape \(24,\)"),
        (lambda a: a.update(bn_bias=a["bn_bias"].double()), TypeError, "bn_bias must have dtype"),
        # float32 BN parameters go with float16/bfloat16 activations only (BatchNorm2d refuses them too)
        (lambda a: a.update(x=a["x"].double(), weight=a["weight"].double()), TypeError,
         r"bn_weight must have dtype in \(float64\), got float32"),
        (lambda a: a.update(stride=3), ValueError, "stride must be 1 or 2"),
        (lambda a: a.update(relu=1), TypeError, "relu must be a bool"),
        (lambda a: a.update(eps=0.0), ValueError, "eps must be > 0"),
        (lambda a: a.update(eps=None), TypeError, "eps must be a float, got NoneType"),
        (lambda a: a.update(eps=True), TypeError, "eps must be a float, got bool"),
        (lambda a: a.update(x=a["x"][:1, :, :1, :1]), ValueError, "more than one value per channel"),
        (lambda a: a.update(bn_bias=a["bn_bias"].to("meta")), ValueError, "bn_bias must be on cpu like the other"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "weight must be on cpu like the other"),
    ],
)
def test_bad_inputs(change, error, match):
    x, weight, bn_weight, bn_bias = (t.detach() for t in make_inputs(2, 4, 6, 5, 5))
    args = dict(x=x, weight=weight, bn_weight=bn_weight, bn_bias=bn_bias, stride=1, relu=True, eps=1e-5)
    change(args)
    with pytest.raises(error, match=match):
        ge_expand_train(**args)


def test_raw_op_checks_every_argument():
    """torch.ops.bisenet_fast.ge_expand_train called directly (no Python front)."""
    x, weight, bn_weight, bn_bias = (t.detach() for t in make_inputs(2, 4, 6, 5, 5))
    op, backward = torch.ops.bisenet_fast.ge_expand_train, torch.ops.bisenet_fast.ge_expand_train_backward
    with pytest.raises(ValueError, match="eps must be > 0, got -10"):
        op(x, weight, bn_weight, bn_bias, 1, True, -10.0)
    with pytest.raises(RuntimeError, match=r"weight must be \(k \* cin, 1, 3, 3\), got \[24, 9\]"):
        op(x, weight.reshape(24, 9), bn_weight, bn_bias, 1, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"bn_weight and bn_bias must be \(24\)"):
        op(x, weight, bn_weight.reshape(4, 6), bn_bias, 1, True, 1e-5)
    with pytest.raises(TypeError, match="bn_weight and bn_bias must share x's dtype or float32"):
        op(x, weight, bn_weight.int(), bn_bias.int(), 1, True, 1e-5)
    out, mean, var = op(x, weight, bn_weight, bn_bias, 1, True, 1e-5)
    with pytest.raises(RuntimeError, match="grad_out must have the output's shape and x's dtype"):
        backward(out.double(), x, weight, bn_weight, bn_bias, mean, var, 1, True, 1e-5)


@pytest.mark.parametrize("empty", [2, 3])
def test_raw_op_refuses_an_empty_spatial_axis(empty):
    # At stride 2 the kernel's output size (size - 1) / 2 + 1 truncates to 1 for size 0, where
    # F.conv2d and the fake kernel give 0: the raw op returned a (2, 24, 1, 2) "output" of an
    # empty input (BatchNorm of a conv of nothing) instead of refusing it.
    x, weight, bn_weight, bn_bias = (t.detach() for t in make_inputs(2, 4, 6, 5, 5))
    x = x.narrow(empty, 0, 0)
    op, backward = torch.ops.bisenet_fast.ge_expand_train, torch.ops.bisenet_fast.ge_expand_train_backward
    with pytest.raises(ValueError, match="x must have a non-empty spatial size"):
        op(x, weight, bn_weight, bn_bias, 2, True, 1e-5)
    stats = torch.zeros(24)
    with pytest.raises(ValueError, match="x must have a non-empty spatial size"):
        backward(torch.zeros(2, 24, 1, 1), x, weight, bn_weight, bn_bias, stats, stats, 2, True, 1e-5)


@requires_triton
def test_raw_triton_op_checks_its_arguments():
    x, weight, bn_weight, bn_bias = (t.detach() for t in make_inputs(2, 4, 6, 5, 5, device=triton_device()))
    with pytest.raises(ValueError, match=r"bn_weight must have shape \(24,\)"):
        torch.ops.bisenet_fast_triton.ge_expand_train(x, weight, bn_weight[:1], bn_bias, 1, True, 1e-5)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        torch.ops.bisenet_fast_triton.ge_expand_train(x, weight, bn_weight, bn_bias, 3, True, 1e-5)


# ---- NaN and double backward ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=requires_triton)])
def test_nan_propagates_as_in_the_reference(backend):
    """A NaN input makes its channels' statistics, outputs and gradients NaN where the
    reference's are (relu keeps a NaN and passes its gradient), never a silent 0."""
    args = make_inputs(2, 3, 4, 7, 9, device="cpu" if backend == "cpp" else triton_device())
    with torch.no_grad():
        args[0][0, 0, 3, 3] = float("nan")
    out, mean, var, grads = run(backend, args, 1, True)
    ref = [t.detach().cpu().double().requires_grad_() for t in args]
    r_out, r_mean, r_var, r_grads = run("eager", ref, 1, True)
    assert r_out.isnan().any() and not r_out.isnan().all()
    for name, actual, expected in [("out", out, r_out), ("mean", mean, r_mean), ("var", var, r_var),
                                   *zip(NAMES, grads, r_grads)]:
        assert torch.equal(actual.isnan().cpu(), expected.isnan()), name
        assert_close_to_scale(actual.cpu().nan_to_num(0), expected.nan_to_num(0), 1e-5, name)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=requires_triton)])
def test_double_backward_raises(backend):
    """The fused backward has no backward of its own: a second derivative is an error, not zeros."""
    args = make_inputs(2, 2, 3, 5, 6, device="cpu" if backend == "cpp" else triton_device())
    with bf.backends.use(backend):
        out, _, _ = ge_expand_train(*args, 1, True)
    grads = torch.autograd.grad(out.square().sum(), args, create_graph=True)
    with pytest.raises(RuntimeError, match="has no second derivative"):
        torch.autograd.grad(grads[0].sum(), args)


# ---- Registration: schema, fake kernel, torch.compile -------------------------------------


@pytest.mark.parametrize("namespace", ["bisenet_fast", pytest.param("bisenet_fast_triton", marks=requires_triton)])
def test_opcheck(namespace):
    """Every opcheck utility on inputs that require grad (the autograd registration and the
    forward and backward traced with dynamic shapes); the backward op's schema and fake kernel."""
    device = triton_device() if namespace == "bisenet_fast_triton" else "cpu"
    ops = getattr(torch.ops, namespace)
    args = [t.float().to(device) for t in make_inputs(2, 2, 3, 5, 6)]
    torch.library.opcheck(ops.ge_expand_train.default, (*args, 2, True, 1e-5))
    with torch.no_grad():
        out, mean, var = ops.ge_expand_train(*args, 2, True, 1e-5)
    backward_args = (torch.randn_like(out), *(t.detach() for t in args), mean, var, 2, True, 1e-5)
    torch.library.opcheck(ops.ge_expand_train_backward.default, backward_args,
                          test_utils=("test_schema", "test_faketensor"))
    assert_fake_kernel_refuses_mixed_devices(ops.ge_expand_train, (*args, 2, True, 1e-5))
    assert_fake_kernel_refuses_mixed_devices(ops.ge_expand_train_backward, backward_args)


@pytest.mark.parametrize("namespace", ["bisenet_fast", pytest.param("bisenet_fast_triton", marks=requires_triton)])
def test_fake_statistics_are_float32_for_float16_input(namespace):
    device = triton_device() if namespace == "bisenet_fast_triton" else "cpu"
    x, weight, bn_weight, bn_bias = (t.detach() for t in make_inputs(2, 4, 2, 6, 5, device=device))
    op = getattr(torch.ops, namespace).ge_expand_train.default
    torch.library.opcheck(op, (x.half(), weight.half(), bn_weight.float(), bn_bias.float(), 1, True, 1e-5),
                          test_utils=("test_faketensor",))


def test_cpp_fake_statistics_are_float64_for_float64_input():
    """The cpp kernel's float64 path returns float64 statistics: the fake kernel must too."""
    args = [t.detach() for t in make_inputs(2, 4, 2, 6, 5, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.bisenet_fast.ge_expand_train.default, (*args, 1, True, 1e-5),
                          test_utils=("test_faketensor",))


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    args = make_inputs(2, 3, 6, 6, 7)

    def step(x, weight, bn_weight, bn_bias):
        out, mean, var = ge_expand_train(x, weight, bn_weight, bn_bias, 2, True)
        return (out * out).sum(), mean, var

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, mean, var = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    r_loss, r_mean, r_var = step(*args)
    r_grads = torch.autograd.grad(r_loss, args)
    torch.testing.assert_close(loss, r_loss)
    torch.testing.assert_close(var, r_var)
    for a, e in zip(grads, r_grads):
        torch.testing.assert_close(a, e)


# ---- The module and the model-level switch ---------------------------------------------


def _trained_pair(cin, ratio, stride, act, momentum, eps=1e-5):
    eager = ConvModule(cin, cin * ratio, 3, stride, groups=cin, act=act)
    eager.bn.momentum, eager.bn.eps = momentum, eps
    with torch.no_grad():
        eager.bn.weight.uniform_(0.5, 1.5)
        eager.bn.bias.uniform_(-0.5, 0.5)
    return eager, FusedExpandConvModule(copy.deepcopy(eager))


@pytest.mark.parametrize("momentum, eps", [(0.1, 1e-5), (None, 1e-5), (0.1, 1e-3)])
@pytest.mark.parametrize("stride, act", [(1, True), (2, False)])
def test_module_matches_conv_module(stride, act, momentum, eps):
    eager, fused = _trained_pair(4, 6, stride, act, momentum, eps)
    assert list(fused.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 4, 9, 8) + 1
    for step in range(2):
        outs = []
        for module in (eager, fused):
            xi = x.clone().requires_grad_()
            out = module(xi)
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            outs.append((out.detach(), xi.grad))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for (name, a), (_, e) in zip(fused.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), (_, e) in zip(fused.named_parameters(), eager.named_parameters()):
        assert_close_to_scale(a.grad, e.grad, 1e-5, f"grad {name}")
    eager.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x))


def test_module_under_autocast_matches_conv_module():
    eager, fused = _trained_pair(4, 6, 1, True, 0.1)
    x = torch.randn(2, 4, 9, 8) + 1
    results = []
    for module in (eager, fused):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xi)
        out.float().square().sum().backward()
        results.append((out, xi.grad, module.conv.weight.grad, module.bn.weight.grad, module.bn.running_var))
    assert results[1][0].dtype == results[0][0].dtype == torch.bfloat16
    assert results[1][3].dtype == torch.float32
    for what, a, e in zip(["out", "grad x", "grad conv.weight", "grad bn.weight", "running_var"], *results):
        assert_close_to_scale(a, e, 2e-2, what)


def test_float64_module_under_autocast_stays_float64_as_conv_module():
    """Autocast leaves float64 tensors alone; the fused module did cast them to bfloat16."""
    eager, fused = _trained_pair(4, 6, 2, True, 0.1)
    eager, fused = eager.double(), fused.double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_e, out_f = eager(x), fused(x)
    assert out_f.dtype == out_e.dtype == torch.float64
    assert_close_to_scale(out_f, out_e, 1e-12, "out")


def test_module_compiles_fullgraph_with_running_stat_update():
    torch._dynamo.reset()
    _, fused = _trained_pair(4, 6, 2, False, 0.1)
    reference = copy.deepcopy(fused)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 9, 8) + 1
    results = []
    for module, state in ((reference, reference), (compiled, fused)):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.square().sum().backward()
        results.append((out, xi.grad, state.conv.weight.grad, state.bn.running_mean, state.bn.running_var))
        assert int(state.bn.num_batches_tracked) == 1
    torch.testing.assert_close(results[1], results[0])


def test_module_rejects_unfusable_conv():
    with pytest.raises(ValueError, match="3x3 grouped"):
        FusedExpandConvModule(ConvModule(4, 8, 3, 1, groups=1))


def test_segmentor_switch_same_losses_grads_and_running_stats():
    # float64: at this tiny size the deep semantic branch normalises over a handful of values
    # per channel, which amplifies float32 rounding differences in the early layers' grads
    # to ~1e-2; in float64 any real difference would still show.
    torch.manual_seed(0)
    eager = BiSeNetV2Segmentor(num_classes=5, dropout_ratio=0.0).double()
    fused = use_fused_ge_training(copy.deepcopy(eager))
    assert list(fused.state_dict()) == list(eager.state_dict())
    swapped = [m for m in fused.modules() if isinstance(m, FusedExpandConvModule)]
    assert len(swapped) == 8 + 3  # 8 GE layers, 3 of them stride 2 with a second dwconv
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 64, 64))
    results = []
    for model in (eager, fused):
        model.train()
        with bf.backends.use("cpp"):
            losses = model.loss(x, target)
        sum(losses.values()).backward()
        results.append(losses)
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-10, atol=1e-12)
    for (name, a), (_, e) in zip(fused.named_parameters(), eager.named_parameters()):
        assert_close_to_scale(a.grad, e.grad, 1e-8, f"grad {name}")
    for (name, a), (_, e) in zip(fused.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=name)
