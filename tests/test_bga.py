"""bga_aggregate: every implementation against the eager reference, forward and backward."""
import pytest
import torch

import bisenet_fast as bf
from bisenet_fast.ops.bga import _bga_inputs_valid, bga_aggregate_reference
from tests.helpers import (
    assert_close_to_scale,
    assert_fake_kernel_refuses_mixed_devices,
    requires_cuda_build,
    requires_triton,
    triton_device,
)

# "cuda-emulated": the CUDA kernels' own source run on the CPU by tests/cuda_emulation
# (blocks of fibers, shared memory NaN-filled), on a GPU of 132 SMs (an H200) unless a test
# says otherwise; not selected by the GPU runs' "not emulated".
EMULATED_CUDA = "cuda-emulated"
IMPLS = [
    pytest.param("cpp", id="cpp"),
    pytest.param(EMULATED_CUDA, id=EMULATED_CUDA),
    pytest.param("triton", id="triton", marks=requires_triton),
    pytest.param("cuda", id="cuda", marks=requires_cuda_build),
]

# (N, C, H, W, h, w): the high-res detail size and the low-res size of the other three.
SHAPES = [
    pytest.param((1, 3, 16, 24, 4, 6), id="ratio4"),
    pytest.param((2, 4, 17, 23, 5, 3), id="odd"),
    # 1/8 is not 4x 1/32 (spec §2.4); the Triton interpreter runs them on one plane.
    pytest.param((2, 3, 129, 257, 33, 65), id="spec_1025x2049"),
    pytest.param((1, 2, 125, 125, 32, 32), id="spec_1000x1000"),
    pytest.param((2, 3, 5, 7, 9, 3), id="low_larger_than_high"),
    pytest.param((3, 2, 8, 6, 1, 1), id="low_1x1"),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]

# Tolerances against the reference run in float32 on the same (rounded) inputs. The kernels
# compute the bilinear source coordinate as ATen writes it, scale * (dst + 0.5) - 0.5 in
# float32, but ATen's AVX2/AVX512 and CUDA builds contract it into one fma: one ulp of a
# coordinate near 64 times a low-res step of ~8 is ~3e-5 in the output, hence atol 1e-4 at
# the 257-column sizes (an indexing bug is off by O(1)). float16/bfloat16 differ from the
# float32 reference by about one rounding of the output.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def device_of(impl):
    return {"cpp": "cpu", EMULATED_CUDA: "cpu", "triton": triton_device(), "cuda": "cuda"}[impl]


def in_layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor: no layout is contiguous
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def make_inputs(shape, dtype=torch.float32, device="cpu", layout="contiguous", seed=0):
    n, c, H, W, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    detail = torch.randn(n, c, H, W, generator=gen)
    low = [2 * torch.randn(n, c, h, w, generator=gen) for _ in range(3)]  # logits past sigmoid's linear range
    return [in_layout(t.to(dtype=dtype, device=device), layout) for t in (detail, *low)]


