"""bf.ops.ohem_cross_entropy: every fused implementation against the eager reference (loss and
gradient), the OHEM edge cases of spec §6, argument errors, torch.compile and determinism."""
import pytest
import torch

import bisenet_fast as bf
from bisenet_fast.ops.ohem_cross_entropy import ohem_cross_entropy_reference
from tests.helpers import (
    assert_fake_kernel_refuses_mixed_devices,
    requires_cuda,
    requires_cuda_build,
    requires_triton,
    triton_device,
)

# (N, C, h, w, H, W): batch 1 and 3, odd sizes, 9x13 -> 67x101 (not a multiple), down-sampling,
# a one-pixel head.
SHAPES = [
    (1, 4, 8, 8, 32, 32),
    (3, 5, 9, 13, 67, 101),
    (2, 19, 6, 5, 40, 33),
    (2, 3, 12, 10, 7, 9),
    (1, 2, 1, 1, 7, 3),
]
# Triton runs under the CPU interpreter without a GPU: tiny shapes only.
TRITON_SHAPES = [(1, 3, 4, 5, 9, 11), (3, 5, 3, 4, 10, 13)]
# A head wider than the backward's 32-column tile, so several tiles and x segments meet.
TRITON_WIDE_SHAPE = (1, 3, 2, 40, 5, 150)
# (thresh, min_kept as a fraction of H*W): below-thresh count path, selection path, plain CE.
OHEM_CASES = [(0.7, 0.1), (0.2, 0.5), (None, 0.1)]
# The loss is float32 for float16/bfloat16 logits too, computed from the same rounded logits
# the reference reads: float32's tolerance (a loss rounded to the logits' dtype passed the
# dtype's tolerance this had).
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),  # float64 taps, as ATen's float64 upsample
}
# Gradients are (softmax - onehot) / (N*H*W) summed over ~(H/h)*(W/w) pixels; in float16 and
# bfloat16 the float32 gradient is rounded to the logits' dtype, as the reference's is: two
# units in the last place of that dtype (a bfloat16 gradient 3% off passed the 10% this had).
GRAD_TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2 * 2**-10, atol=1e-5),
    torch.bfloat16: dict(rtol=2 * 2**-7, atol=1e-5),
    torch.float64: dict(rtol=1e-11, atol=1e-13),
}


def make_inputs(shape, dtype=torch.float32, target_dtype=torch.int64, ignore_index=255, seed=0, device="cpu"):
    n, c, h, w, H, W = shape
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, c, h, w, generator=gen)).to(dtype)
    target = torch.randint(0, c, (n, H, W), generator=gen)
    target[torch.rand(n, H, W, generator=gen) < 0.2] = ignore_index
    return logits.to(device), target.to(target_dtype).to(device)


def loss_and_grad(backend, logits, target, **kwargs):
    if backend == EMULATED_CUDA:
        loss, _, grad = emulated_cuda(logits, target, **kwargs)
        return loss, grad
    logits = logits.detach().requires_grad_()  # a new leaf with the caller's strides (clone would not keep them)
    with bf.backends.use(backend):
        loss = bf.ops.ohem_cross_entropy(logits, target, **kwargs)
    loss.backward()
    return loss.detach(), logits.grad


def check_against_reference(backend, logits, target, **kwargs):
    ref_loss, ref_grad = loss_and_grad("eager", logits, target, **kwargs)
    loss, grad = loss_and_grad(backend, logits, target, **kwargs)
    assert loss.dtype == ref_loss.dtype and loss.shape == ()
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE[logits.dtype])
    torch.testing.assert_close(grad.float(), ref_grad.float(), **GRAD_TOLERANCE[logits.dtype])
    return loss, grad


def ohem_kwargs(shape, thresh, kept_fraction, ignore_index=255):
    return dict(thresh=thresh, min_kept=int(kept_fraction * shape[4] * shape[5]), ignore_index=ignore_index)


def reference_threshold(logits, target, thresh, min_kept, ignore_index=255):
    up = torch.nn.functional.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    valid = target.long() != ignore_index
    prob = up.softmax(1).gather(1, target.long().masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)[valid]
    kth = prob.sort().values[min(min_kept * logits.shape[0], prob.numel() - 1)]
    return max(float(kth), float(torch.tensor(thresh, dtype=torch.float32)))


# ---- The CUDA kernels, emulated on the CPU
# tests/cuda_emulation compiles csrc/cuda/ohem_cross_entropy_kernels.cuh and _host.h (all of
# ohem_cross_entropy.cu but the launches) for the CPU and runs each block's threads as fibers
# switched at every barrier and warp vote, shared memory starting as NaN. As a backend of the
# edge-case tests below it is "cuda-emulated" (not selected by the GPU runs' "not emulated").

EMULATED_CUDA = "cuda-emulated"
H200 = dict(sm_count=132, shared_bytes_optin=227 * 1024)


def emulated_cuda(logits, target, *, thresh=0.7, min_kept=10000, ignore_index=255, check_labels=True, grad_loss=1.0,
                  device=H200):
    """(loss, threshold, d grad_loss * loss / d logits) from the emulated CUDA forward and backward."""
    from tests import cuda_emulation

    module = cuda_emulation.ohem_cross_entropy()
    loss, threshold = module.forward(logits, target, thresh, min_kept, ignore_index, check_labels)
    grad = module.backward(torch.tensor(grad_loss), logits, target, threshold, ignore_index, device["sm_count"],
                           device["shared_bytes_optin"])
    return loss, threshold, grad


def emulated_tiling(shape, device=H200):
    from tests import cuda_emulation

    n, c, h, w, H, W = shape
    return cuda_emulation.ohem_cross_entropy().tiling(torch.empty(n, c, h, w), torch.empty(n, H, W, dtype=torch.uint8),
                                                      device["sm_count"], device["shared_bytes_optin"])


# SHAPES and the CUDA backward's tilings: several bands and column tiles, a head column read
# by more output columns than a block's chunk of 256, both sides of the bound on classes
# held in registers (kRegisterClasses = 20), and 150 classes, which shrink the chunk and the
# tile to fit 48 KB of shared memory. 2x2 -> 30x700 also ties 42 pixels at the k-th
# probability: the kernel's arithmetic must round as ATen's to keep the same ones.
EMULATED_SHAPES = SHAPES + [
    (1, 3, 6, 70, 20, 600),
    (1, 3, 2, 2, 30, 700),
    (2, 20, 5, 7, 33, 45),
    (2, 21, 5, 7, 33, 45),
    (1, 150, 4, 4, 16, 16),
]


