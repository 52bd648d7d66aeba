"""benchmarks.timing: saved_activation_mb on graphs whose saved tensors are known, and the
GPU kernel time (device_ms) against what a known kernel must take."""
import pytest
import torch

from benchmarks.timing import device_busy_ms, measure, saved_activation_mb, speedups
from tests.helpers import requires_cuda

N = 1024  # float32 elements: 4 KiB per tensor
KIB = 4096 / 2**20  # one such tensor in MB


def leaves(count: int) -> list[torch.Tensor]:
    return [torch.randn(N, requires_grad=True) for _ in range(count)]


def test_product_saves_both_factors():
    x, y = leaves(2)
    assert saved_activation_mb(lambda: (x * y).sum()) == pytest.approx(2 * KIB)


def test_excluded_tensors_are_not_counted():
    x, y = leaves(2)
    assert saved_activation_mb(lambda: (x * y).sum(), exclude=[x]) == pytest.approx(KIB)


def test_views_of_one_storage_count_once():
    (x,) = leaves(1)

    def fn():
        e = x.exp()  # saves its output e
        square = e.view(32, 32) @ e.view(32, 32)  # saves two views of e
        return (square * e.view(32, 32)).sum()  # saves square and a third view of e

    assert saved_activation_mb(fn) == pytest.approx(2 * KIB)


def test_slice_counts_its_whole_storage():
    (x,) = leaves(1)
    big = torch.randn(4 * N)
    assert saved_activation_mb(lambda: (x * big[:N]).sum(), exclude=[x]) == pytest.approx(4 * KIB)


def test_unsaved_temporaries_and_no_grad_are_not_counted():
    (x,) = leaves(1)
    assert saved_activation_mb(lambda: (x * 2 + 1).sum()) == 0  # scalar mul/add save no tensor

    def no_grad_fn():
        with torch.no_grad():
            return (x * x).sum()

    assert saved_activation_mb(no_grad_fn) == 0


def test_custom_function_save_for_backward_is_counted():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a * a

        @staticmethod
        def backward(ctx, grad):
            (a,) = ctx.saved_tensors
            return 2 * a * grad

    (x,) = leaves(1)
    doubled = x.detach() * 2  # a non-leaf storage distinct from x
    assert saved_activation_mb(lambda: Square.apply(doubled.requires_grad_()).sum()) == pytest.approx(KIB)


def test_speedups_use_device_time_only_when_both_have_it():
    eager, fused = {"ms": 4.0, "device_ms": 2.0}, {"ms": 2.0, "device_ms": 0.5}
    assert speedups(eager, fused) == {"speedup_vs_eager": 2.0, "device_ms": 0.5, "device_x_eager": 4.0}
    assert speedups({"ms": 4.0}, fused)["device_x_eager"] is None


@requires_cuda
def test_device_time_counts_the_kernels_and_not_the_host():
    x = torch.empty(64 * 2**20, device="cuda")  # 256 MB: a fill takes >= ~50 us on any GPU
    one_fill, kernels = device_busy_ms(lambda: x.fill_(1.0), x.device)
    three_fills, _ = device_busy_ms(lambda: [x.fill_(v) for v in (1.0, 2.0, 3.0)], x.device)
    assert one_fill is not None and one_fill > 0.02
    assert three_fills == pytest.approx(3 * one_fill, rel=0.3)
    assert len(kernels) == 1 and sum(kernels.values()) == pytest.approx(one_fill)  # the fill kernel, by name
    timing = measure(lambda: x.fill_(1.0), x.device, warmup=1, repeats=5)
    assert 0 < timing["device_ms"] <= timing["ms"] * 1.05  # events include launch and host time
    assert speedups(timing, timing)["device_kernels"] == timing["device_kernels"]
