"""Compile every Triton kernel for an H100/H200 (sm_90) on a machine without a GPU.

The Triton kernels run here only through the interpreter, which never lowers them: a kernel
that the interpreter runs may still fail to compile for a GPU (a type the backend rejects,
an unsupported op, a shared-memory overflow). This drives each op's Python wrapper on small
CPU tensors with kernel launches replaced by a recorder, then compiles each recorded launch
(the argument types, constexprs and launch options of the real call) ahead of time for
GPUTarget("cuda", 90, 32) with Triton's own ptxas. Kernels are not run, so results after a
launch are garbage; a wrapper that trips over them has already recorded its launches.

    python -m tests.triton_sm90        (TRITON_INTERPRET must be unset: the interpreter
                                        replaces the kernels with Python functions)

Prints one line per compiled kernel (registers, spills, shared memory) and exits non-zero if
any kernel fails to compile, needs more shared memory than every listed GPU gives a block,
or is never launched by the wrappers.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
                 torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8", torch.bool: "*i1"}
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas")
# The least shared memory a block may opt into among the GPUs the README lists (sm_86 and
# sm_89: 99 KiB; sm_80 163 KiB, sm_90 227 KiB): a kernel above it cannot launch there.
SHARED_LIMIT = 99 * 1024

launches: list[tuple[JITFunction, tuple, dict]] = []


class _Recorder:
    def __init__(self, fn: JITFunction):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        launches.append((self.fn, args, kwargs))


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for argument {value!r}")


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict):
    signature, constexprs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        value = args[i] if i < len(args) else kwargs.get(name, param.default)
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            signature[name] = _arg_type(value)
    options = {k: kwargs[k] for k in OPTION_NAMES if k in kwargs}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET, options=options)


def resource_usage(kernel) -> str:
    """Registers and local memory (spills) of a compiled kernel, read from its cubin with
    the cuobjdump Triton ships (the loaded-kernel attributes need a GPU)."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        report = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) .*LOCAL:(\d+)", report)
    return f"{found.group(1)} registers, {found.group(2)} B local (spills)" if found else "resource usage unknown"


def _drive_wrappers() -> None:
    """Call every op's Triton wrapper, each dtype and layout the ops accept."""
    from bisenet_fast.triton_kernels import bga, bga_pointwise, ge_expand_train, ge_layer, ohem_cross_entropy

    def attempt(call, *args, **kwargs):
        try:
            call(*args, **kwargs)
        except Exception:  # noqa: BLE001 - results of unrun kernels are garbage; the launches are recorded
            pass

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            detail = torch.randn(2, 8, 12, 20, dtype=dtype).contiguous(memory_format=fmt)
            low = [torch.randn(2, 8, 3, 5, dtype=dtype).contiguous(memory_format=fmt) for _ in range(3)]
            attempt(bga.bga_forward, detail, *low, channels_last=channels_last)
            attempt(bga.bga_backward, torch.randn_like(detail), detail, *low, channels_last=channels_last)
            attempt(bga_pointwise.bga_pointwise_forward, detail, torch.randn(8, 8, dtype=dtype),
                    torch.randn(8, dtype=dtype), *low, channels_last=channels_last)

        cin, mid = 16, 96
        x = torch.randn(1, cin, 10, 14, dtype=dtype).contiguous(memory_format=torch.channels_last)
        attempt(ge_layer.ge_layer_stride1_triton, x, x, torch.randn(mid, 1, 3, 3, dtype=dtype),
                torch.randn(mid, dtype=dtype), torch.randn(cin, mid, dtype=dtype), torch.randn(cin, dtype=dtype))
        cout = 32
        attempt(ge_layer.ge_layer_stride2_triton, x, x, torch.randn(mid, 1, 3, 3, dtype=dtype),
                torch.randn(mid, dtype=dtype), torch.randn(mid, 1, 3, 3, dtype=dtype), torch.randn(mid, dtype=dtype),
                torch.randn(cout, mid, dtype=dtype), torch.randn(cout, dtype=dtype),
                torch.randn(cin, 1, 3, 3, dtype=dtype), torch.randn(cin, dtype=dtype),
                torch.randn(cout, cin, dtype=dtype), torch.randn(cout, dtype=dtype))

        for stride, relu in ((1, True), (2, False)):
            weight = torch.randn(mid, 1, 3, 3, dtype=dtype)
            gamma, beta = torch.rand(mid), torch.randn(mid)
            attempt(ge_expand_train.ge_expand_train_triton, x, weight, gamma, beta, stride, relu, 1e-5)
            out_size = (1, mid, (10 - 1) // stride + 1, (14 - 1) // stride + 1)
            attempt(ge_expand_train.ge_expand_train_backward_triton, torch.randn(out_size, dtype=dtype), x, weight,
                    gamma, beta, torch.zeros(mid), torch.ones(mid), stride, relu, 1e-5)

        logits = torch.randn(2, 19, 9, 13, dtype=dtype)
        for target_dtype in (torch.uint8, torch.int32, torch.int64):
            target = torch.randint(0, 19, (2, 67, 101)).to(target_dtype)
            attempt(ohem_cross_entropy.forward, logits, target, 0.7, 100, 255)
            attempt(ohem_cross_entropy.backward, torch.ones(()), logits, target, torch.tensor(0.5), 255)
    attempt(ohem_cross_entropy._kth_smallest, torch.rand(5000), 10)


def _all_kernels() -> set[str]:
    from bisenet_fast.triton_kernels import bga, bga_pointwise, ge_expand_train, ge_layer, ohem_cross_entropy

    return {_kernel_name(value) for module in (bga, bga_pointwise, ge_expand_train, ge_layer, ohem_cross_entropy)
            for name, value in vars(module).items()
            if isinstance(value, JITFunction) and name.endswith("_kernel")}


def _kernel_name(fn: JITFunction) -> str:
    """module.function of the module that defines the kernel (others may import it)."""
    return f"{fn.fn.__module__.rsplit('.', 1)[1]}.{fn.__name__}"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels with Python functions", file=sys.stderr)
        return 2
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda self, grid: _Recorder(self)
    try:
        _drive_wrappers()
    finally:
        JITFunction.__getitem__ = original

    failures, compiled, seen = [], set(), set()
    for fn, args, kwargs in launches:
        name = _kernel_name(fn)
        try:
            kernel = compile_launch(fn, args, kwargs)
        except Exception as error:  # noqa: BLE001 - report every kernel, then fail
            failures.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            continue
        compiled.add(name)
        if kernel.metadata.shared > SHARED_LIMIT:
            failures.append(f"{name}: {kernel.metadata.shared} B of shared memory, more than the {SHARED_LIMIT} B "
                            "an sm_86/sm_89 block may use")
        if kernel.metadata.hash not in seen:  # a specialisation seen before compiles from Triton's cache
            seen.add(kernel.metadata.hash)
            print(f"{name}: {resource_usage(kernel)}, {kernel.metadata.shared} B shared, "
                  f"{kernel.metadata.num_warps} warps")
    never = sorted(_all_kernels() - compiled - {f.split(':')[0] for f in failures})
    for name in never:
        failures.append(f"{name}: never launched by the wrappers")
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