@pytest.mark.parametrize("shape", EMULATED_SHAPES)
@pytest.mark.parametrize("thresh, kept_fraction", OHEM_CASES)
def test_cuda_emulated_matches_reference(shape, thresh, kept_fraction):
    logits, target = make_inputs(shape)
    kwargs = ohem_kwargs(shape, thresh, kept_fraction)
    # ATen's CPU upsample rounds some values 1 ulp apart on one thread and on more (2, 3, ...
    # agree): at the tied shape that flips which pixels are kept. The kernel's arithmetic is
    # that of its multi-threaded runs, so the reference runs on two threads at least.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        check_against_reference(EMULATED_CUDA, logits, target, **kwargs)
    finally:
        torch.set_num_threads(threads)
    if thresh is not None:  # the radix select finds the reference's threshold (to float rounding)
        _, threshold, _ = emulated_cuda(logits, target, **kwargs)
        assert threshold.item() == pytest.approx(reference_threshold(logits, target, thresh, kwargs["min_kept"]), rel=1e-6)


@pytest.mark.parametrize("dtype, target_dtype", [(torch.float16, torch.uint8), (torch.bfloat16, torch.int32),
                                                 (torch.float32, torch.uint8)])
@pytest.mark.parametrize("classes", [5, 21])
def test_cuda_emulated_dtypes(dtype, target_dtype, classes):
    shape = (2, classes, 5, 7, 33, 45)
    logits, target = make_inputs(shape, dtype=dtype, target_dtype=target_dtype)
    check_against_reference(EMULATED_CUDA, logits, target, **ohem_kwargs(shape, 0.2, 0.5))


@pytest.mark.parametrize("sm_count, band_rows", [(1, 4), (4, 2), (132, 1)])
def test_cuda_emulated_band_heights(sm_count, band_rows):
    """Bands of 4, 2 and 1 head rows (fewer where the blocks would not fill twice the SMs:
    9 head rows of 2 images in bands of 4 are 6 blocks) give the reference's gradient."""
    shape = (2, 5, 9, 13, 67, 101)
    device = dict(H200, sm_count=sm_count)
    assert emulated_tiling(shape, device)["band_rows"] == band_rows
    logits, target = make_inputs(shape)
    ref_loss, ref_grad = loss_and_grad("eager", logits, target, thresh=0.2, min_kept=3000)
    _, _, grad = emulated_cuda(logits, target, thresh=0.2, min_kept=3000, device=device)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_cuda_emulated_gradient_does_not_depend_on_the_sm_count():
    """150 classes shrink the tile to fit 48 KB; the band height, which follows the SM count,
    is chosen after that, so the summation order and the gradient, bit for bit, are the same
    on any GPU (fitted after the band, the tile was 15 columns on 132 SMs and 7 on one)."""
    shape = (1, 150, 32, 32, 256, 256)
    tilings = [emulated_tiling(shape, dict(H200, sm_count=sm_count)) for sm_count in (1, 132)]
    assert [t["band_rows"] for t in tilings] == [2, 1]
    assert len({(t["tile_cols"], t["x_chunk"]) for t in tilings}) == 1
    logits, target = make_inputs(shape)
    grads = [emulated_cuda(logits, target, thresh=0.7, min_kept=100, device=dict(H200, sm_count=sm_count))[2]
             for sm_count in (1, 132)]
    assert torch.equal(*grads)


def test_cuda_emulated_tiling_at_the_training_shape():
    """N=4, 19 classes, 128x128 -> 1024x1024 on an H200: bands of 4 head rows (512 blocks fill
    132 SMs), the widest tile one 256-column chunk covers (30 head columns + the 2 it
    overlaps), in the default 48 KB of shared memory."""
    tiling = emulated_tiling((4, 19, 128, 128, 1024, 1024))
    assert tiling["band_rows"] == 4 and tiling["x_chunk"] == 256 and tiling["tile_cols"] == 30
    assert tiling["shared_bytes"] <= 48 * 1024


def test_cuda_emulated_grad_loss_scales_the_gradient():
    logits, target = make_inputs((1, 4, 8, 8, 32, 32))
    _, _, grad = emulated_cuda(logits, target, thresh=0.7, min_kept=100)
    _, _, scaled = emulated_cuda(logits, target, thresh=0.7, min_kept=100, grad_loss=-2.5)
    torch.testing.assert_close(scaled, -2.5 * grad)


def test_cuda_emulated_ties_in_the_radix_select():
    """Many equal probabilities in one warp (the histogram's per-warp aggregation of equal
    digits) and a k-th value inside a run of ties: 2 x 40 x 60 pixels, same-size logits
    whose gap takes 4 values."""
    gap = torch.tensor([0.0, -0.5, -1.0, -2.0]).repeat_interleave(600).reshape(1, 1, 40, 60)
    logits = torch.cat([torch.zeros_like(gap), gap], dim=1).repeat(2, 1, 1, 1)
    target = torch.zeros(2, 40, 60, dtype=torch.int64)
    target[:, ::7] = 255
    for min_kept in (1, 700, 1500, 2100):
        kwargs = dict(thresh=0.3, min_kept=min_kept)
        _, threshold, _ = emulated_cuda(logits, target, **kwargs)
        assert threshold.item() == pytest.approx(reference_threshold(logits, target, **kwargs), rel=1e-6)
        check_against_reference(EMULATED_CUDA, logits, target, **kwargs)


def test_cuda_emulated_layouts_and_determinism():
    shape = (2, 5, 9, 13, 67, 101)
    logits, target = make_inputs(shape)
    first = emulated_cuda(logits, target, thresh=0.2, min_kept=3000)
    assert all(torch.equal(a, b) for a, b in zip(first, emulated_cuda(logits, target, thresh=0.2, min_kept=3000)))
    channels_last = logits.contiguous(memory_format=torch.channels_last)
    sliced = torch.stack([logits, logits], dim=-1)[..., 0]
    for other in (channels_last, sliced):
        assert all(torch.equal(a, b) for a, b in zip(first, emulated_cuda(other, target, thresh=0.2, min_kept=3000)))


def test_cuda_emulated_label_checks():
    """A label outside [0, C) raises, naming it; without the check (no host synchronisation)
    the loss is NaN instead, and valid labels give the checked result."""
    logits, target = make_inputs((2, 5, 9, 13, 67, 101))
    for kwargs in (dict(thresh=0.2, min_kept=3000), dict(thresh=None)):
        checked = emulated_cuda(logits, target, **kwargs)
        unchecked = emulated_cuda(logits, target, check_labels=False, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(checked, unchecked))
    target[1, 3, 4] = 9
    with pytest.raises(ValueError, match=r"label 9, which is neither a class id in \[0, 5\)"):
        emulated_cuda(logits, target)
    loss, _, _ = emulated_cuda(logits, target, check_labels=False)
    assert loss.isnan()


def test_cuda_emulated_bad_inputs():
    logits, target = make_inputs((1, 3, 4, 4, 8, 8))
    with pytest.raises(RuntimeError, match="logits must be float32, float16 or bfloat16, got Double"):
        emulated_cuda(logits.double(), target)
    with pytest.raises(RuntimeError, match="target must be uint8, int32 or int64, got Short"):
        emulated_cuda(logits, target.short())
    with pytest.raises(RuntimeError, match="target must have the batch size of logits"):
        emulated_cuda(logits, target.repeat(2, 1, 1))
    many = make_inputs((1, 400, 4, 4, 8, 8))[0]
    with pytest.raises(RuntimeError, match="400 classes need .* bytes of shared memory per block in the backward"):
        emulated_cuda(many, target, device=dict(H200, shared_bytes_optin=48 * 1024))


