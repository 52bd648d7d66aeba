"""Triton launches on the current CUDA device, not the tensors': every Triton op makes its
tensors' device current first, as the C++ CUDA ops do with CUDAGuard."""
import contextlib

import pytest
import torch
from torch._library.custom_ops import OPDEFS

import bisenet_fast as bf
from bisenet_fast.ops._triton_device import on_tensors_device
from tests.helpers import requires_triton

TRITON_OPS = sorted(name for name in OPDEFS if name.startswith("bisenet_fast_triton::"))
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


class _OnSecondGpu(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (no GPU here to hold a real one)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_every_triton_op_runs_on_its_tensors_device():
    assert len(TRITON_OPS) == 9, TRITON_OPS
    for name in TRITON_OPS:
        body = OPDEFS[name]._init_fn
        assert body.__code__ is on_tensors_device(lambda: None).__code__, f"{name} does not make its device current"


@pytest.mark.parametrize("as_keyword", [False, True])
def test_the_first_tensor_argument_picks_the_current_device(monkeypatch, as_keyword):
    entered = []

    @contextlib.contextmanager
    def record(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", record)
    body = on_tensors_device(lambda scale, x: (scale, x))
    x = torch.zeros(2).as_subclass(_OnSecondGpu)
    assert (body(2, x=x) if as_keyword else body(2, x))[1] is x
    assert entered == [torch.device("cuda", 1)]
    body(2, torch.zeros(2))  # CPU tensors (the interpreter): nothing to make current
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")
@requires_triton
def test_tensors_on_a_device_that_is_not_current():
    g = torch.Generator().manual_seed(0)
    detail = torch.randn(2, 8, 16, 16, generator=g)
    low = [torch.randn(2, 8, 4, 4, generator=g) for _ in range(3)]
    logits = torch.randn(2, 5, 8, 8, generator=g)
    target = torch.randint(0, 5, (2, 32, 32), generator=g)
    results = {}
    for backend in ("eager", "triton"):
        with torch.cuda.device(0), bf.backends.use(backend):
            inputs = [t.to("cuda:1").requires_grad_() for t in (detail, *low, logits)]
            out = bf.ops.bga_aggregate(*inputs[:4])
            loss = bf.ops.ohem_cross_entropy(inputs[4], target.to("cuda:1"), thresh=0.7, min_kept=100)
            (out.square().sum() + loss).backward()
            results[backend] = [out, loss] + [t.grad for t in inputs]
    for eager, triton in zip(results["eager"], results["triton"]):
        assert triton.device == torch.device("cuda", 1)
        torch.testing.assert_close(triton, eager, rtol=1e-4, atol=1e-5)
