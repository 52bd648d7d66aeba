"""bga_pointwise_aggregate (the BGA gate folded into detail_dwconv's 1x1 conv): every
implementation against the eager reference F.conv2d + bga_aggregate_reference."""
import pytest
import torch

import bisenet_fast as bf
from bisenet_fast.ops.bga_pointwise import bga_pointwise_aggregate_reference
from tests.helpers import assert_fake_kernel_refuses_mixed_devices, CUDA, requires_triton, triton_device
from tests.test_bga import in_layout

IMPLS = [
    pytest.param("cpp", id="cpp"),
    pytest.param("triton", id="triton", marks=requires_triton),
]

# (N, C, H, W, h, w): detail_dw's size and the low-res size of the other three.
SMALL_SHAPES = [
    pytest.param((1, 3, 16, 24, 4, 6), id="ratio4"),
    pytest.param((2, 5, 13, 17, 4, 5), id="odd"),
    # More channels than one Triton tile of output channels (128), not a multiple of the
    # reduction block (32): exercises the channel grid and the channel and reduction masks.
    pytest.param((1, 150, 5, 6, 2, 3), id="channels_150"),
]
# 1/8 is not 4x 1/32 (spec §2.4); too slow for the Triton interpreter.
SPEC_SHAPES = [
    pytest.param((2, 4, 129, 257, 33, 65), id="spec_1025x2049"),
    pytest.param((1, 3, 125, 125, 32, 32), id="spec_1000x1000"),
    # Over one C++ conv tile per image (2^20 values): two tiles, the second a partial one.
    pytest.param((2, 64, 131, 130, 33, 33), id="several_cpp_tiles"),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tolerance(impl, dtype):
    """Against the reference in float32 on the same rounded inputs. float32: the bilinear
    coordinate's fma contraction (see tests/test_bga.py) and the GEMM's summation order;
    on a GPU the Triton GEMM runs in TF32 (as cuDNN's conv does by default): ~1e-3 relative
    on a conv output of size ~3. float16/bfloat16: the C++ kernel rounds the conv's output
    to the input dtype (as F.conv2d does) and then the result, about two roundings."""
    if dtype == torch.float32:
        if impl == "triton" and CUDA and torch.backends.cudnn.allow_tf32:
            return dict(atol=1e-2, rtol=1e-2)
        return dict(atol=1e-4, rtol=1e-4)
    if dtype == torch.float16:
        return dict(atol=1e-2, rtol=1e-2)
    return dict(atol=8e-2, rtol=5e-2)


def device_of(impl):
    return {"cpp": "cpu", "triton": triton_device()}[impl]


def make_inputs(shape, dtype=torch.float32, device="cpu", layout="contiguous", seed=0):
    """(detail_dw, pw_weight, pw_bias, semantic, detail_down, semantic_down)."""
    n, c, H, W, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    detail_dw = torch.randn(n, c, H, W, generator=gen)
    weight = torch.randn(c, c, generator=gen) / c**0.5  # conv output ~ unit variance
    bias = torch.randn(c, generator=gen)
    low = [2 * torch.randn(n, c, h, w, generator=gen) for _ in range(3)]  # logits past sigmoid's linear range
    maps = [in_layout(t.to(dtype=dtype, device=device), layout) for t in (detail_dw, *low)]
    weight, bias = weight.to(dtype=dtype, device=device), bias.to(dtype=dtype, device=device)
    return [maps[0], weight, bias, *maps[1:]]


def run(impl, inputs):
    with torch.no_grad(), bf.backends.use(impl):
        return bf.ops.bga_pointwise_aggregate(*inputs)


def reference_in_math_type(inputs):
    math_type = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    return bga_pointwise_aggregate_reference(*[t.detach().cpu().to(math_type) for t in inputs])


def assert_matches_reference(impl, inputs, tol):
    out = run(impl, inputs)
    assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape and out.device == inputs[0].device
    fmt = torch.channels_last if inputs[0].is_contiguous(memory_format=torch.channels_last) and not inputs[
        0].is_contiguous() else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "the output keeps detail_dw's memory format"
    torch.testing.assert_close(out.cpu().to(torch.float32 if out.dtype != torch.float64 else out.dtype),
                               reference_in_math_type(inputs), **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_small(impl, shape, layout, dtype):
    inputs = make_inputs(shape, dtype=dtype, device=device_of(impl), layout=layout)
    assert_matches_reference(impl, inputs, tolerance(impl, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SPEC_SHAPES)
def test_matches_reference_spec_sizes_cpp(shape, layout, dtype):
    inputs = make_inputs(shape, dtype=dtype, layout=layout)
    assert_matches_reference("cpp", inputs, tolerance("cpp", dtype))


@pytest.mark.skipif(not CUDA, reason="the spec sizes are too slow for the Triton interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SPEC_SHAPES)
def test_matches_reference_spec_sizes_triton(shape, layout, dtype):
    inputs = make_inputs(shape, dtype=dtype, device="cuda", layout=layout)
    assert_matches_reference("triton", inputs, tolerance("triton", dtype))


@requires_triton
def test_triton_rejects_images_beyond_32_bit_offsets(monkeypatch):
    # Expanded, so nothing of the 2**31 values is allocated: the check comes before the op's
    # copies into one layout (a copy would allocate 8 GiB).
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("copied before the size check"))
    device = triton_device()
    huge = torch.zeros(1, 1, 1, 1, device=device).expand(1, 128, 2**12, 2**12)
    small = torch.zeros(1, 128, 4, 4, device=device)
    weight, bias = torch.zeros(128, 128, device=device), torch.zeros(128, device=device)
    op = torch.ops.bisenet_fast_triton.bga_pointwise_aggregate
    with torch.no_grad(), pytest.raises(ValueError, match=r"detail_dw holds 2147483648 values per image .* 2\*\*31"):
        op(huge, weight, bias, small, small, small)
    with torch.no_grad(), pytest.raises(ValueError, match=r"semantic holds 2147483648 values per image .* 2\*\*31"):
        op(small, weight, bias, huge, huge, huge)


@requires_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_batch_beyond_the_grid_runs_in_slices(monkeypatch, layout):
    """Images take the grid's z (CUDA bounds it to 65535): a larger batch runs in slices,
    each addressed from its own first image. Shown with the bound lowered to 2."""
    from bisenet_fast.triton_kernels import bga_pointwise as bga_pointwise_triton

    monkeypatch.setattr(bga_pointwise_triton, "MAX_GRID_Z", 2)
    inputs = make_inputs((5, 3, 7, 9, 2, 3), device=triton_device(), layout=layout)
    assert_matches_reference("triton", inputs, tolerance("triton", torch.float32))


@pytest.mark.skipif(not CUDA, reason="TF32 only exists on the GPU")
def test_triton_float32_ieee_when_tf32_is_off(monkeypatch):
    """With cuDNN's TF32 off, the Triton GEMM runs in IEEE fp32 and meets the fp32 tolerance."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    inputs = make_inputs((1, 96, 33, 65, 9, 17), device="cuda", layout="channels_last")
    assert_matches_reference("triton", inputs, dict(atol=1e-4, rtol=1e-4))


def test_cpp_float64_matches_reference():
    inputs = make_inputs((2, 5, 13, 17, 4, 5), dtype=torch.float64, layout="channels_last")
    # The taps are float64 as ATen's float64 upsample's (bilinear.h): only rounding differs.
    assert_matches_reference("cpp", inputs, dict(atol=1e-12, rtol=1e-12))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpp_equals_conv_then_fused_aggregate(layout):
    """The C++ kernel gates a conv tile with the aggregation's own row code: the result is
    conv2d followed by bga_aggregate up to the GEMM's summation order."""
    d, w, b, s, dd, sd = make_inputs((2, 6, 11, 9, 3, 4), layout=layout)
    expected = torch.ops.bisenet_fast.bga_aggregate(torch.nn.functional.conv2d(d, w[:, :, None, None], b), s, dd, sd)
    torch.testing.assert_close(run("cpp", [d, w, b, s, dd, sd]), expected, atol=1e-5, rtol=1e-5)


def test_mixed_layouts_cpp():
    """Low-res maps in another layout than detail_dw are read correctly."""
    d, w, b, s, dd, sd = make_inputs((2, 5, 13, 17, 4, 5), layout="channels_last")
    inputs = [d, w, b, s.contiguous(), in_layout(dd, "strided"), sd.contiguous()]
    assert_matches_reference("cpp", inputs, tolerance("cpp", torch.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_weight(impl):
    inputs = make_inputs((2, 5, 13, 17, 4, 5), device=device_of(impl))
    inputs[1] = inputs[1].t().contiguous().t()  # same values, column-major
    assert not inputs[1].is_contiguous()
    assert_matches_reference(impl, inputs, tolerance(impl, torch.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_size_one_width_with_an_unusual_stride(impl):
    """A size-1 dim's stride is free: this tensor is NCHW-contiguous (.contiguous() returns it
    as it is) with a stride of 7 along w, which the kernels must not use for pixels."""
    n, c, H, h = 2, 5, 13, 4
    inputs = make_inputs((n, c, H, 1, h, 1), device=device_of(impl))
    odd = torch.empty_strided((n, c, H, 1), (c * H, H, 1, 7), device=device_of(impl)).copy_(inputs[0])
    assert odd.is_contiguous() and odd.contiguous() is odd
    inputs[0] = odd
    assert_matches_reference(impl, inputs, tolerance(impl, torch.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic(impl):
    inputs = make_inputs((2, 5, 13, 17, 4, 5), device=device_of(impl), layout="channels_last")
    assert torch.equal(run(impl, inputs), run(impl, inputs))


# channels_last: the fused model's layout, whose output the fake kernel must give the same
# strides as the kernels (opcheck's fake-tensor test compares them).
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_cpp(layout):
    inputs = make_inputs((2, 3, 9, 11, 3, 4), layout=layout)
    torch.library.opcheck(torch.ops.bisenet_fast.bga_pointwise_aggregate.default, tuple(inputs))
    assert_fake_kernel_refuses_mixed_devices(torch.ops.bisenet_fast.bga_pointwise_aggregate, inputs)


@requires_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_triton(layout):
    inputs = make_inputs((1, 2, 9, 7, 3, 2), device=triton_device(), layout=layout)
    torch.library.opcheck(torch.ops.bisenet_fast_triton.bga_pointwise_aggregate.default, tuple(inputs))
    assert_fake_kernel_refuses_mixed_devices(torch.ops.bisenet_fast_triton.bga_pointwise_aggregate, inputs)


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile_fullgraph(impl):
    """The fake kernel carries the op through torch.compile in one graph."""
    inputs = make_inputs((2, 3, 10, 12, 3, 4), device=device_of(impl))
    op = {"cpp": torch.ops.bisenet_fast, "triton": torch.ops.bisenet_fast_triton}[impl].bga_pointwise_aggregate

    def fn(d, w, b, s, dd, sd):
        return op(d * 2.0, w, b, s, dd, sd).relu()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(*inputs)
    d, *rest = [t.cpu() for t in inputs]
    expected = bga_pointwise_aggregate_reference(d * 2.0, *rest).relu()
    torch.testing.assert_close(out.cpu(), expected, **tolerance(impl, torch.float32))


def test_weights_that_require_grad_run_under_no_grad():
    """A conv's parameters require grad; under no_grad the op runs (inference)."""
    d, w, b, s, dd, sd = make_inputs((1, 4, 6, 8, 2, 3))
    w.requires_grad_()
    b.requires_grad_()
    assert_matches_reference("cpp", [d, w, b, s, dd, sd], tolerance("cpp", torch.float32))


# --- bad input --------------------------------------------------------------------------


def bad_cases():
    d, w, b, s, dd, sd = make_inputs((2, 3, 8, 8, 2, 2))
    return [
        pytest.param((d[0], w, b, s, dd, sd), ValueError, "detail_dw must be 4-D", id="detail_rank"),
        pytest.param((d, w[:, :2], b, s, dd, sd), ValueError, r"pw_weight must have shape \(3, 3\)", id="weight_shape"),
        pytest.param((d, w[None], b, s, dd, sd), ValueError, "pw_weight must be 2-D", id="weight_rank"),
        pytest.param((d, w, b[:2], s, dd, sd), ValueError, r"pw_bias must have shape \(3,\)", id="bias_shape"),
        pytest.param((d, w.double(), b, s, dd, sd), TypeError, "pw_weight must have dtype in \\(float32\\)",
                     id="weight_dtype"),
        pytest.param((d, w, b.to("meta"), s, dd, sd), ValueError, "pw_bias must be on cpu", id="bias_device"),
        pytest.param((d, w, b, s[:, :2], dd, sd), ValueError, "semantic must have batch and channels", id="channels"),
        pytest.param((d, w, b, s, dd, sd[..., :1]), ValueError, "semantic_down must have spatial size", id="low_size"),
        pytest.param((d.long(), w, b, s, dd, sd), TypeError, "detail_dw must have dtype", id="int_dtype"),
        pytest.param((d, w, b, s, [1.0], sd), TypeError, "detail_down must be a torch.Tensor", id="not_tensor"),
        pytest.param((d[..., :0], w, b, s, dd, sd), ValueError, "bga_pointwise_aggregate: spatial sizes must be",
                     id="empty"),
    ]


@pytest.mark.parametrize("impl", ["eager", "cpp"])
@pytest.mark.parametrize("args, error, message", bad_cases())
def test_bad_input_raises_clear_error(impl, args, error, message):
    with bf.backends.use(impl), pytest.raises(error, match=message):
        bf.ops.bga_pointwise_aggregate(*args)


@pytest.mark.parametrize("impl", ["eager", "cpp"])
def test_refuses_grad(impl):
    d, w, b, s, dd, sd = make_inputs((1, 3, 6, 6, 2, 2))
    with bf.backends.use(impl), pytest.raises(RuntimeError, match="inference-only"):
        bf.ops.bga_pointwise_aggregate(d, w.requires_grad_(), b, s, dd, sd)


def test_cpp_op_checks_its_own_inputs():
    """Called directly (bypassing the front), the kernel still refuses bad input."""
    d, w, b, s, dd, sd = make_inputs((2, 3, 8, 8, 2, 2))
    with pytest.raises(RuntimeError, match=r"pw_weight must be \(3, 3\)"):
        torch.ops.bisenet_fast.bga_pointwise_aggregate(d, w[:2], b, s, dd, sd)
    with pytest.raises(RuntimeError, match="pw_bias must have dtype"):
        torch.ops.bisenet_fast.bga_pointwise_aggregate(d, w, b.double(), s, dd, sd)
    with pytest.raises(RuntimeError, match="inference-only"):
        torch.ops.bisenet_fast.bga_pointwise_aggregate(d, w.requires_grad_(), b, s, dd, sd)
    for index, name in ((3, "semantic"), (4, "detail_down"), (5, "semantic_down")):
        args = [d, w.detach(), b, s, dd, sd]
        args[index] = args[index].clone().requires_grad_()
        with pytest.raises(RuntimeError, match=f"inference-only .* {name} requires grad"):
            torch.ops.bisenet_fast.bga_pointwise_aggregate(*args)


@requires_triton
def test_triton_op_checks_its_own_inputs():
    d, w, b, s, dd, sd = make_inputs((2, 3, 8, 8, 2, 2), device=triton_device())
    with torch.no_grad(), pytest.raises(ValueError, match=r"pw_weight must have shape \(3, 3\)"):
        torch.ops.bisenet_fast_triton.bga_pointwise_aggregate(d, w[:, :2], b, s, dd, sd)


@requires_triton
def test_triton_rejects_float64():
    inputs = make_inputs((1, 2, 4, 4, 2, 2), dtype=torch.float64, device=triton_device())
    with bf.backends.use("triton"), pytest.raises(TypeError, match="backend 'triton' takes float32"):
        bf.ops.bga_pointwise_aggregate(*inputs)


def test_cuda_backend_is_refused_clearly():
    """There is no CUDA C++ kernel; forcing 'cuda' says so instead of running something else."""
    d, w, b, s, dd, sd = make_inputs((1, 2, 4, 4, 2, 2))
    if "cuda" not in bf.backends.available():
        pytest.skip("needs the CUDA backend to be available to force it")
    with bf.backends.use("cuda"), pytest.raises(bf.backends.BackendUnavailableError):
        bf.ops.bga_pointwise_aggregate(*[t.cuda() for t in (d, w, b, s, dd, sd)])