# ---- C++ CPU kernel


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("thresh, kept_fraction", OHEM_CASES)
def test_cpp_matches_reference(shape, thresh, kept_fraction):
    logits, target = make_inputs(shape)
    check_against_reference("cpp", logits, target, **ohem_kwargs(shape, thresh, kept_fraction))


@pytest.mark.parametrize("thresh, kept_fraction", OHEM_CASES)
def test_cpp_threshold_output(thresh, kept_fraction):
    shape = SHAPES[1]
    logits, target = make_inputs(shape)
    kwargs = ohem_kwargs(shape, thresh, kept_fraction)
    loss, threshold = torch.ops.bisenet_fast.ohem_cross_entropy_forward(
        logits, target, thresh, kwargs["min_kept"], 255
    )
    assert threshold.dtype == torch.float32 and threshold.shape == ()
    if thresh is None:
        assert threshold.item() == float("inf")
    else:
        expected = reference_threshold(logits, target, thresh, kwargs["min_kept"])
        assert threshold.item() == pytest.approx(expected, rel=1e-6)
        if thresh == 0.2:
            assert threshold.item() > 0.2  # this case really exercises the selection


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpp_dtypes(dtype):
    shape = SHAPES[1]
    logits, target = make_inputs(shape, dtype=dtype)
    loss, _ = check_against_reference("cpp", logits, target, **ohem_kwargs(shape, 0.2, 0.5))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int32, torch.int64])
def test_cpp_target_dtypes(target_dtype):
    shape = SHAPES[0]
    logits, target = make_inputs(shape, target_dtype=target_dtype)
    check_against_reference("cpp", logits, target, **ohem_kwargs(shape, 0.2, 0.5))


@pytest.mark.parametrize("thresh, kept_fraction", [(0.7, 0.05), (0.2, 0.5), (None, 0.1)])
def test_cpp_gradcheck_float64(thresh, kept_fraction):
    shape = (2, 3, 4, 5, 7, 9)
    logits, target = make_inputs(shape, dtype=torch.float64, seed=3)
    kwargs = ohem_kwargs(shape, thresh, kept_fraction)

    def loss(x):
        with bf.backends.use("cpp"):
            return bf.ops.ohem_cross_entropy(x, target, **kwargs)

    assert torch.autograd.gradcheck(loss, (logits.requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("check_labels", [(), (False,)])
def test_cpp_opcheck(check_labels):
    """Every opcheck utility, test_aot_dispatch_dynamic (forward and backward traced with
    dynamic shapes) included; the backward op's schema and fake kernel too."""
    logits, target = make_inputs(SHAPES[0])
    torch.library.opcheck(
        torch.ops.bisenet_fast.ohem_cross_entropy_forward.default,
        (logits.requires_grad_(), target, 0.2, 200, 255, *check_labels),
    )
    threshold = torch.tensor(0.5)
    torch.library.opcheck(
        torch.ops.bisenet_fast.ohem_cross_entropy_backward.default,
        (torch.tensor(1.0), logits.detach(), target, threshold, 255),
        test_utils=("test_schema", "test_faketensor"),
    )
    ops = torch.ops.bisenet_fast
    assert_fake_kernel_refuses_mixed_devices(ops.ohem_cross_entropy_forward, (logits, target, 0.2, 200, 255))
    assert_fake_kernel_refuses_mixed_devices(ops.ohem_cross_entropy_backward,
                                             (torch.tensor(1.0), logits, target, threshold, 255))


def test_cpp_forward_fake_keeps_float64_losses():
    """float64 logits give a float64 loss and threshold (the cpp op's float64 path): the fake
    kernel must promise that dtype, or a compiled graph would carry float32 for them."""
    logits, target = make_inputs(SHAPES[0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.bisenet_fast.ohem_cross_entropy_forward.default,
                          (logits, target, 0.2, 200, 255), test_utils=("test_faketensor",))


@requires_triton
def test_triton_opcheck():
    """The Triton custom ops under every opcheck utility, as the C++ ones above: the autograd
    registration, and forward and backward traced with dynamic shapes."""
    logits, target = make_inputs(TRITON_SHAPES[0], device=triton_device())
    torch.library.opcheck(
        torch.ops.bisenet_fast_triton.ohem_cross_entropy_forward.default,
        (logits.requires_grad_(), target, 0.2, 20, 255),
    )
    threshold = torch.tensor(0.5, device=logits.device)
    grad_loss = torch.tensor(1.0, device=logits.device)
    torch.library.opcheck(
        torch.ops.bisenet_fast_triton.ohem_cross_entropy_backward.default,
        (grad_loss, logits.detach(), target, threshold, 255),
        test_utils=("test_schema", "test_faketensor"),
    )
    ops = torch.ops.bisenet_fast_triton
    assert_fake_kernel_refuses_mixed_devices(ops.ohem_cross_entropy_forward, (logits, target, 0.2, 20, 255))
    assert_fake_kernel_refuses_mixed_devices(ops.ohem_cross_entropy_backward, (grad_loss, logits, target, threshold, 255))


@pytest.mark.parametrize("namespace", ["bisenet_fast", pytest.param("bisenet_fast_triton", marks=requires_triton)])
def test_backward_fake_keeps_the_logits_dtype(namespace):
    logits, target = make_inputs(TRITON_SHAPES[0], dtype=torch.float16)
    device = triton_device() if namespace == "bisenet_fast_triton" else "cpu"
    logits, target = logits.to(device), target.to(device)
    op = getattr(torch.ops, namespace).ohem_cross_entropy_backward.default
    torch.library.opcheck(op, (torch.tensor(1.0, device=device), logits, target, torch.tensor(0.5, device=device), 255),
                          test_utils=("test_faketensor",))


def test_cpp_non_contiguous_and_channels_last():
    shape = SHAPES[1]
    logits, target = make_inputs(shape)
    kwargs = ohem_kwargs(shape, 0.2, 0.5)
    expected, expected_grad = loss_and_grad("eager", logits, target, **kwargs)
    channels_last = logits.contiguous(memory_format=torch.channels_last)
    strided = torch.stack([logits, -logits], -1)[..., 0]  # same values, stride 2 along w
    target_strided = torch.stack([target, target], -1)[..., 0]
    assert not strided.is_contiguous() and not target_strided.is_contiguous()
    for x, t in ((channels_last, target), (strided, target_strided)):
        loss, grad = loss_and_grad("cpp", x, t, **kwargs)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


# ---- OHEM edge cases (spec §6), on every fused backend


def cpu_backends():
    return ["cpp"] + (["triton"] if "triton" in bf.backends.available() and triton_device() == "cpu" else [])


def fused_backends():
    """(backend, device) of every fused implementation this session can run."""
    params = [pytest.param("cpp", "cpu", id="cpp"), pytest.param(EMULATED_CUDA, "cpu", id=EMULATED_CUDA)]
    if "triton" in bf.backends.available():
        params.append(pytest.param("triton", triton_device(), id="triton"))
    params.append(pytest.param("cuda", "cuda", id="cuda", marks=requires_cuda_build))
    return params


@pytest.mark.parametrize("backend, device", fused_backends())
def test_ties_at_threshold(backend, device):
    # Same-size "upsampling" (exact) and two classes whose logit gap takes 3 values: the
    # ground-truth probabilities tie in three groups (24, 24 and 22 pixels). With k = 30 the
    # k-th lands inside the middle group, whose members are then all dropped (p < threshold
    # is strict), exactly as with the sorted reference.
    gap = torch.tensor([0.0, -1.0, -2.0]).repeat(12)[:35].reshape(1, 1, 5, 7)
    logits = torch.cat([torch.zeros_like(gap), gap], dim=1).repeat(2, 1, 1, 1)
    target = torch.zeros(2, 5, 7, dtype=torch.int64)
    logits, target = logits.to(device), target.to(device)
    kwargs = dict(thresh=0.5, min_kept=15, ignore_index=255)
    if backend == EMULATED_CUDA:
        _, threshold, _ = emulated_cuda(logits, target, **kwargs)
    else:
        op = torch.ops.bisenet_fast_triton if backend == "triton" else torch.ops.bisenet_fast
        _, threshold = op.ohem_cross_entropy_forward(logits, target, 0.5, 15, 255)
    assert threshold.item() == pytest.approx(reference_threshold(logits, target, 0.5, 15), rel=1e-6)
    assert threshold.item() == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))), rel=1e-6)
    check_against_reference(backend, logits, target, **kwargs)


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize("budget_vs_valid", ["less", "equal", "more"])
def test_budget_versus_valid_count(backend, device, budget_vs_valid):
    shape = (1, 3, 3, 4, 6, 7)
    logits, target = make_inputs(shape, seed=5, device=device)
    # min_kept * N is the budget: use N=1 so every budget is reachable.
    logits, target = logits[:1], target[:1]
    n_valid = int((target != 255).sum())
    budget = {"less": n_valid - 5, "equal": n_valid, "more": n_valid + 7}[budget_vs_valid]
    loss, _ = check_against_reference(backend, logits, target, thresh=0.7, min_kept=budget)
    if budget_vs_valid != "less":
        # Threshold = the largest p: every valid pixel but the maximum is kept.
        ref_all = ohem_cross_entropy_reference(logits, target, thresh=None)
        assert loss < ref_all


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize("thresh", [0.7, None])
def test_nothing_valid(backend, device, thresh):
    logits, target = make_inputs((2, 3, 3, 4, 6, 7), device=device)
    target.fill_(255)
    loss, grad = loss_and_grad(backend, logits, target, thresh=thresh, min_kept=5)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend, device", fused_backends())
