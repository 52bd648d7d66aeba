"""Backend registry: what is available, forcing one, the environment override, errors."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bisenet_fast as bf
from bisenet_fast.backends import BackendUnavailableError, resolve

from tests.helpers import CUDA


def test_available_lists_eager_and_cpp_always():
    names = bf.backends.available()
    assert names[:2] == ["eager", "cpp"]
    assert ("cuda" in names) == (CUDA and bf.build_info()["cuda"])


def test_auto_picks_cpp_on_cpu():
    assert bf.backends.current() == "auto"
    assert resolve("op", torch.device("cpu")) == "cpp"


def test_use_forces_and_restores():
    with bf.backends.use("eager") as name:
        assert name == "eager" and bf.backends.current() == "eager"
        assert resolve("op", torch.device("cpu")) == "eager"
        with bf.backends.use("auto"):
            assert resolve("op", torch.device("cpu")) == "cpp"
        assert bf.backends.current() == "eager"
    assert bf.backends.current() == "auto"


def test_use_blocks_left_out_of_order_remove_their_own_choice():
    """Generators (coroutines too) can leave use() blocks in another order than they entered
    them: the first to leave removed the other's choice, and its own went on applying."""
    def forcing(name):
        with bf.backends.use(name):
            yield

    first, second = forcing("eager"), forcing("cpp")
    next(first)
    next(second)
    first.close()
    assert bf.backends.current() == "cpp"
    second.close()
    assert bf.backends.current() == "auto"


def test_cpu_kernels_step_aside_for_another_forced_backend():
    cpu = torch.device("cpu")
    assert bf.backends.cpu_kernel_selected(cpu)
    for forced in ("eager", "triton"):
        with bf.backends.use(forced):
            assert not bf.backends.cpu_kernel_selected(cpu), forced
    with bf.backends.use("cpp"):
        assert bf.backends.cpu_kernel_selected(cpu) and not bf.backends.cpu_kernel_selected(torch.device("meta"))


def test_use_for_named_ops_only(monkeypatch):
    """use(name, ops=...) forces the named ops only; an inner use() for all ops, or the
    environment for the others, still apply; CPU-only kernels ignore op-scoped blocks."""
    monkeypatch.setenv(bf.backends.ENV_VAR, "cpp")
    with bf.backends.use("eager", ops=["ge_layer_stride1"]):
        assert resolve("ge_layer_stride1", torch.device("cpu")) == "eager"
        assert resolve("bga_aggregate", torch.device("cpu")) == "cpp"
        assert bf.backends.current() == "cpp" and bf.backends.cpu_kernel_selected(torch.device("cpu"))
        with bf.backends.use("auto"):
            assert resolve("ge_layer_stride1", torch.device("cpu")) == "cpp"
    assert resolve("ge_layer_stride1", torch.device("cpu")) == "cpp"
    with pytest.raises(TypeError, match="ops must be a collection of op names"):
        with bf.backends.use("eager", ops="ge_layer_stride1"):
            pass
    with pytest.raises(TypeError, match="ops must be a collection of op names, got int"):
        with bf.backends.use("eager", ops=3):  # not "'int' object is not iterable"
            pass
    with pytest.raises(ValueError, match=r"unknown op name\(s\) \['ohem'\]; expected names from"):
        with bf.backends.use("eager", ops=["ohem", "bga_aggregate"]):
            pass


def test_op_names_are_those_the_ops_resolve():
    """backends.OPS, which use(ops=...) checks names against, lists exactly the names the
    fused ops pass to resolve()."""
    package = Path(bf.__file__).parent
    asked = {m for f in package.rglob("*.py") for m in re.findall(r'resolve\(\s*"(\w+)"', f.read_text())}
    assert asked == set(bf.backends.OPS)


def test_resolve_with_a_name_overrides_the_current_choice(monkeypatch):
    """resolve(..., name=...) (an op's backend= argument) is checked as a forced backend."""
    monkeypatch.setenv(bf.backends.ENV_VAR, "eager")
    cpu = torch.device("cpu")
    assert resolve("op", cpu, name="cpp") == "cpp"
    assert resolve("op", cpu, name="auto") == "cpp"
    with bf.backends.use("cpp"):
        assert resolve("op", cpu, name="eager") == "eager"
    with pytest.raises(BackendUnavailableError, match="backend 'cpp' runs CPU tensors"):
        resolve("op", torch.device("meta"), name="cpp")
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        resolve("op", cpu, name="fastest")


