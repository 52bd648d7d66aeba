"""benchmarks.timing: saved_activation_mb on graphs whose saved tensors are known, the
GPU kernel time (device_ms) against what a known kernel must take, the CPU peak memory of
known allocations, and the check of each row's output against the eager row's."""
import pytest
import torch

from benchmarks.timing import (accuracy, cpu_peak_extra_mb, device_busy_ms, measure, output_check,
                               saved_activation_mb, speedups)
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


def test_output_check_accepts_rounding_and_flags_a_wrong_result():
    ref = (torch.randn(64, 64), torch.randn(8))
    close = (ref[0] * (1 + 1e-3), ref[1])
    assert output_check(close, ref, torch.float32) == {"rel_err": pytest.approx(1e-3, rel=0.01), "output_ok": True}
    wrong = (ref[0], ref[1].flip(0))
    assert not output_check(wrong, ref, torch.float32)["output_ok"]
    nan = (ref[0].clone().index_fill_(0, torch.tensor([3]), float("nan")), ref[1])
    assert not output_check(nan, ref, torch.float32)["output_ok"]


def test_output_check_refuses_outputs_that_do_not_correspond():
    with pytest.raises(ValueError, match="do not match the reference"):
        output_check(torch.zeros(3, 4), torch.zeros(4, 3), torch.float32)
    with pytest.raises(ValueError, match="do not match the reference"):
        output_check((torch.zeros(3),), (torch.zeros(3), torch.zeros(3)), torch.float32)
    with pytest.raises(ValueError, match="do not match the reference"):  # a row that returned nothing
        output_check(None, (torch.zeros(3), torch.zeros(3)), torch.float32)


def test_measure_keeps_the_first_output_before_later_calls_overwrite_it():
    """A CUDA graph replay (or any fn writing into one buffer) returns the same tensor each
    call: the output checked must be a copy of the first call's."""
    buffer, calls = torch.zeros(3), []

    def fn():
        calls.append(1)
        return buffer.fill_(len(calls))

    timing = measure(fn, "cpu", warmup=2, repeats=2)
    assert torch.equal(timing["output"], torch.ones(3))
    assert len(calls) == 2 + 2 + 1  # warm-up, timed, and the CPU peak-memory pass
    calls.clear()
    timing = measure(fn, "cpu", warmup=0, repeats=2, cpu_peak_memory=False)  # the first timed call's
    assert torch.equal(timing["output"], torch.ones(3)) and len(calls) == 2 and timing["peak_extra_mb"] is None


def test_a_wrong_small_part_is_not_drowned_by_a_large_one():
    """A loss of ~3 beside a gradient of norm ~0.01 (OHEM's step returns both): a zeroed or
    negated gradient must fail although the two together differ by < 1 %."""
    loss, grad = torch.tensor(3.0), torch.randn(1000) * 3e-4
    assert output_check((loss, grad), (loss, grad * (1 + 1e-4)), torch.float32)["output_ok"]
    assert not output_check((loss, torch.zeros_like(grad)), (loss, grad), torch.float32)["output_ok"]
    assert not output_check((loss, -grad), (loss, grad), torch.float32)["output_ok"]
    # a list is one group: all the parameters' gradients normed together
    grads = [torch.randn(100), torch.randn(3) * 1e-6]
    assert output_check((loss, [grads[0], grads[1] * 2]), (loss, grads), torch.float32)["output_ok"]


def test_accuracy_compares_with_the_eager_row_only():
    eager = {"output": torch.ones(4)}
    assert accuracy(eager, eager, torch.float32) == {}
    assert accuracy(eager, {"output": torch.full((4,), 2.0)}, torch.float16)["output_ok"] is False
    assert accuracy({"output": None}, {"output": torch.ones(4)}, torch.float32) == {}  # nothing to compare


def test_cpu_peak_counts_what_the_allocator_held_at_once():
    """4 MiB and 8 MiB held together, then 4 MiB freed and 4 MiB allocated again: 12 MiB at
    peak, whatever was allocated before the call."""
    resident = torch.empty(3 * 2**20)  # noqa: F841 - held through the call, not counted

    def fn():
        a = torch.empty(2**20)
        b = torch.empty(2 * 2**20)
        del a
        c = torch.empty(2**20)
        return b, c

    assert cpu_peak_extra_mb(fn) == pytest.approx(12, abs=0.01)
    assert measure(fn, "cpu", warmup=1, repeats=1)["peak_extra_mb"] == pytest.approx(12, abs=0.01)


def test_gpu_timing_starts_its_clock_after_the_l2_flush_is_done(monkeypatch):
    """measure()'s GPU branch, run here with torch.cuda faked. Each timed call must wait for
    the L2 flush before its start event is queued: queued behind the flush, the event is
    recorded only when the flush ends on the GPU, while the host already runs the call, and
    up to the flush's duration of host overhead would drop out of "ms"."""
    from benchmarks import timing

    log = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            log.append("record")

        def synchronize(self):
            log.append("wait")

        def elapsed_time(self, end):
            return 2.0

    class FakeFlush:
        def zero_(self):
            log.append("flush")

    monkeypatch.setattr(timing, "_l2_flush_buffer", lambda device: FakeFlush())
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(timing, "device_busy_ms", lambda fn, device, **kwargs: (0.5, {"kernel": 0.5}))

    def fn():
        log.append("fn")
        return torch.ones(2)

    timing_ = measure(fn, "cuda", warmup=1, repeats=2)
    one_call = ["flush", "sync", "record", "fn", "record", "wait"]
    assert log == ["fn", "sync"] + one_call * 2
    assert timing_["ms"] == 2.0 and timing_["peak_extra_mb"] == 2.0 and timing_["device_ms"] == 0.5
    assert torch.equal(timing_["output"], torch.ones(2)) and timing_["device_kernels"] == {"kernel": 0.5}