def test_everything_kept(backend, device):
    # thresh=1 with a small budget: every valid pixel (p < 1) is kept, i.e. plain CE.
    shape = (2, 3, 3, 4, 6, 7)
    logits, target = make_inputs(shape, device=device)
    loss, grad = loss_and_grad(backend, logits, target, thresh=1.0, min_kept=1)
    plain, plain_grad = loss_and_grad("eager", logits, target, thresh=None)
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(grad, plain_grad)


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize("ignore_index", [-1, 2])
def test_ignore_index_other_than_255(backend, device, ignore_index):
    shape = (2, 4, 3, 4, 6, 7)
    logits, target = make_inputs(shape, ignore_index=ignore_index, device=device)
    check_against_reference(backend, logits, target, thresh=0.2, min_kept=20, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", ["eager"] + cpu_backends())
@pytest.mark.parametrize("bad_label", [5, -3])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8])
def test_label_out_of_range_raises(backend, bad_label, target_dtype):
    if target_dtype == torch.uint8 and bad_label < 0:
        bad_label = 200  # uint8 has no negative labels; 200 is out of range, not ignore_index
    logits, target = make_inputs((1, 5, 3, 4, 6, 7), target_dtype=target_dtype)
    target[0, 2, 3] = bad_label
    with bf.backends.use(backend), pytest.raises(ValueError, match=f"label {bad_label}, which is neither "
                                                 "a class id in \\[0, 5\\)"):
        bf.ops.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=5)


@pytest.mark.parametrize("backend", ["eager"] + cpu_backends())
def test_uint8_labels_compare_as_integers(backend):
    """uint8 labels against ints outside [0, 255]: 200 is a class id when there are 300
    classes, and 255 is a bad label when ignore_index is -1 (not wrapped to uint8's 255)."""
    logits, _ = make_inputs((1, 300, 2, 3, 4, 5))
    target = torch.full((1, 4, 5), 200, dtype=torch.uint8)
    with bf.backends.use(backend):
        loss = bf.ops.ohem_cross_entropy(logits, target, thresh=None)
    torch.testing.assert_close(loss, ohem_cross_entropy_reference(logits, target, thresh=None))
    logits, target = make_inputs((1, 5, 3, 4, 6, 7), target_dtype=torch.uint8, ignore_index=4)
    target[0, 2, 3] = 255
    with bf.backends.use(backend), pytest.raises(ValueError, match="label 255, which is neither a class id in \\[0, 5\\) "
                                                 "nor ignore_index \\(-1\\)"):
        bf.ops.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=5, ignore_index=-1)


@pytest.mark.parametrize("backend, device", fused_backends())
def test_broadcast_logits_and_target(backend, device):
    """Stride-0 (expanded) logits and target read as their contiguous copies."""
    logits, target = make_inputs((1, 4, 3, 5, 9, 11), device=device)
    check_against_reference(backend, logits.expand(3, -1, -1, -1), target.expand(3, -1, -1), thresh=0.7, min_kept=20)


@pytest.mark.parametrize("backend, device", fused_backends())
def test_probabilities_equal_to_thresh_and_exactly_budget_of_them(backend, device):
    """Exactly min_kept probabilities at or below thresh, all equal to it: the selection runs
    (the k-th smallest is above thresh) and keeps them, as the reference does."""
    gap = torch.tensor([0.0] * 8 + [2.0] * 12).reshape(1, 1, 4, 5)
    logits = torch.cat([gap, torch.zeros_like(gap)], dim=1).to(device)  # p = 0.5 exactly, or sigmoid(2)
    target = torch.zeros(1, 4, 5, dtype=torch.int64, device=device)
    loss, _ = check_against_reference(backend, logits, target, thresh=0.5, min_kept=8)
    assert loss > 0


@pytest.mark.parametrize("backend", ["eager"] + cpu_backends())
def test_check_labels_false_changes_nothing_off_cuda(backend):
    """check_labels=False only lets the GPU paths skip their synchronisation: on the CPU the
    result is the same and a bad label still raises."""
    logits, target = make_inputs((1, 5, 3, 4, 6, 7))
    checked = loss_and_grad(backend, logits, target, thresh=0.7, min_kept=5)
    unchecked = loss_and_grad(backend, logits, target, thresh=0.7, min_kept=5, check_labels=False)
    assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[1], unchecked[1])
    target[0, 2, 3] = 5
    with bf.backends.use(backend), pytest.raises(ValueError, match="neither a class id"):
        bf.ops.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=5, check_labels=False)
    with pytest.raises(TypeError, match="check_labels must be a bool"):
        bf.ops.ohem_cross_entropy(logits, target, check_labels=1)