def test_fused_backends_per_device(monkeypatch):
    assert bf.backends.fused_backends(torch.device("cpu")) == ["cpp"]
    assert bf.backends.fused_backends(torch.device("meta")) == []
    monkeypatch.setattr(bf.backends, "_build_problem", lambda name: None if name == "triton" else "absent")
    assert bf.backends.fused_backends(torch.device("cuda"), ("cuda", "triton")) == ["triton"]
    assert resolve("op", torch.device("cuda"), ("cuda", "triton")) == "triton"


def test_auto_on_a_gpu_without_a_built_gpu_backend_names_each_reason(monkeypatch):
    monkeypatch.setattr(bf.backends, "_build_problem", lambda name: f"{name} is missing")
    with pytest.raises(BackendUnavailableError, match=r"no fused GPU backend .*cuda: cuda is missing; triton: triton"):
        resolve("op", torch.device("cuda"), ("cuda", "triton"))
    assert bf.backends.fused_backends(torch.device("cuda"), ("cuda", "triton")) == []


def test_environment_variable_and_use_precedence(monkeypatch):
    monkeypatch.setenv(bf.backends.ENV_VAR, "eager")
    assert resolve("op", torch.device("cpu")) == "eager"
    with bf.backends.use("cpp"):
        assert resolve("op", torch.device("cpu")) == "cpp"
    monkeypatch.setenv(bf.backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="BISENET_FAST_BACKEND='fastest' is not a backend"):
        resolve("op", torch.device("cpu"))


def test_use_or_current_keeps_the_current_choice_and_checks_it_now(monkeypatch):
    """What the command lines' --backend defaults to: BISENET_FAST_BACKEND (or an enclosing
    use()) is kept, not overridden by 'auto'; a bad value fails before any work."""
    monkeypatch.setenv(bf.backends.ENV_VAR, "eager")
    with bf.backends.use_or_current(None) as chosen:
        assert chosen == "eager" and resolve("op", torch.device("cpu")) == "eager"
    with bf.backends.use_or_current("cpp"):
        assert resolve("op", torch.device("cpu")) == "cpp"
    monkeypatch.delenv(bf.backends.ENV_VAR)
    with bf.backends.use("eager", ops=["ohem_cross_entropy"]), bf.backends.use_or_current(None):
        assert resolve("ohem_cross_entropy", torch.device("cpu")) == "eager"  # not covered by a global 'auto'
        assert resolve("bga_aggregate", torch.device("cpu")) == "cpp"
    monkeypatch.setenv(bf.backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="BISENET_FAST_BACKEND='fastest' is not a backend"):
        bf.backends.use_or_current(None)
    if not (CUDA and bf.build_info()["cuda"]):
        monkeypatch.setenv(bf.backends.ENV_VAR, "cuda")
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' \\(from BISENET_FAST_BACKEND\\) is not available"):
            bf.backends.use_or_current(None)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        with bf.backends.use("tensorrt"):
            pass


@pytest.mark.skipif(CUDA and bf.build_info()["cuda"], reason="the CUDA backend is available here")
def test_unavailable_cuda_backend_raises_with_reason():
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available: "):
        with bf.backends.use("cuda"):
            pass


def test_backend_that_cannot_run_the_device_raises():
    with bf.backends.use("eager"):
        pass
    if "cuda" in bf.backends.available():
        with bf.backends.use("cuda"):
            with pytest.raises(BackendUnavailableError, match="runs CUDA tensors, got tensors on cpu"):
                resolve("bga_aggregate", torch.device("cpu"))
    with bf.backends.use("cpp"):
        with pytest.raises(BackendUnavailableError, match="backend 'cpp' runs CPU tensors"):
            resolve("bga_aggregate", torch.device("cuda", 0))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if "triton" not in bf.backends.available():
        pytest.skip("triton not installed")
    monkeypatch.setattr(bf.backends, "triton_interpreted", lambda: False)
    if not CUDA:
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1 before importing bisenet_fast"):
            with bf.backends.use("triton"):
                pass