def run(impl, inputs, grad_out, sm_count=132):
    """Output and the four input gradients of backend `impl` (sm_count: the emulated GPU's)."""
    if impl == EMULATED_CUDA:
        from tests import cuda_emulation

        module = cuda_emulation.bga()
        return module.forward(*inputs, sm_count), module.backward(grad_out, *inputs, sm_count)
    leaves = [t.detach().requires_grad_() for t in inputs]
    with bf.backends.use(impl):
        out = bf.ops.bga_aggregate(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads


def reference_in_math_type(inputs, grad_out):
    """The eager reference in float32 (float64 for float64 inputs), on the CPU."""
    math_type = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    leaves = [t.detach().cpu().to(math_type).requires_grad_() for t in inputs]
    out = bga_aggregate_reference(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out.cpu().to(math_type))


def assert_close_to_reference(impl, inputs, grad_out, tol, **run_kwargs):
    out, grads = run(impl, inputs, grad_out, **run_kwargs)
    ref_out, ref_grads = reference_in_math_type(inputs, grad_out)
    assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
    torch.testing.assert_close(out.cpu().to(ref_out.dtype), ref_out, **tol)
    for name, g, r, x in zip(("detail", "semantic", "detail_down", "semantic_down"), grads, ref_grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        torch.testing.assert_close(g.cpu().to(r.dtype), r, **tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_float32(impl, shape):
    if impl == "triton" and triton_device() == "cpu" and shape[2] * shape[3] > 10_000:
        shape = (1, 1, *shape[2:])  # the spec's sizes on one plane: the interpreter takes ~30 s for it
    inputs = make_inputs(shape, device=device_of(impl))
    grad_out = torch.randn(inputs[0].shape, device=device_of(impl))
    assert_close_to_reference(impl, inputs, grad_out, TOLERANCES[torch.float32])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(impl, layout):
    inputs = make_inputs((2, 5, 11, 13, 3, 4), device=device_of(impl), layout=layout)
    grad_out = in_layout(torch.randn(inputs[0].shape, device=device_of(impl)), layout)
    assert_close_to_reference(impl, inputs, grad_out, TOLERANCES[torch.float32])
    out, _ = run(impl, inputs, grad_out)
    # The output keeps detail's memory format (channels_last stays channels_last).
    want_channels_last = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last if want_channels_last else torch.contiguous_format)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("detail_layout", ["channels_last", "contiguous"])
def test_mixed_layouts(impl, detail_layout):
    """Low-res maps in another layout than detail still give the right answer."""
    other = "contiguous" if detail_layout == "channels_last" else "channels_last"
    inputs = make_inputs((2, 3, 9, 10, 3, 3), device=device_of(impl), layout=other)
    inputs[0] = in_layout(inputs[0], detail_layout)
    grad_out = torch.randn(inputs[0].shape, device=device_of(impl))
    assert_close_to_reference(impl, inputs, grad_out, TOLERANCES[torch.float32])


@pytest.mark.parametrize("namespace", ["bisenet_fast", pytest.param("bisenet_fast_triton", marks=requires_triton)])
@pytest.mark.parametrize("detail_layout", ["channels_last", "contiguous"])
def test_backward_fake_with_mixed_layouts(namespace, detail_layout):
    """The fake kernels give each gradient the layout the kernels do, detail's and the low-res maps' differing."""
    device = triton_device() if namespace == "bisenet_fast_triton" else "cpu"
    other = "contiguous" if detail_layout == "channels_last" else "channels_last"
    detail, *low = make_inputs((2, 3, 9, 10, 3, 3), device=device, layout=other)
    detail = in_layout(detail, detail_layout)
    grad_out = in_layout(torch.randn(detail.shape, device=device), detail_layout)
    op = getattr(torch.ops, namespace).bga_aggregate_backward.default
    torch.library.opcheck(op, (grad_out, detail, *low), test_utils=("test_faketensor",))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
# ratio 8: each low-res gradient sums ~64 high-res terms, which a 16-bit accumulator would round.
@pytest.mark.parametrize("shape", [(2, 3, 17, 20, 5, 5), (1, 2, 64, 64, 8, 8)], ids=["odd", "ratio8"])
def test_low_precision(impl, dtype, layout, shape):
    inputs = make_inputs(shape, dtype=dtype, device=device_of(impl), layout=layout)
    grad_out = torch.randn(inputs[0].shape, device=device_of(impl)).to(dtype)
    assert_close_to_reference(impl, inputs, grad_out, TOLERANCES[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_gated_term_rounds_once(impl, dtype):
    """With detail = 0 the output is up(detail_down * sigmoid(semantic_down)) alone: computed in
    float32 and rounded once to the output dtype, within 2 ulp of the float32 result (an
    intermediate rounded to 16 bits, which the general tolerance would let pass, is off by 8-22)."""
    inputs = make_inputs((2, 3, 17, 20, 5, 5), dtype=dtype, device=device_of(impl))
    inputs[0] = torch.zeros_like(inputs[0])
    out, _ = run(impl, inputs, torch.zeros_like(inputs[0]))
    expected = bga_aggregate_reference(*(t.float() for t in inputs))
    ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(2**-6)
    assert ((out.float() - expected).abs() <= 2 * ulp).all()


def off_alignment(t):
    """t's values and strides in storage one element past a 16-byte boundary."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    shifted = storage.as_strided(t.shape, t.stride())
    shifted.copy_(t)
    return shifted


@pytest.mark.parametrize("impl", [pytest.param(EMULATED_CUDA, id=EMULATED_CUDA),
                                  pytest.param("cuda", id="cuda", marks=requires_cuda_build)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_cuda_forward_wide_and_unaligned(impl, dtype, layout, aligned):
    """16 channels and 40 columns: each thread of the CUDA forward computes 16 bytes of output
    (a pixel's channels in channels_last, a row's pixels in NCHW); the same tensors off
    16-byte alignment take the one-value-per-thread kernel. Both match the reference."""
    inputs = make_inputs((2, 16, 24, 40, 7, 11), dtype=dtype, device=device_of(impl), layout=layout)
    if not aligned:
        inputs = [off_alignment(t) for t in inputs]
        assert inputs[0].data_ptr() % 16 != 0
    grad_out = in_layout(torch.randn(inputs[0].shape, device=device_of(impl)).to(dtype), layout)
    assert_close_to_reference(impl, inputs, grad_out, TOLERANCES[dtype])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_emulated_grid_stride_loops(layout):
    """On a GPU of one SM the gating and backward grids are capped at 32 blocks, so each
    thread walks several values."""
    inputs = make_inputs((2, 16, 24, 40, 7, 11), layout=layout)
    grad_out = in_layout(torch.randn(inputs[0].shape), layout)
    assert_close_to_reference(EMULATED_CUDA, inputs, grad_out, TOLERANCES[torch.float32], sm_count=1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 2, 7, 9, 3, 4), (2, 2, 6, 5, 4, 2)], ids=["up", "mixed"])
def test_gradcheck_cpp_float64(shape, layout):
    inputs = [t.requires_grad_() for t in make_inputs(shape, dtype=torch.float64, layout=layout)]
    with bf.backends.use("cpp"):
        assert torch.autograd.gradcheck(bf.ops.bga_aggregate, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_cpp_float64_matches_reference():
    inputs = make_inputs((2, 3, 19, 21, 5, 6), dtype=torch.float64)
    grad_out = torch.randn(inputs[0].shape, dtype=torch.float64)
    # The taps are float64 as ATen's float64 upsample's (bilinear.h): only rounding differs.
    assert_close_to_reference("cpp", inputs, grad_out, dict(atol=1e-12, rtol=1e-12))


def test_opcheck_cpp():
    inputs = make_inputs((2, 3, 9, 11, 3, 4))
    torch.library.opcheck(torch.ops.bisenet_fast.bga_aggregate.default, tuple(t.requires_grad_() for t in inputs))
    grad_out = torch.randn(inputs[0].shape)
    torch.library.opcheck(
        torch.ops.bisenet_fast.bga_aggregate_backward.default, (grad_out, *[t.detach() for t in inputs])
    )
    assert_fake_kernel_refuses_mixed_devices(torch.ops.bisenet_fast.bga_aggregate, inputs)
    assert_fake_kernel_refuses_mixed_devices(torch.ops.bisenet_fast.bga_aggregate_backward, (grad_out, *inputs))


@requires_triton
def test_opcheck_triton():
    inputs = make_inputs((1, 2, 9, 7, 3, 2), device=triton_device())
    torch.library.opcheck(torch.ops.bisenet_fast_triton.bga_aggregate.default, tuple(t.requires_grad_() for t in inputs))
    assert_fake_kernel_refuses_mixed_devices(torch.ops.bisenet_fast_triton.bga_aggregate, inputs)
    grad_out = torch.randn(inputs[0].shape, device=inputs[0].device)
    assert_fake_kernel_refuses_mixed_devices(torch.ops.bisenet_fast_triton.bga_aggregate_backward, (grad_out, *inputs))


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic(impl):
    inputs = make_inputs((2, 3, 33, 31, 9, 8), device=device_of(impl))
    grad_out = torch.randn(inputs[0].shape, device=device_of(impl))
    first = run(impl, inputs, grad_out)
    second = run(impl, inputs, grad_out)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpp_backward_independent_of_thread_count(layout):
    """The band scheme changes with the thread count; the sums and their order must not."""
    inputs = make_inputs((1, 2, 45, 37, 12, 10), layout=layout)
    grad_out = torch.randn(inputs[0].shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.bisenet_fast.bga_aggregate_backward(grad_out, *inputs)
        torch.set_num_threads(max(2, threads))
        multi = torch.ops.bisenet_fast.bga_aggregate_backward(grad_out, *inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


def test_torch_compile_cpp_fullgraph():
    """The fake kernels and the autograd registration carry the op through torch.compile."""
    inputs = make_inputs((2, 3, 10, 12, 3, 4))
    leaves = [t.detach().requires_grad_() for t in inputs]

    def gated(d, s, dd, sd):
        return torch.ops.bisenet_fast.bga_aggregate(d * 2.0, s, dd, sd).relu()

    compiled = torch.compile(gated, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    expected_leaves = [t.detach().requires_grad_() for t in inputs]
    expected = bga_aggregate_reference(expected_leaves[0] * 2.0, *expected_leaves[1:]).relu()
    expected_grads = torch.autograd.grad(expected.sum(), expected_leaves)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)


# --- non-finite values, broadcast views, empty batches, grad_out layouts --------------------


@pytest.mark.parametrize("impl", IMPLS)
# An axis that keeps its size reads its own index twice (weights 1 and 0), as ATen's CPU
# kernels do: not a zero-weight neighbour, whose NaN would leak; an inf there becomes NaN.
@pytest.mark.parametrize("shape", [(2, 3, 8, 8, 2, 2), (2, 3, 4, 4, 4, 4), (2, 3, 4, 8, 4, 2)],
                         ids=["upsampled", "same-size", "same-height"])
def test_nan_and_inf_propagate_as_in_the_reference(impl, shape):
    inputs = make_inputs(shape, device=device_of(impl))
    for t, index, value in zip(inputs, [(0, 0, 1, 1), (1, 1, 0, 0), (0, 2, 1, 1), (1, 0, 1, 0)],
                               [float("nan"), float("inf"), float("-inf"), float("nan")]):
        t[index] = value
    out, _ = run(impl, inputs, torch.ones_like(inputs[0]))
    expected = bga_aggregate_reference(*(t.cpu() for t in inputs))
    assert expected.isnan().any() and (expected.isinf().any() or shape[2] == shape[4])
    assert torch.equal(out.isnan().cpu(), expected.isnan()) and torch.equal(out.isinf().cpu(), expected.isinf())


@pytest.mark.parametrize("impl", ["cpp", pytest.param("triton", marks=requires_triton)])
def test_broadcast_inputs_and_grad_out_layouts(impl):
    """Stride-0 (expanded) inputs, and a grad_out in another layout than detail's."""
    device = device_of(impl)
    gen = torch.Generator().manual_seed(3)
    detail = torch.randn(1, 3, 1, 8, generator=gen).to(device).expand(2, 3, 8, 8)
    low = [torch.randn(1, 3, 2, 2, generator=gen).to(device).expand(2, 3, 2, 2) for _ in range(3)]
    grad_out = torch.randn(2, 3, 8, 8, generator=gen).to(device)
    for g in (grad_out, grad_out.contiguous(memory_format=torch.channels_last), grad_out.transpose(2, 3).mT):
        assert_close_to_reference(impl, [detail, *low], g, TOLERANCES[torch.float32])


@pytest.mark.parametrize("impl", ["eager", "cpp"])
def test_empty_batch(impl):
    inputs = [t.requires_grad_() for t in make_inputs((0, 3, 8, 8, 2, 2))]
    with bf.backends.use(impl):
        out = bf.ops.bga_aggregate(*inputs)
    assert out.shape == (0, 3, 8, 8)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    assert [g.shape for g in grads] == [t.shape for t in inputs]


# --- bad input --------------------------------------------------------------------------


def bad_cases():
    good = make_inputs((2, 3, 8, 8, 2, 2))
    d, s, dd, sd = good
    return [
        pytest.param((d[0], s, dd, sd), ValueError, "detail must be 4-D", id="detail_rank"),
        pytest.param((d, s[:, :2], dd, sd), ValueError, "semantic must have batch and channels", id="channels"),
        pytest.param((d, s, dd[:1], sd), ValueError, "detail_down must have batch and channels", id="batch"),
        pytest.param((d, s, dd, sd[..., :1]), ValueError, "semantic_down must have spatial size", id="low_size"),
        pytest.param((d, s.double(), dd, sd), TypeError, "semantic must have dtype in \\(float32\\)", id="dtype_mix"),
        pytest.param((d.long(), s, dd, sd), TypeError, "detail must have dtype", id="int_dtype"),
        pytest.param((d, s.to("meta"), dd, sd), ValueError, "semantic must be on cpu", id="device_mix"),
        pytest.param((d, s, [1.0], sd), TypeError, "detail_down must be a torch.Tensor", id="not_tensor"),
        pytest.param((d[..., :0], s, dd, sd), ValueError, "spatial sizes must be non-empty", id="empty"),
        pytest.param(tuple(t[:, :0] for t in good), ValueError, "detail must have at least one channel",
                     id="no_channels"),
        pytest.param((d, s, dd[0], sd), ValueError, "detail_down must be 4-D", id="low_rank"),
        pytest.param((d, s, dd.double(), sd), TypeError, "detail_down must have dtype", id="dtype_mix_down"),
        pytest.param((d, s, dd, sd.to("meta")), ValueError, "semantic_down must be on cpu", id="device_mix_down"),
        pytest.param((d, s[..., :0], dd[..., :0], sd[..., :0]), ValueError, "spatial sizes must be non-empty",
                     id="low_empty"),
    ]


@pytest.mark.parametrize("impl", ["eager", "cpp"])
@pytest.mark.parametrize("args, error, message", bad_cases())
def test_bad_input_raises_clear_error(impl, args, error, message):
    with bf.backends.use(impl), pytest.raises(error, match=message):
        bf.ops.bga_aggregate(*args)


@pytest.mark.parametrize("args, error, message", bad_cases())
def test_fast_validity_check_refuses_every_bad_input(args, error, message):
    """The one-expression check that lets good calls skip the detailed checks passes none of
    the bad ones."""
    assert not _bga_inputs_valid(*args)


def test_fast_validity_check_passes_good_inputs():
    d, s, dd, sd = make_inputs((2, 3, 8, 8, 2, 2))
    channels_last = [t.contiguous(memory_format=torch.channels_last) for t in (d, s, dd, sd)]
    for args in ((d, s, dd, sd), channels_last, (d[:0], s[:0], dd[:0], sd[:0]), (d[..., ::2], s, dd, sd)):
        assert _bga_inputs_valid(*args)


@pytest.mark.parametrize("impl", ["cpp", pytest.param("cuda", marks=requires_cuda_build)])
def test_op_checks_its_own_inputs(impl):
    """Called directly (bypassing the front), the kernel still refuses bad shapes."""
    d, s, dd, sd = make_inputs((2, 3, 8, 8, 2, 2), device=device_of(impl))
    with pytest.raises(RuntimeError, match="semantic_down must have the spatial size of semantic"):
        torch.ops.bisenet_fast.bga_aggregate(d, s, dd, sd[..., :1])
    with pytest.raises(RuntimeError, match="grad_out must have the shape of detail"):
        torch.ops.bisenet_fast.bga_aggregate_backward(d[:, :, :4], d, s, dd, sd)


def test_cuda_emulated_refuses_a_height_beyond_its_grid():
    """The CUDA forward's rows take the grid's y (at most 65535): bga_host.h's own check."""
    from tests import cuda_emulation

    inputs = make_inputs((1, 1, 65536, 1, 2, 1))
    with pytest.raises(RuntimeError, match=r"detail rows must hold < 2\^31 values and be <= 65535, got \[1, 1, 65536, 1\]"):
        cuda_emulation.bga().forward(*inputs, 132)


@requires_triton
def test_triton_op_checks_its_own_inputs():
    d, s, dd, sd = make_inputs((2, 3, 8, 8, 2, 2), device=triton_device())
    with pytest.raises(ValueError, match=r"detail_down must have batch and channels \(2, 3\)"):
        torch.ops.bisenet_fast_triton.bga_aggregate(d, s, dd[:, :1], sd)
    with pytest.raises(ValueError, match="grad_out must have the shape of detail"):
        torch.ops.bisenet_fast_triton.bga_aggregate_backward(d[:, :, :4], d, s, dd, sd)


@pytest.mark.parametrize("impl", ["cpp", pytest.param("triton", marks=requires_triton)])
def test_double_backward_raises(impl):
    """The fused backward has no backward of its own: a second derivative is an error, not zeros."""
    inputs = [t.requires_grad_() for t in make_inputs((1, 2, 5, 7, 3, 2), device=device_of(impl))]
    with bf.backends.use(impl):
        out = bf.ops.bga_aggregate(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="has no second derivative"):
        torch.autograd.grad(grads[1].sum(), inputs)


@requires_triton
def test_triton_rejects_float64():
    inputs = make_inputs((1, 2, 4, 4, 2, 2), dtype=torch.float64, device=triton_device())
    with bf.backends.use("triton"), pytest.raises(TypeError, match="backend 'triton' takes float32"):
        bf.ops.bga_aggregate(*inputs)


@requires_triton
def test_triton_forward_loops_over_planes_beyond_the_grid(monkeypatch):
    """More planes (N*C in NCHW) than a grid's z extent: each program walks several. Shown
    with the bound lowered to 2, as 65536 real planes are too slow for the interpreter."""
    from bisenet_fast.triton_kernels import bga as bga_triton

    monkeypatch.setattr(bga_triton, "MAX_GRID_Z", 2)
    inputs = make_inputs((1, 5, 6, 7, 2, 3), device=triton_device())
    with torch.no_grad(), bf.backends.use("triton"):
        out = bf.ops.bga_aggregate(*inputs)
    torch.testing.assert_close(out, bga_aggregate_reference(*inputs), **TOLERANCES[torch.float32])


@requires_triton
def test_triton_rejects_a_height_beyond_its_grid():
    inputs = make_inputs((1, 1, 65536, 1, 2, 1), device=triton_device())
    with bf.backends.use("triton"), pytest.raises(ValueError, match="detail's height 65536 would need 65536 programs along one launch axis, which CUDA bounds by 65535"):
        bf.ops.bga_aggregate(*inputs)
    from bisenet_fast.triton_kernels.bga import check_forward_sizes

    check_forward_sizes(torch.empty(1, 1, 65535, 1, device="meta"), channels_last=False)  # the largest that launches


@requires_triton
def test_triton_rejects_a_row_beyond_32_bit_positions(monkeypatch):
    """Rows hold W values (W * C in channels_last); checked before the op copies anything."""
    from bisenet_fast.triton_kernels.bga import check_forward_sizes

    monkeypatch.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("copied before the size check"))
    device = triton_device()
    detail = torch.zeros(1, 1, 1, 1, device=device).expand(1, 1, 1, 2**31)  # a view: nothing allocated
    low = torch.zeros(1, 1, 1, 1, device=device)
    with torch.no_grad(), pytest.raises(ValueError, match=r"a row of detail holds 2147483648 values .* 2\*\*31"):
        torch.ops.bisenet_fast_triton.bga_aggregate(detail, low, low, low)
    channels_last = torch.empty(1, 2**16, 1, 2**15, device="meta", memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"holds 2147483648 values \(shape \(1, 65536, 1, 32768\), channels_last\)"):
        check_forward_sizes(channels_last, channels_last=True)
    check_forward_sizes(channels_last, channels_last=False)  # NCHW rows of 32768 values are fine


@requires_triton
def test_triton_rejects_a_semantic_row_beyond_32_bit_positions(monkeypatch):
    """The forward's bilinear taps address a row of semantic (and of gated, its size) with
    32-bit positions too, and semantic may be wider than detail: a row of 2**31 values there
    is refused like one of detail, before the op copies anything, not read at wrapped
    (negative) offsets."""
    from bisenet_fast.triton_kernels.bga import check_forward_sizes

    monkeypatch.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("copied before the size check"))
    device = triton_device()
    detail = torch.zeros(1, 1, 1, 1, device=device)
    wide = torch.zeros(1, 1, 1, 1, device=device).expand(1, 1, 1, 2**31)  # a view: nothing allocated
    with torch.no_grad(), pytest.raises(ValueError, match=r"a row of semantic holds 2147483648 values .* 2\*\*31"):
        torch.ops.bisenet_fast_triton.bga_aggregate(detail, wide, wide, wide)
    detail = torch.empty(1, 128, 4, 4, device="meta", memory_format=torch.channels_last)
    semantic = torch.empty(1, 128, 1, 2**24, device="meta", memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"semantic holds 2147483648 values \(shape \(1, 128, 1, 16777216\), channels_last"):
        check_forward_sizes(detail, True, semantic)
    check_forward_sizes(detail, False, semantic)  # NCHW rows of 2**24 values are fine


# --- the model ----------------------------------------------------------------------------


def backbone_outputs_and_grads(dtype):
    """{backend: (the backbone's outputs, each parameter's gradient)} for eager and cpp on one
    training step of a model and batch drawn alike."""
    torch.manual_seed(0)
    model = bf.BiSeNetV2().to(dtype).train()
    x = torch.randn(2, 3, 64, 96, dtype=dtype)  # batch 2: CEBlock batch-norms a 1x1 pooled map in training
    results = {}
    for impl in ("eager", "cpp"):
        model.zero_grad()
        with bf.backends.use(impl):
            outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        results[impl] = ([o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters()})
    return results


def test_backbone_cpp_matches_eager():
    """BGALayer runs the fused op; the backbone's outputs and parameter gradients match eager."""
    results = backbone_outputs_and_grads(torch.float32)
    for a, b in zip(results["eager"][0], results["cpp"][0]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results["cpp"][1][name], grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_backbone_cpp_matches_eager_to_rounding_in_float64():
    """float64 as a tight oracle for the whole backbone: the fused BGA's taps are float64 as
    ATen's float64 upsample's, so only rounding separates the two."""
    results = backbone_outputs_and_grads(torch.float64)
    for a, b in zip(results["eager"][0], results["cpp"][0]):
        assert_close_to_scale(b, a, 1e-12, "output")
    # Some gradients are sums that cancel to rounding noise (a bias before a conv and a
    # training-mode BN): the absolute bar is set by the largest gradient.
    largest = max(g.abs().max().item() for g in results["eager"][1].values())
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results["cpp"][1][name], grad, rtol=1e-9, atol=1e-12 * largest,
                                   msg=lambda m: f"{name}: {m}")


# ---- CUDA emulation: cases a mutation run of the CUDA kernels showed untested


@pytest.mark.parametrize("dtype, channels", [(torch.float32, 3), (torch.float32, 6), (torch.float16, 4),
                                             (torch.bfloat16, 12)])
def test_cuda_emulated_channels_last_row_divisible_but_channels_not(dtype, channels):
    """channels_last with a row of W * C values divisible by the 16-byte vector width while C
    is not (float32: 3 x 20 = 60, 6 x 20; 16-bit: 4 x 20 = 80, 12 x 20): a vector would span two
    pixels, so the forward must take the one-value-per-thread kernel (wide needs C % kWide == 0)."""
    inputs = make_inputs((2, channels, 17, 20, 5, 5), dtype=dtype, layout="channels_last")
    assert (20 * channels * inputs[0].element_size()) % 16 == 0
    grad_out = in_layout(torch.randn(inputs[0].shape).to(dtype), "channels_last")
    assert_close_to_reference(EMULATED_CUDA, inputs, grad_out, TOLERANCES[dtype])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_emulated_grid_stride_loops_do_loop(layout):
    """sm_count=1 caps the gating and backward grids at 32 blocks x 256 threads = 8192: with
    2 x 16 x 24 x 22 = 16896 low-resolution values each thread walks 3 of them. (The existing
    grid-stride test has 2464 values, fewer than one capped grid, so its loops never step.)"""
    inputs = make_inputs((2, 16, 48, 64, 24, 22), layout=layout)
    assert inputs[1].numel() > 2 * 32 * 256
    grad_out = in_layout(torch.randn(inputs[0].shape), layout)
    assert_close_to_reference(EMULATED_CUDA, inputs, grad_out, TOLERANCES[torch.float32], sm_count=1)


def test_cuda_emulated_more_planes_than_grid_z():
    """NCHW with N x C = 65537 planes: the forward's grid z is capped at 65535, so blocks
    z = 0 and 1 also take planes 65535 and 65536 (its plane loop)."""
    inputs = make_inputs((1, 65537, 2, 2, 1, 1))
    grad_out = torch.randn(inputs[0].shape)
    assert_close_to_reference(EMULATED_CUDA, inputs, grad_out, TOLERANCES[torch.float32], sm_count=132)