def test_cpp_kernel_checks_labels_itself():
    logits, target = make_inputs((1, 5, 3, 4, 6, 7))
    target[0, 5, 6] = 7
    with pytest.raises(ValueError, match="label 7, which is neither a class id in \\[0, 5\\)"):
        torch.ops.bisenet_fast.ohem_cross_entropy_forward(logits, target, 0.7, 5, 255)


def test_cpp_backward_checks_its_scalars():
    logits, target = make_inputs((1, 5, 3, 4, 6, 7))
    op = torch.ops.bisenet_fast.ohem_cross_entropy_backward
    with pytest.raises(RuntimeError, match="grad_loss must hold one value, got shape \\[2\\]"):
        op(torch.ones(2), logits, target, torch.tensor(0.5), 255)
    with pytest.raises(RuntimeError, match="threshold must hold one value, got shape \\[1, 2\\]"):
        op(torch.tensor(1.0), logits, target, torch.ones(1, 2), 255)


def test_cuda_emulated_backward_refuses_scalars_off_the_logits_device():
    """On a GPU a grad_loss or threshold left on the host would be read through a host
    pointer (an illegal address that kills the CUDA context): the host code refuses it."""
    from tests import cuda_emulation

    logits, target = make_inputs((1, 5, 3, 4, 6, 7))
    backward = cuda_emulation.ohem_cross_entropy().backward
    for grad_loss, threshold, name in ((torch.tensor(1.0, device="meta"), torch.tensor(0.5), "grad_loss"),
                                       (torch.tensor(1.0), torch.tensor(0.5, device="meta"), "threshold")):
        with pytest.raises(RuntimeError, match=f"{name} must be on the logits' device"):
            backward(grad_loss, logits, target, threshold, 255, H200["sm_count"], H200["shared_bytes_optin"])


# ---- non-finite logits (a float16 head that overflowed, a diverging run): the loss is
# non-finite exactly when the reference's is, never a silently finite value that the
# training loop's check would let through, and so is the gradient.


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("thresh, min_kept", [(0.7, 3), (0.7, 10**6), (None, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_logits_give_a_non_finite_loss(backend, device, bad_value, thresh, min_kept, dtype):
    logits, target = make_inputs((2, 3, 4, 5, 9, 11), dtype=dtype, ignore_index=255, device=device)
    target.fill_(1)  # every pixel valid, so the reference's non-finite gradients come from valid pixels
    logits[1, 2, 1, 3] = bad_value
    ref_loss, ref_grad = loss_and_grad("eager", logits, target, thresh=thresh, min_kept=min_kept)
    loss, grad = loss_and_grad(backend, logits, target, thresh=thresh, min_kept=min_kept)
    assert not torch.isfinite(ref_loss)  # the case is what it claims to be
    assert not torch.isfinite(loss), f"finite loss {loss.item()} where the reference's is {ref_loss.item()}"
    assert not torch.isfinite(grad).all() and not torch.isfinite(ref_grad).all()
    # The image without the bad value keeps finite gradients in both.
    assert torch.isfinite(grad[0]).all() and torch.isfinite(ref_grad[0]).all()


def test_cpp_gradient_is_nan_where_the_reference_s_is():
    """A head column read along x with weight exactly 0 (2x4 -> 4x8: the 0.5 scale puts some
    sources on integers) still gets 0 * NaN from a non-finite logit, as in the reference; the
    transposed x interpolation used to skip such taps, so the NaN reached fewer head pixels."""
    logits = torch.zeros(1, 2, 2, 4)
    logits[0, 1, 0, 1] = float("-inf")
    target = torch.zeros(1, 4, 8, dtype=torch.long)
    _, ref_grad = loss_and_grad("eager", logits, target, thresh=None)
    _, grad = loss_and_grad("cpp", logits, target, thresh=None)
    assert ref_grad.isnan().sum() > 2  # more than the -inf pixel's own column
    assert torch.equal(grad.isnan(), ref_grad.isnan())
    finite = ~ref_grad.isnan()
    torch.testing.assert_close(grad[finite], ref_grad[finite], **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize("shape, bad_pixel", [((1, 3, 5, 4, 3, 8), (2, 1)), ((1, 3, 3, 40, 7, 150), (1, 20))],
                         ids=["rows-5-to-3", "wide-upsampled"])
def test_gradient_is_nan_wherever_the_reference_s_is(backend, device, shape, bad_pixel):
    # 5 -> 3 rows: output row 1 reads head rows 2 and 3 with weights 1 and exactly 0, so a
    # NaN logit in head row 2 reaches row 3's gradient only as 0 * NaN; the Triton backward
    # used to skip rows of weight 0 and left row 3 finite. A kernel may spread the NaN wider
    # (README: the Triton backward's column tile), never narrower.
    logits, target = make_inputs(shape, device=device)
    target.fill_(1)
    logits[0, 0, bad_pixel[0], bad_pixel[1]] = float("nan")
    ref_loss, ref_grad = loss_and_grad("eager", logits, target, thresh=0.7, min_kept=3)
    loss, grad = loss_and_grad(backend, logits, target, thresh=0.7, min_kept=3)
    assert ref_loss.isnan() and loss.isnan()
    assert not (ref_grad.isnan() & ~grad.isnan()).any(), "finite gradient where the reference's is NaN"
    finite = ~grad.isnan()
    torch.testing.assert_close(grad[finite], ref_grad[finite], **GRAD_TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend, device", fused_backends())
def test_a_minus_inf_logit_of_another_class_keeps_the_loss_finite(backend, device):
    # 4x4 -> 8x8: the readers of head pixel (2, 2) all read it with a non-zero weight (a zero
    # weight times -inf would make NaN), so its -inf in class 0, the class an online softmax
    # starts from, only removes that class from those pixels' softmax.
    logits, target = make_inputs((1, 3, 4, 4, 8, 8), device=device)
    target.fill_(2)
    logits[0, 0, 2, 2] = float("-inf")
    ref_loss, ref_grad = loss_and_grad("eager", logits, target, thresh=0.7, min_kept=3)
    assert torch.isfinite(ref_loss) and torch.isfinite(ref_grad).all()  # the case is what it claims
    check_against_reference(backend, logits, target, thresh=0.7, min_kept=3)


@pytest.mark.parametrize("backend, device", fused_backends())
@pytest.mark.parametrize("shape", [(1, 3, 4, 5, 8, 10), (1, 3, 4, 5, 4, 5), (1, 3, 4, 5, 4, 10), (1, 3, 4, 5, 8, 5)],
                         ids=["upsampled", "same-size", "same-height", "same-width"])
def test_logits_read_only_by_ignored_pixels_never_matter(backend, device, shape):
    # Pixels labelled ignore_index contribute nothing whatever their logits (the reference's
    # log-softmax backward still turns a NaN there into NaN gradients; the fused kernels
    # never read those pixels' logits in backward). An axis that keeps its size reads one
    # head index, as ATen's CPU kernels do, not also a zero-weight neighbour (0 * NaN).
    logits, target = make_inputs(shape, device=device)
    head_pixel = torch.zeros(1, 1, *shape[2:4])
    head_pixel[..., 2, 2] = 1
    readers = torch.nn.functional.interpolate(head_pixel, size=shape[4:], mode="bilinear", align_corners=False)
    target[readers[:, 0].to(device) != 0] = 255
    clean_loss, clean_grad = loss_and_grad(backend, logits, target, thresh=0.7, min_kept=5)
    logits[0, 1, 2, 2] = float("nan")
    loss, grad = loss_and_grad(backend, logits, target, thresh=0.7, min_kept=5)
    assert torch.isfinite(clean_loss)
    torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_cpp_float64_logits_read_only_by_ignored_pixels_never_matter(bad_value):
    # As above, for the CPU kernel's float64 path (gradcheck's dtype): its exp is libm's,
    # whose NaN (the softmax term exp(NaN - NaN) of an ignored pixel) times the pixel's zero
    # loss weight used to reach the gradient of every head logit the row read.
    shape = (1, 3, 4, 5, 8, 10)
    logits, target = make_inputs(shape, dtype=torch.float64)
    head_pixel = torch.zeros(1, 1, *shape[2:4])
    head_pixel[..., 2, 2] = 1
    readers = torch.nn.functional.interpolate(head_pixel, size=shape[4:], mode="bilinear", align_corners=False)
    target[readers[:, 0] != 0] = 255
    clean_loss, clean_grad = loss_and_grad("cpp", logits, target, thresh=0.7, min_kept=5)
    logits[0, 1, 2, 2] = bad_value
    loss, grad = loss_and_grad("cpp", logits, target, thresh=0.7, min_kept=5)
    assert torch.isfinite(clean_loss)
    torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_cpp_float64_non_finite_logit_of_a_valid_pixel_stays_non_finite(bad_value):
    logits, target = make_inputs((2, 3, 4, 5, 9, 11), dtype=torch.float64)
    target.fill_(1)
    logits[1, 2, 1, 3] = bad_value
    ref_loss, ref_grad = loss_and_grad("eager", logits, target, thresh=0.7, min_kept=3)
    loss, grad = loss_and_grad("cpp", logits, target, thresh=0.7, min_kept=3)
    assert not torch.isfinite(ref_loss) and not torch.isfinite(loss)
    assert not torch.isfinite(grad).all() and not torch.isfinite(ref_grad).all()
    assert torch.isfinite(grad[0]).all()


# ---- argument errors (the front checks, the same for every backend)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda x, t: (x.long(), t), TypeError, "logits must have dtype"),
        (lambda x, t: (x[0], t), ValueError, "logits must be 4-D"),
        (lambda x, t: (x, t.float()), TypeError, "target must have dtype"),
        (lambda x, t: (x, t[0]), ValueError, "target must be 3-D"),
        (lambda x, t: (x, t[:1]), ValueError, "target must have the batch size"),
        (lambda x, t: (x, t.to("meta")), ValueError, "target must be on cpu"),
        (lambda x, t: ([1.0], t), TypeError, "logits must be a torch.Tensor"),
        (lambda x, t: (x[:0], t[:0]), ValueError, "must have non-empty batch, class and spatial dims"),
    ],
)
def test_bad_arguments_raise_clearly(mutate, error, match):
    logits, target = make_inputs((2, 3, 3, 4, 6, 7))
    logits, target = mutate(logits, target)
    with pytest.raises(error, match=match):
        bf.ops.ohem_cross_entropy(logits, target)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(thresh=1.5), "thresh must be None or a probability in \\[1e-30, 1\\], got 1.5"),
     (dict(min_kept=-1), "min_kept must be a non-negative int below 2\\*\\*63, got -1"),
     (dict(min_kept=2.0), "min_kept must be a non-negative int below 2\\*\\*63, got 2.0"),
     # below 1e-30 the kernels' flushed exp would keep other pixels than the reference
     (dict(thresh=1e-40), "thresh must be None or a probability in \\[1e-30, 1\\], got 1e-40"),
     (dict(min_kept=2**63), "min_kept must be a non-negative int below 2\\*\\*63"),
     (dict(ignore_index=2**70), "ignore_index must fit in int64")],
)
@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_bad_options_raise_clearly(kwargs, match, backend):
    """(thresh of the wrong type: test_thresh_must_be_a_number.)"""
    logits, target = make_inputs((2, 3, 3, 4, 6, 7))
    with pytest.raises(ValueError, match=match), bf.backends.use(backend):
        bf.ops.ohem_cross_entropy(logits, target, **kwargs)


