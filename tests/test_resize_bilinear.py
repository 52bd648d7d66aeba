"""bisenet_fast.ops.resize_bilinear (the fused model's final resize of the logits) against
F.interpolate: up- and downsampling, ratios that are not integers, layouts, dtypes, bad
input, the fake kernel under torch.compile, and its use by the fused segmentor."""
import pytest
import torch
import torch.nn.functional as F

import bisenet_fast as bf
from bisenet_fast import ops

TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # of the output's scale


def interpolate(x, size):
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)


def assert_close_to_scale(actual, expected, rel):
    assert actual.shape == expected.shape
    assert actual.is_contiguous()
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual.float() - expected).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x output scale {scale:.3g}"


def run(backend, x, size):
    with torch.no_grad(), bf.backends.use(backend):
        return ops.resize_bilinear(x, size)


@pytest.mark.parametrize("backend", ["cpp", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,size",
    [((1, 19, 8, 16), (64, 128)), ((3, 2, 9, 13), (67, 101)), ((1, 3, 5, 7), (3, 4)), ((2, 1, 1, 1), (4, 5)),
     ((1, 4, 6, 6), (6, 6)), ((1, 2, 3, 40), (17, 9))],
)
def test_matches_interpolate(backend, dtype, shape, size):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = run(backend, x, size)
    assert out.dtype == dtype
    assert_close_to_scale(out, interpolate(x, size), TOLERANCE[dtype])


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts(layout):
    x = torch.randn(2, 5, 7, 11, generator=torch.Generator().manual_seed(1))
    expected = interpolate(x, (30, 41))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)[..., 0]
        assert not x.is_contiguous()
    assert_close_to_scale(run("cpp", x, (30, 41)), expected, TOLERANCE[torch.float32])


# (3, 4) itself and one kept axis: an axis that keeps its size reads no zero-weight neighbour.
@pytest.mark.parametrize("size", [(7, 9), (3, 4), (3, 9), (7, 4)])
def test_nan_inf_and_broadcast_inputs_as_interpolate(size):
    x = torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(4))
    x[0, 0, 1, 1], x[0, 1, 1, 2] = float("nan"), float("inf")
    out, expected = run("cpp", x, size), interpolate(x, size)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
    expanded = torch.randn(1, 2, 1, 4, generator=torch.Generator().manual_seed(5)).expand(3, 2, 3, 4)
    assert_close_to_scale(run("cpp", expanded, size), interpolate(expanded, size), TOLERANCE[torch.float32])


def test_deterministic():
    x = torch.randn(1, 19, 16, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(run("cpp", x, (128, 256)), run("cpp", x, (128, 256)))


def test_opcheck():
    x = torch.randn(1, 3, 5, 6)
    torch.library.opcheck(torch.ops.bisenet_fast.resize_bilinear.default, (x, [11, 13]),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_uses_fake_kernel():
    torch._dynamo.reset()
    x = torch.randn(1, 3, 5, 6)

    def block(x):
        return torch.ops.bisenet_fast.resize_bilinear(x, [11, 13]) * 2.0

    with torch.no_grad():
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    assert_close_to_scale(out / 2.0, interpolate(x, (11, 13)), TOLERANCE[torch.float32])


def test_compile_keeps_the_size_symbolic():
    """Under dynamic shapes the output size stays symbolic, as F.interpolate's does: one
    graph serves every input size, and the public front's checks trace through."""
    torch._dynamo.reset()

    def double(x):
        return ops.resize_bilinear(x, (x.shape[-2] * 2, x.shape[-1] * 2))

    compiled = torch.compile(double, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for shape in ((2, 2, 5, 7), (2, 2, 6, 9), (3, 3, 8, 11)):  # sizes 0 and 1 always specialise
            x = torch.randn(shape)
            assert_close_to_scale(compiled(x), interpolate(x, (shape[2] * 2, shape[3] * 2)), TOLERANCE[torch.float32])


def test_fused_segmentor_resizes_with_it_on_cpu(monkeypatch):
    calls = []
    real = ops.resize_bilinear
    monkeypatch.setattr(ops, "resize_bilinear", lambda x, size: calls.append(tuple(size)) or real(x, size))
    fused = bf.BiSeNetV2Segmentor(num_classes=4).eval().fuse()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = fused(x)
        with bf.backends.use("eager"):
            expected = fused(x)
    assert calls == [(64, 96)]
    assert_close_to_scale(out, expected, 1e-5)


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_bad_inputs(backend):
    x = torch.randn(1, 2, 3, 4)
    cases = [
        ((x[0], (5, 5)), ValueError, "x must be 4-D"),
        ((x.double(), (5, 5)), TypeError, "x must have dtype in \\(float32, float16, bfloat16\\)"),
        ((x[:, :, :0], (5, 5)), ValueError, "x must be non-empty"),
        ((x, (5,)), ValueError, "size must be two positive ints"),
        ((x, (5, 0)), ValueError, "size must be two positive ints"),
        ((x, (7.9, 5)), TypeError, "size must be two positive ints"),
        ((x, (True, 5)), TypeError, "size must be two positive ints"),
        ((x, 5), TypeError, "size must be two positive ints"),
        ((x, "ab"), TypeError, "size must be two positive ints"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message), torch.no_grad(), bf.backends.use(backend):
            ops.resize_bilinear(*args)


def test_refuses_grad():
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.resize_bilinear(torch.randn(1, 2, 3, 4, requires_grad=True), (5, 5))


def test_cpp_kernel_checks_its_own_arguments():
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        torch.ops.bisenet_fast.resize_bilinear(torch.randn(1, 2, 3, 4).double(), [5, 5])
    with pytest.raises(RuntimeError, match="x must be a non-empty 4-D"):
        torch.ops.bisenet_fast.resize_bilinear(torch.randn(2, 3, 4), [5, 5])
    with pytest.raises(RuntimeError, match="size must be two positive integers"):
        torch.ops.bisenet_fast.resize_bilinear(torch.randn(1, 2, 3, 4), [5, -1])
    with pytest.raises(RuntimeError, match="resize_bilinear is inference-only .* x requires grad"):
        torch.ops.bisenet_fast.resize_bilinear(torch.randn(1, 2, 3, 4, requires_grad=True), [5, 5])


def test_sizes_may_be_numpy_or_torch_integers():
    import numpy as np

    x = torch.randn(1, 2, 3, 4)
    with torch.no_grad():
        expected = ops.resize_bilinear(x, (5, 7))
        torch.testing.assert_close(ops.resize_bilinear(x, (np.int64(5), torch.tensor(7))), expected)


def test_cpp_output_is_an_ordinary_tensor():
    """Not an inference tensor: usable in place and by autograd after a torch.no_grad() call."""
    with torch.no_grad():
        out = ops.resize_bilinear(torch.randn(1, 2, 3, 4), (5, 5))
    assert not out.is_inference()
    scale = torch.ones_like(out, requires_grad=True)
    (out.add_(1) * scale).sum().backward()
    assert torch.equal(scale.grad, out)