@pytest.mark.skipif(CUDA, reason="the interpreter matters for CPU tensors only")
@pytest.mark.skipif(bf.backends.triton_install_problem() is not None, reason="needs triton")
def test_triton_interpreter_switched_on_after_import_is_refused():
    """Triton decided on its interpreter at its import: a late TRITON_INTERPRET=1 made the
    backend look available, then failed inside the kernel with an InterpreterError."""
    code = ("import os, torch, bisenet_fast as bf; os.environ['TRITON_INTERPRET'] = '1'; "
            "print('triton' in bf.backends.available()); "
            "x = torch.ones(1, 1, 2, 2)\n"
            "try:\n"
            "    with bf.backends.use('triton'): bf.ops.bga_aggregate(x, x, x, x)\n"
            "except bf.backends.BackendUnavailableError as err: print(err)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("False\n") and "TRITON_INTERPRET=1 before importing bisenet_fast" in out, out


@pytest.mark.skipif(CUDA, reason="the interpreter matters for CPU tensors only")
@pytest.mark.skipif(not bf.backends.triton_interpreted(), reason="needs TRITON_INTERPRET=1 at import")
@pytest.mark.parametrize("op", ["ge_layer_stride1", "bga_pointwise_aggregate"])
def test_triton_interpreter_switched_off_after_import_still_computes_bfloat16_dots(monkeypatch, op):
    """The kernels stay interpreted once imported, but whether to upcast bfloat16 tl.dot
    operands (the interpreter multiplies them as raw bits) was read from the environment at
    each call: with TRITON_INTERPRET unset later, results came out ~1e10 off, silently."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).bfloat16()

    if op == "ge_layer_stride1":
        x, y = rand(1, 16, 5, 5), rand(1, 16, 5, 5)
        args = (x, y, rand(96, 1, 3, 3, scale=0.3), rand(96, scale=0.1), rand(16, 96, scale=0.1), rand(16, scale=0.1))
        run, reference = bf.ops.ge_layer_stride1, bf.ops.ge_layer_stride1_reference
    else:
        args = (rand(1, 16, 8, 8), rand(16, 16, scale=0.3), rand(16, scale=0.1), *(rand(1, 16, 2, 2) for _ in range(3)))
        run, reference = bf.ops.bga_pointwise_aggregate, bf.ops.bga_pointwise_aggregate_reference
    expected = reference(*(a.float() for a in args))
    with torch.no_grad(), bf.backends.use("triton"):
        run(*args)  # the kernels' module is imported (and the kernels decorated) at the first call
        monkeypatch.delenv("TRITON_INTERPRET")
        out = run(*args)
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_triton_older_than_the_tested_releases_is_refused_with_its_reason(monkeypatch):
    monkeypatch.setattr(bf.backends, "_triton_version", lambda: (3, 1))
    assert "triton" not in bf.backends.available()
    with pytest.raises(BackendUnavailableError, match="triton 3.1 is older than 3.5"):
        with bf.backends.use("triton"):
            pass
    monkeypatch.setattr(bf.backends, "_triton_version", lambda: None)
    with pytest.raises(BackendUnavailableError, match="triton package is not installed"):
        resolve("bga_aggregate", torch.device("cuda", 0), ("triton",))


def test_build_info_reports_the_build():
    info = bf.build_info()
    assert info["cpu"] is True
    assert isinstance(info["cuda"], bool)
    assert info["torch"] == torch.__version__
    assert info["compiled_with_torch"] == torch.__version__
    assert info["backends"] == bf.backends.available()
    if info["cuda"]:
        assert info["cuda_archs"]
    assert set(info) >= {"cuda_archs", "parallel", "triton", "torch_cuda", "cuda_available"}
    # The docstring is build_info's only documentation: it listed every key but 'parallel'.
    assert [key for key in info if not re.search(rf"\b{key}\b", bf.build_info.__doc__)] == []


def test_cpu_kernels_are_built_to_run_in_parallel():
    """With torch's OpenMP backend, at::parallel_for's `#pragma omp parallel` (a header
    template) runs in parallel only if the extension was compiled with -fopenmp."""
    if not torch.backends.openmp.is_available():
        pytest.skip("torch is not built with OpenMP")
    assert bf.build_info()["openmp"], "bisenet_fast._C was compiled without -fopenmp: its CPU kernels run on one thread"


def test_forcing_a_gpu_backend_the_op_lacks_raises():
    if "triton" not in bf.backends.available():
        pytest.skip("needs triton (TRITON_INTERPRET=1 on the CPU)")
    device = torch.device("cuda" if CUDA else "cpu")
    with bf.backends.use("triton"):
        assert resolve("op", device, ("cuda", "triton")) == "triton"
        with pytest.raises(BackendUnavailableError, match="there is no triton kernel for this op; its GPU backends are cuda"):
            resolve("op", device, ("cuda",))
        with pytest.raises(BackendUnavailableError, match="there is no triton kernel for this op; it has only a CPU kernel$"):
            resolve("op", device, ())


def test_cpu_only_op_on_a_gpu_tensor_raises_under_auto():
    # resolve only looks at the device type, so no GPU is needed to check the message.
    with pytest.raises(BackendUnavailableError, match="op has no GPU kernel .*use\\('eager'\\)"):
        resolve("op", torch.device("cuda"), ())