@pytest.mark.parametrize("thresh", ["0.5", True])
def test_thresh_must_be_a_number(thresh):
    logits, target = make_inputs((2, 3, 3, 4, 6, 7))
    with pytest.raises(TypeError, match=f"thresh must be None or a float, got {type(thresh).__name__}"):
        bf.ops.ohem_cross_entropy(logits, target, thresh=thresh)


@pytest.mark.parametrize("backend, device", fused_backends())
def test_a_budget_beyond_int64_saturates(backend, device):
    """min_kept * N past 2**63 keeps every valid pixel's rank in reach, as Python's ints do."""
    logits, target = make_inputs((4, 5, 4, 5, 13, 11), device=device)
    check_against_reference(backend, logits, target, thresh=0.3, min_kept=2**61)


@pytest.mark.parametrize("backend, device", fused_backends())
def test_double_backward_raises(backend, device):
    """The fused backward has no backward of its own: a second derivative is an error, not None."""
    if backend == EMULATED_CUDA:
        pytest.skip("the emulation runs the kernels outside autograd")
    logits, target = make_inputs((2, 3, 3, 4, 6, 7), device=device)
    logits.requires_grad_()
    with bf.backends.use(backend):
        loss = bf.ops.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=5)
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError, match="has no second derivative"):
        torch.autograd.grad(grad.square().sum(), logits)


def test_cpp_kernel_rejects_bad_tensors():
    logits, target = make_inputs((2, 3, 3, 4, 6, 7))
    with pytest.raises(RuntimeError, match="logits must be 4-D"):
        torch.ops.bisenet_fast.ohem_cross_entropy_forward(logits[0], target, 0.7, 5, 255)
    with pytest.raises(RuntimeError, match="target must be uint8, int32 or int64"):
        torch.ops.bisenet_fast.ohem_cross_entropy_forward(logits, target.short(), 0.7, 5, 255)
    for thresh in (float("nan"), -0.5, 1.5, 1e-31):
        with pytest.raises(ValueError, match="thresh must be None or a probability in \\[1e-30, 1\\]"):
            torch.ops.bisenet_fast.ohem_cross_entropy_forward(logits, target, thresh, 5, 255)


