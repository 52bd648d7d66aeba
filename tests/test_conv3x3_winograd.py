"""The Winograd F(2x2, 3x3) and F(4x4, 3x3) conv (bisenet_fast.ops.conv3x3_winograd) against
F.conv2d on the untransformed weight, and its eager transcription against the same: odd
sizes that leave partial tiles, several tile blocks, channel counts that are not multiples
of the kernel's lane block, batch 1 and 3, layouts, bad input, the fake kernel under
torch.compile, and its use by model.fuse()."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bisenet_fast as bf
from bisenet_fast import ops
from bisenet_fast.models.fused import FusedConv
from tests.helpers import assert_fake_kernel_refuses_mixed_devices

# Output-scale-relative tolerances (dtype, tile): float64 checks the algebra, float32 its
# rounding; F(4x4)'s larger transform coefficients cost about an order of magnitude.
TOLERANCE = {(torch.float64, 2): 1e-12, (torch.float64, 4): 1e-12, (torch.float32, 2): 2e-6, (torch.float32, 4): 2e-5}


def make_inputs(n, cin, cout, height, width, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, height, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(cout, cin, 3, 3, generator=gen, dtype=torch.float64) * (9 * cin) ** -0.5
    bias = torch.randn(cout, generator=gen, dtype=torch.float64) * 0.1
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def direct_float64(x, weight, bias, relu):
    out = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    return F.relu(out) if relu else out


def assert_close_to_scale(actual, expected, rel):
    assert actual.shape == expected.shape
    assert actual.is_contiguous(memory_format=torch.channels_last)
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual.double() - expected).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x output scale {scale:.3g}"


def run(backend, x, weight, bias, relu, tile=4):
    with torch.no_grad(), bf.backends.use(backend):
        return ops.conv3x3_winograd(x, ops.winograd_weight(weight, tile), bias, relu=relu)


@pytest.mark.parametrize("backend", ["cpp", "eager"])
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(
    "n,cin,cout,height,width",
    [(1, 1, 1, 1, 1), (3, 3, 5, 2, 3), (1, 7, 9, 9, 13), (2, 16, 24, 5, 8), (1, 33, 17, 6, 7), (1, 64, 128, 11, 10)],
)
def test_matches_direct_conv(backend, tile, dtype, relu, n, cin, cout, height, width):
    x, weight, bias = make_inputs(n, cin, cout, height, width, dtype)
    out = run(backend, x, weight, bias, relu, tile)
    assert out.dtype == dtype
    assert_close_to_scale(out, direct_float64(x, weight, bias, relu), TOLERANCE[dtype, tile])


@pytest.mark.parametrize("tile", [2, 4])
def test_many_tile_blocks_with_a_partial_last_one(tile):
    # 3 images x 20 x 35 (tile 2) or 10 x 18 (tile 4) tiles: several blocks of the CPU
    # kernel, the last one partial, and blocks that straddle images.
    x, weight, bias = make_inputs(3, 8, 8, 39, 70)
    assert_close_to_scale(run("cpp", x, weight, bias, True, tile), direct_float64(x, weight, bias, True),
                          TOLERANCE[torch.float32, tile])


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts(layout):
    x, weight, bias = make_inputs(2, 6, 10, 7, 11)
    expected = direct_float64(x, weight, bias, False)
    packed = ops.winograd_weight(weight)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:  # non-contiguous views of bigger tensors, weights included
        x, packed, bias = (torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0] for t in (x, packed, bias))
        assert not x.is_contiguous() and not packed.is_contiguous()
    with torch.no_grad():
        out = ops.conv3x3_winograd(x, packed, bias)
    assert_close_to_scale(out, expected, TOLERANCE[torch.float32, 4])


def test_deterministic():
    x, weight, bias = make_inputs(2, 32, 48, 21, 37)
    assert torch.equal(run("cpp", x, weight, bias, True), run("cpp", x, weight, bias, True))


@pytest.mark.parametrize("tile", [2, 4])
def test_nan_is_never_lost(tile):
    # A NaN input makes every output of the tiles that read it NaN (the transforms mix a
    # whole tile): a superset of the direct conv's 3x3 neighbourhood, and nothing further.
    x, weight, bias = make_inputs(1, 4, 4, 13, 14)
    x[0, 0, 6, 7] = float("nan")
    out = run("cpp", x, weight, bias, True, tile)
    expected = direct_float64(x, weight, bias, True)
    assert out.isnan()[expected.isnan()].all()
    rows, cols = out.isnan()[0, 0].nonzero(as_tuple=True)
    assert (rows - 6).abs().max() <= tile and (cols - 7).abs().max() <= tile
    finite = ~out.isnan()
    assert_close_to_scale(out.where(finite, 0), expected.where(finite, 0), TOLERANCE[torch.float32, tile])


@pytest.mark.parametrize("tile,column", [(2, (0.0, 0.5, -0.5, 0.0)), (4, (0.0, -1 / 6, 1 / 6, 1 / 12, -1 / 12, 0.0))])
def test_winograd_weight_of_a_centre_tap(tile, column):
    # A 3x3 kernel that is 1 at the centre: G w G^T is the outer product of G's middle column.
    weight = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 1, 1] = 1.0
    column = torch.tensor(column, dtype=torch.float64)
    torch.testing.assert_close(ops.winograd_weight(weight, tile)[:, 0, 0], torch.outer(column, column).flatten(),
                               rtol=0, atol=1e-15)


# ---- Registration: schema, fake kernel, torch.compile ---------------------------------------


def test_opcheck():
    x, weight, bias = make_inputs(1, 4, 6, 5, 7)
    torch.library.opcheck(torch.ops.bisenet_fast.conv3x3_winograd.default, (x, ops.winograd_weight(weight), bias, True),
                          test_utils=("test_schema", "test_faketensor"))
    assert_fake_kernel_refuses_mixed_devices(torch.ops.bisenet_fast.conv3x3_winograd,
                                             (x, ops.winograd_weight(weight), bias, True))


def test_compile_fullgraph_uses_fake_kernel():
    torch._dynamo.reset()
    x, weight, bias = make_inputs(1, 4, 6, 5, 7)
    packed = ops.winograd_weight(weight)

    def block(x, packed, bias):
        return torch.ops.bisenet_fast.conv3x3_winograd(x, packed, bias, True) * 2.0

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x, packed, bias)
    assert_close_to_scale(out / 2.0, direct_float64(x, weight, bias, True), TOLERANCE[torch.float32, 4])


# ---- The fused model uses it ----------------------------------------------------------------


def test_fused_conv_runs_winograd_on_cpu_float32_only(monkeypatch):
    calls = []
    real = ops.conv3x3_winograd
    monkeypatch.setattr(ops, "conv3x3_winograd", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x, weight, bias = make_inputs(1, 64, 64, 9, 10)
    conv = FusedConv(weight, bias, padding=(1, 1), relu=True)
    narrow = FusedConv(weight[:16, :16], bias[:16], padding=(1, 1), relu=True)
    strided = FusedConv(weight, bias, stride=(2, 2), padding=(1, 1), relu=True)
    assert conv.winograd and not narrow.winograd and not strided.winograd
    expected = direct_float64(x, weight, bias, True)
    with torch.no_grad():
        assert_close_to_scale(conv(x), expected, TOLERANCE[torch.float32, conv.WINOGRAD_TILE])
        assert len(calls) == 1
        narrow(x[:, :16]), strided(x)
        with bf.backends.use("eager"):  # the eager backend is oneDNN's direct conv
            assert_close_to_scale(conv(x), expected, 1e-5)
        conv.to(torch.bfloat16)(x.bfloat16())
    assert len(calls) == 1


# ---- Bad input: the same clear error whatever the backend -----------------------------------


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_bad_inputs(backend):
    x, weight, bias = make_inputs(1, 4, 6, 5, 5)
    packed = ops.winograd_weight(weight)
    cases = [
        ((x[0], packed, bias), ValueError, "x must be 4-D"),
        ((x.half(), packed.half(), bias.half()), TypeError, "x must have dtype in \\(float32, float64\\)"),
        ((x, packed.double(), bias), TypeError, "packed_weight must have dtype in \\(float32\\)"),
        ((x, packed[:, :3], bias), ValueError, "packed_weight must have shape \\(16 or 36, 4, cout\\)"),
        ((x, packed[:25], bias), ValueError, "packed_weight must have shape \\(16 or 36, 4, cout\\)"),
        ((x, weight, bias), ValueError, "packed_weight must be 3-D"),
        ((x, packed, bias[:5]), ValueError, "bias must have shape \\(6,\\)"),
        ((x[:, :, :0], packed, bias), ValueError, "x must be non-empty"),
        ((x, packed.to("meta"), bias), ValueError, "packed_weight must be on cpu like the other inputs, got meta"),
        ((x, packed, bias.to("meta")), ValueError, "bias must be on cpu like the other inputs, got meta"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message), torch.no_grad(), bf.backends.use(backend):
            ops.conv3x3_winograd(*args)


def test_refuses_grad():
    x, weight, bias = make_inputs(1, 4, 6, 5, 5)
    with pytest.raises(RuntimeError, match="inference-only .* but bias requires grad"):
        ops.conv3x3_winograd(x, ops.winograd_weight(weight), bias.requires_grad_())


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_bad_options(backend):
    x, weight, bias = make_inputs(1, 4, 6, 5, 5)
    packed = ops.winograd_weight(weight)
    for relu in ("yes", None, 1):
        with torch.no_grad(), bf.backends.use(backend), pytest.raises(TypeError, match="relu must be a bool, got"):
            ops.conv3x3_winograd(x, packed, bias, relu=relu)
    for tile in (4.0, True, 3):
        with pytest.raises(ValueError, match=r"tile must be one of \(2, 4\), got"):
            ops.winograd_weight(weight, tile=tile)


def test_numpy_integer_tile():
    # a numpy integer is a tile like an int (refusing it read "tile must be one of (2, 4), got 4")
    weight = make_inputs(1, 4, 6, 5, 5)[1]
    assert torch.equal(ops.winograd_weight(weight, tile=np.int64(2)), ops.winograd_weight(weight, tile=2))


def test_bad_weight_to_pack():
    with pytest.raises(ValueError, match="weight must have shape \\(cout, cin, 3, 3\\)"):
        ops.winograd_weight(torch.ones(4, 4, 5, 5))
    with pytest.raises(TypeError, match="weight must have dtype"):
        ops.winograd_weight(torch.ones(4, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="tile must be one of \\(2, 4\\), got 3"):
        ops.winograd_weight(torch.ones(4, 4, 3, 3), tile=3)


def test_no_gpu_backend():
    x, weight, bias = make_inputs(1, 4, 6, 5, 5)
    for backend in bf.backends.available():
        if backend in ("cuda", "triton"):
            with pytest.raises(bf.backends.BackendUnavailableError, match="no .* kernel for this op"), bf.backends.use(backend):
                ops.conv3x3_winograd(x, ops.winograd_weight(weight), bias)


def test_cpp_kernel_checks_its_own_arguments():
    # Called directly (past the Python checks), the kernel still refuses what it cannot run.
    x, weight, bias = make_inputs(1, 4, 6, 5, 5)
    packed = ops.winograd_weight(weight)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        torch.ops.bisenet_fast.conv3x3_winograd(x.half(), packed.half(), bias.half(), False)
    with pytest.raises(RuntimeError, match="packed_weight must have shape \\(16 or 36, 4, cout\\)"):
        torch.ops.bisenet_fast.conv3x3_winograd(x, packed[:4], bias, False)
    with pytest.raises(RuntimeError, match="bias must have shape \\(6\\)"):
        torch.ops.bisenet_fast.conv3x3_winograd(x, packed, bias[:2], False)
    with pytest.raises(RuntimeError, match="conv3x3_winograd is inference-only .* x requires grad"):
        torch.ops.bisenet_fast.conv3x3_winograd(x.requires_grad_(), packed, bias, False)


def test_cpp_output_is_an_ordinary_tensor():
    """Not an inference tensor: usable in place and by autograd after a torch.no_grad() call."""
    x, weight, bias = make_inputs(1, 4, 6, 5, 5)
    with torch.no_grad():
        out = ops.conv3x3_winograd(x, ops.winograd_weight(weight), bias)
    assert not out.is_inference()
    scale = torch.ones_like(out, requires_grad=True)
    (out.relu_() * scale).sum().backward()
    assert torch.equal(scale.grad, out)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_weight_that_requires_grad_under_no_grad_with_threads(tile, mode):
    # A packed weight or bias that requires grad (an nn.Parameter) under no_grad or
    # inference_mode: the per-point GEMMs run in parallel_for's worker threads, which do not
    # inherit the caller's below-autograd dispatch guard, and used to raise "mm(): functions
    # with out=... arguments don't support automatic differentiation" there, only with more
    # than one thread.
    x, weight, bias = make_inputs(2, 3, 5, 32, 32)
    packed = torch.nn.Parameter(ops.winograd_weight(weight, tile))
    bias_param = torch.nn.Parameter(bias.clone())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with mode(), bf.backends.use("cpp"):
            out = ops.conv3x3_winograd(x, packed, bias_param)
    finally:
        torch.set_num_threads(threads)
    assert_close_to_scale(out, direct_float64(x, weight, bias, False), TOLERANCE[(torch.float32, tile)])