@requires_triton
def test_triton_op_checks_its_own_inputs():
    logits, target = make_inputs((2, 3, 3, 4, 6, 7), device=triton_device())
    with pytest.raises(ValueError, match="target must have the batch size of logits"):
        torch.ops.bisenet_fast_triton.ohem_cross_entropy_forward(logits, target[:1], 0.7, 5, 255)


# ---- torch.compile, determinism, the model


def test_torch_compile_cpu_fullgraph():
    shape = SHAPES[0]
    logits, target = make_inputs(shape)
    kwargs = ohem_kwargs(shape, 0.2, 0.5)

    def step(x, t):
        return bf.ops.ohem_cross_entropy(x, t, **kwargs) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with bf.backends.use("cpp"):
        x = logits.clone().requires_grad_()
        loss = compiled(x, target)
        loss.backward()
    ref_loss, ref_grad = loss_and_grad("eager", logits, target, **kwargs)
    torch.testing.assert_close(loss.detach(), 2 * ref_loss)
    torch.testing.assert_close(x.grad, 2 * ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("thresh, kept_fraction", OHEM_CASES)
def test_cpp_deterministic_across_runs_and_threads(thresh, kept_fraction):
    shape = (3, 19, 9, 13, 67, 101)
    logits, target = make_inputs(shape)
    kwargs = ohem_kwargs(shape, thresh, kept_fraction)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            results.append(loss_and_grad("cpp", logits, target, **kwargs))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("ohem", [True, False])
def test_model_loss_cpp_matches_eager(ohem, monkeypatch):
    torch.manual_seed(0)
    model = bf.BiSeNetV2Segmentor(num_classes=5, ohem=ohem, ohem_min_kept=200, dropout_ratio=0.0).train()
    x = torch.randn(2, 3, 64, 64)  # batch 2: the context block batch-norms a 1x1 map
    target = torch.randint(0, 5, (2, 64, 64))
    target[:, :8] = 255
    results, chosen = {}, []
    for backend in ("eager", "cpp"):
        # Only the OHEM loss switches backend; every other op runs its reference in both runs.
        monkeypatch.setattr(
            bf.backends,
            "resolve",
            lambda op, device, *args, _b=backend: chosen.append(_b) or _b if op == "ohem_cross_entropy" else "eager",
        )
        model.zero_grad()
        losses = model.loss(x, target)
        sum(losses.values()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[backend] = ({k: v.detach() for k, v in losses.items()}, grads)
    assert chosen == ["eager"] * 5 + ["cpp"] * 5  # one OHEM loss per head
    (eager_losses, eager_grads), (cpp_losses, cpp_grads) = results["eager"], results["cpp"]
    assert eager_losses.keys() == cpp_losses.keys() and len(cpp_losses) == 5
    for key in eager_losses:
        torch.testing.assert_close(cpp_losses[key], eager_losses[key], rtol=1e-5, atol=1e-6)
    assert eager_grads.keys() == cpp_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(cpp_grads[name], eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


# ---- Triton (interpreter on the CPU, or the GPU) and CUDA


@requires_triton
@pytest.mark.parametrize("count", [2, 7, 10_000])
def test_triton_radix_select_equals_kthvalue(count):
    """The Triton path's k-th probability: ties, zeros, +inf (ignored pixels), several programs."""
    from bisenet_fast.triton_kernels.ohem_cross_entropy import _kth_smallest

    prob = torch.rand(count, generator=torch.Generator().manual_seed(count))
    prob[::3] = prob[1]
    prob[::7] = float("inf")
    prob[::11] = 0.0
    prob = prob.to(triton_device())
    for k in sorted({0, count // 2, count // 7, count - 1}):
        got = _kth_smallest(prob, k)
        assert got.shape == () and got.dtype == torch.float32
        assert torch.equal(got, torch.kthvalue(prob, k + 1).values), k


@requires_triton
def test_triton_grad_loss_scales_the_gradient():
    """The backward multiplies by the incoming gradient (a plain loss.backward() passes 1)."""
    logits, target = make_inputs(TRITON_SHAPES[1], device=triton_device())
    x = logits.detach().requires_grad_()
    with bf.backends.use("triton"):
        loss = bf.ops.ohem_cross_entropy(x, target, thresh=0.2, min_kept=60)
    (grad,) = torch.autograd.grad(-2.5 * loss, x)
    _, expected = loss_and_grad("eager", logits, target, thresh=0.2, min_kept=60)
    torch.testing.assert_close(grad, -2.5 * expected, rtol=1e-4, atol=1e-5)


@requires_triton
def test_triton_backward_column_tile_away_from_both_edges():
    """The second of three column tiles is clamped at neither edge: its window of output
    columns must cover every reader (129 columns here) without the edges' slack."""
    shape = (1, 3, 2, 66, 5, 254)
    logits, target = make_inputs(shape, device=triton_device())
    check_against_reference("triton", logits, target, **ohem_kwargs(shape, 0.2, 0.5))


@requires_triton
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_triton_layouts(layout):
    shape = TRITON_SHAPES[1]
    logits, target = make_inputs(shape, device=triton_device())
    x = (logits.contiguous(memory_format=torch.channels_last) if layout == "channels_last"
         else torch.stack([logits, -logits], -1)[..., 0])  # same values, stride 2 along w
    assert layout == "channels_last" or not x.is_contiguous()
    check_against_reference("triton", x, target, **ohem_kwargs(shape, 0.2, 0.5))


@requires_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("thresh, kept_fraction", OHEM_CASES)
def test_triton_matches_reference(shape, thresh, kept_fraction):
    logits, target = make_inputs(shape, device=triton_device())
    check_against_reference("triton", logits, target, **ohem_kwargs(shape, thresh, kept_fraction))


@requires_triton
@pytest.mark.parametrize("shape", [(1, 3, 9, 8, 5, 6), (1, 2, 1, 1, 7, 3), (1, 3, 3, 2, 50, 37)])
def test_triton_downsampling_one_pixel_head_large_ratio(shape):
    # The backward gathers over a window of output indices around each head index: these
    # shapes check that the window holds every reader (ratio < 1, h = 1, ratio ~ 17).
    logits, target = make_inputs(shape, device=triton_device())
    check_against_reference("triton", logits, target, **ohem_kwargs(shape, 0.2, 0.5))


@requires_triton
def test_triton_several_column_tiles():
    shape = TRITON_WIDE_SHAPE
    logits, target = make_inputs(shape, device=triton_device())
    check_against_reference("triton", logits, target, **ohem_kwargs(shape, 0.2, 0.5))


@requires_triton
@pytest.mark.parametrize("dtype, target_dtype", [(torch.float16, torch.uint8), (torch.bfloat16, torch.int32)])
def test_triton_dtypes(dtype, target_dtype):
    shape = TRITON_SHAPES[0]
    logits, target = make_inputs(shape, dtype=dtype, target_dtype=target_dtype, device=triton_device())
    check_against_reference("triton", logits, target, **ohem_kwargs(shape, 0.2, 0.5))


@requires_triton
def test_triton_rejects_images_beyond_32_bit_offsets():
    from bisenet_fast.triton_kernels import ohem_cross_entropy as triton_ohem

    # Expanded, so nothing of the 2**31 values is allocated: the check comes before any copy.
    logits = torch.zeros(1, 1, 1, 1).expand(1, 2**15, 2**8, 2**8)
    target = torch.zeros(1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"logits holds 2147483648 values per image .* fewer than 2\*\*31"):
        triton_ohem.forward(logits, target, 0.7, 5, 255)
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31"):
        triton_ohem.backward(torch.ones(()), logits, target, torch.tensor(0.5), 255)


@requires_triton
@pytest.mark.parametrize("classes, block_x", [(19, 64), (150, 16)])
def test_triton_rejects_a_target_row_beyond_the_grid(classes, block_x):
    from bisenet_fast.triton_kernels import ohem_cross_entropy as triton_ohem

    # The forward's row segments of BLOCK_X pixels take the grid's y axis (at most 65535):
    # one target row more than 65535 segments wide is refused, naming the width, not launched.
    logits = torch.zeros(1, classes, 1, 1)
    wide = torch.zeros(1, 1, 65535 * block_x + 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"target's width {65535 * block_x + 1} at {classes} classes would need 65536 "
                                         r"programs along one launch axis.*cpp and cuda backends"):
        triton_ohem.forward(logits, wide, 0.7, 5, 255)
    triton_ohem._check_image_size(logits, wide[..., :-1])  # 65535 segments launch


@requires_triton
def test_triton_rejects_a_logits_row_beyond_the_grid():
    from bisenet_fast.triton_kernels import ohem_cross_entropy as triton_ohem

    # The backward's segments of 32 logit columns take the grid's y axis.
    logits = torch.zeros(1, 2, 1, 1).expand(1, 2, 1, 65535 * 32 + 1)
    target = torch.zeros(1, 1, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"logits' width {65535 * 32 + 1} would need 65536 programs"):
        triton_ohem.backward(torch.ones(()), logits, target, torch.tensor(0.5), 255)


@requires_triton
def test_triton_rejects_float64():
    logits, target = make_inputs(TRITON_SHAPES[0], dtype=torch.float64, device=triton_device())
    with bf.backends.use("triton"), pytest.raises(TypeError, match="float64 logits"):
        bf.ops.ohem_cross_entropy(logits, target)
    # Called directly, the custom ops refuse it too (they would compute and return float32).
    ops = torch.ops.bisenet_fast_triton
    with pytest.raises(TypeError, match=r"logits must have dtype in \(float32, float16, bfloat16\), got float64"):
        ops.ohem_cross_entropy_forward(logits, target, 0.7, 5, 255)
    with pytest.raises(TypeError, match=r"logits must have dtype in \(float32, float16, bfloat16\), got float64"):
        ops.ohem_cross_entropy_backward(torch.tensor(1.0, device=logits.device), logits, target,
                                        torch.tensor(0.5, device=logits.device), 255)


# On a GPU, EMULATED_SHAPES and larger cases of the same tilings, with Cityscapes' 19 classes.
CUDA_SHAPES = EMULATED_SHAPES + [
    (4, 19, 32, 32, 256, 256),
    (2, 19, 16, 16, 256, 256),
    (2, 19, 20, 70, 160, 600),
    (1, 3, 2, 2, 300, 700),
    (1, 150, 8, 8, 64, 64),
]


@requires_cuda_build
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("thresh, kept_fraction", OHEM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_reference(backend, shape, thresh, kept_fraction, dtype):
    logits, target = make_inputs(shape, dtype=dtype, device="cuda")
    check_against_reference(backend, logits, target, **ohem_kwargs(shape, thresh, kept_fraction))


@requires_cuda_build
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_edge_cases_and_determinism(backend):
    shape = (2, 5, 9, 13, 67, 101)
    logits, target = make_inputs(shape, device="cuda")
    first = loss_and_grad(backend, logits, target, thresh=0.2, min_kept=3000)
    again = loss_and_grad(backend, logits, target, thresh=0.2, min_kept=3000)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    check_against_reference(backend, logits.contiguous(memory_format=torch.channels_last), target.int(),
                            thresh=0.7, min_kept=10**6)
    empty = target.clone().fill_(255)
    loss, grad = loss_and_grad(backend, logits, empty, thresh=0.7, min_kept=5)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    bad = target.clone()
    bad[1, 3, 4] = 9
    with bf.backends.use(backend), pytest.raises(ValueError, match="neither a class id"):
        bf.ops.ohem_cross_entropy(logits, bad)


@requires_cuda_build
def test_cuda_check_labels_false():
    """Without the check (no host synchronisation) the CUDA kernel gives the checked result,
    and a label out of range makes the loss NaN instead of raising."""
    shape = (2, 5, 9, 13, 67, 101)
    logits, target = make_inputs(shape, device="cuda")
    for kwargs in (dict(thresh=0.2, min_kept=3000), dict(thresh=None)):
        checked = loss_and_grad("cuda", logits, target, **kwargs)
        unchecked = loss_and_grad("cuda", logits, target, check_labels=False, **kwargs)
        assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[1], unchecked[1])
    target[1, 3, 4] = 9
    loss, _ = loss_and_grad("cuda", logits, target, thresh=0.7, min_kept=5, check_labels=False)
    assert loss.isnan()


@requires_cuda
def test_eager_on_cuda_skips_the_label_check_only_when_told(monkeypatch):
    """As the CUDA kernel: with check_labels=False the eager path on a GPU leaves out its label
    check (a host synchronisation), so an eager training step synchronises as often as mmseg's."""
    from bisenet_fast.ops import ohem_cross_entropy as ohem

    checks = []
    monkeypatch.setattr(ohem, "check_target_labels", lambda *args: checks.append(args))
    logits, target = make_inputs(SHAPES[0], device="cuda")
    with bf.backends.use("eager"):
        unchecked = bf.ops.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=5, check_labels=False)
        assert not checks
        checked = bf.ops.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=5)
        assert len(checks) == 1
    assert torch.equal(checked, unchecked)


@requires_cuda_build
def test_cuda_segmentor_checks_labels_once(monkeypatch):
    """On a GPU BiSeNetV2Segmentor.loss has the decode head's op check the labels (one
    synchronisation for the five heads, which share them): a bad label still raises, naming it."""
    model = bf.BiSeNetV2Segmentor(num_classes=5).cuda().train()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    target = torch.randint(0, 5, (2, 64, 64), device="cuda")
    checks, op = [], bf.ops.ohem_cross_entropy
    monkeypatch.setattr(bf.ops, "ohem_cross_entropy", lambda *a, **k: checks.append(k["check_labels"]) or op(*a, **k))
    losses = model.loss(x, target)
    assert checks == [True, False, False, False, False]
    assert all(v.isfinite() for v in losses.values())
    target[1, 7, 9] = 6
    with pytest.raises(ValueError, match="label 6, which is neither a class id"):
        model.loss(x, target)
