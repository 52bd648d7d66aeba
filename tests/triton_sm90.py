"""Compile every Triton kernel for an H100/H200 (sm_90) and an sm_86 GPU on a machine
without a GPU.

The Triton kernels run here only through the interpreter, which never lowers them: a kernel
that the interpreter runs may still fail to compile for a GPU (a type the backend rejects,
an unsupported op, a shared-memory overflow). This drives each op's Python wrapper on CPU
tensors with kernel launches replaced by a recorder, then compiles each recorded launch
ahead of time with Triton's own ptxas, specialised by Triton's own launcher code as a real
launch would be (argument types, constexprs, launch options, and the 16-byte alignment and
divisibility-by-16 hints that select the vectorised variant). The wrappers are driven at
odd small sizes and at the network's own channel counts and sizes divisible by 16 (the
block sizes and hints of the real calls). Kernels are not run, so results after a launch
are garbage; a wrapper that trips over them has already recorded its launches.

    python -m tests.triton_sm90 [--shard K/N]
        (TRITON_INTERPRET must be unset: the interpreter replaces the kernels with Python
        functions. --shard K/N compiles the K-th of N shares of the distinct
        specialisations, so N processes check everything at once.)

Prints one line per compiled kernel (registers, spills, shared memory) and exits non-zero if
any kernel fails to compile, spills registers to the stack, needs more
shared memory than every listed GPU gives a block, or is never launched by the wrappers.
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
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

# The lent GPUs (H100/H200) and the smallest shared memory among the README's architectures.
TARGETS = (GPUTarget("cuda", 90, 32), GPUTarget("cuda", 86, 32))
# The least shared memory a block may opt into among the GPUs the README lists (sm_86 and
# sm_89: 99 KiB; sm_80 163 KiB, sm_90 227 KiB): a kernel above it cannot launch there.
SHARED_LIMIT = 99 * 1024

launches: list[tuple[JITFunction, tuple, dict]] = []
# Architectures the launches recorded from now on are compiled for (None: every target).
_recorded_archs: tuple[int, ...] | None = None
launch_archs: list[tuple[int, ...] | None] = []


class _Recorder:
    def __init__(self, fn: JITFunction):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        launches.append((self.fn, args, kwargs))
        launch_archs.append(_recorded_archs)


def specialise(fn: JITFunction, args: tuple, kwargs: dict, target: GPUTarget):
    """(signature, constexprs, attrs, options) of the launch fn[grid](*args, **kwargs) on
    `target`, as JITFunction.run computes them: Triton's binder and _pack_args (private, the
    same in triton 3.5 to 3.8) turn the call's values into the signature, constexprs,
    specialisation attributes and options."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def compile_specialisation(fn: JITFunction, specialisation, target: GPUTarget):
    signature, constexprs, attrs, options = specialisation
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(kernel) -> tuple[int, int]:
    """(registers, stack bytes) per thread of a compiled kernel, read from its cubin with the
    cuobjdump Triton ships (the loaded-kernel attributes need a GPU). Register spills live in
    the stack frame (cuobjdump's LOCAL stays 0 for them); a Triton kernel has no other use
    for one."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        report = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if found is None:
        raise RuntimeError(f"no register and stack usage in cuobjdump's report:\n{report}")
    return int(found.group(1)), int(found.group(2))


# The network's GE layers (cin, cout, stride; mid = 6 * cin) and GE expansion convs in
# training (cin, ratio, stride, relu), as tests/test_ge_layer.py and test_ge_expand_train.py
# list them.
GE_LAYERS = [(16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]
GE_EXPANSIONS = [(16, 6, 2, False), (96, 1, 1, True), (32, 6, 1, True), (32, 6, 2, False), (192, 1, 1, True),
                 (64, 6, 1, True), (64, 6, 2, False), (384, 1, 1, True), (128, 6, 1, True)]


def _attempt(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except Exception:  # noqa: BLE001 - results of unrun kernels are garbage; the launches are recorded
        pass


def _drive_bga(dtype, channels, high, low) -> None:
    from bisenet_fast.triton_kernels import bga, bga_pointwise

    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        detail = torch.randn(2, channels, *high, dtype=dtype).contiguous(memory_format=fmt)
        lows = [torch.randn(2, channels, *low, dtype=dtype).contiguous(memory_format=fmt) for _ in range(3)]
        _attempt(bga.bga_forward, detail, *lows, channels_last=channels_last)
        _attempt(bga.bga_backward, torch.randn_like(detail), detail, *lows, channels_last=channels_last)
        _attempt(bga_pointwise.bga_pointwise_forward, detail, torch.randn(channels, channels, dtype=dtype),
                 torch.randn(channels, dtype=dtype), *lows, channels_last=channels_last)


def _drive_ge_layer(dtype, cin, cout, stride, size) -> None:
    from bisenet_fast.ops.ge_layer import pack_triton_stride1, pack_triton_stride2
    from bisenet_fast.triton_kernels import ge_layer

    mid = 6 * cin
    x = torch.randn(1, cin, *size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    dw = (torch.randn(mid, 1, 3, 3, dtype=dtype), torch.randn(mid, dtype=dtype))
    pw = (torch.randn(cout, mid, dtype=dtype), torch.randn(cout, dtype=dtype))
    if stride == 1:
        _attempt(ge_layer.ge_layer_stride1_triton, x, x, *pack_triton_stride1(*dw, *pw))
    else:
        shortcut = (torch.randn(cin, 1, 3, 3, dtype=dtype), torch.randn(cin, dtype=dtype),
                    torch.randn(cout, cin, dtype=dtype), torch.randn(cout, dtype=dtype))
        _attempt(ge_layer.ge_layer_stride2_triton, x, x, *pack_triton_stride2(*dw, *dw, *pw, *shortcut))


def _drive_ge_expand_train(dtype, cin, ratio, stride, relu, size) -> None:
    from bisenet_fast.triton_kernels import ge_expand_train

    mid = cin * ratio
    x = torch.randn(1, cin, *size, dtype=dtype)
    weight = torch.randn(mid, 1, 3, 3, dtype=dtype)
    gamma, beta = torch.rand(mid), torch.randn(mid)
    _attempt(ge_expand_train.ge_expand_train_triton, x, weight, gamma, beta, stride, relu, 1e-5)
    out_size = (1, mid, (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)
    _attempt(ge_expand_train.ge_expand_train_backward_triton, torch.randn(out_size, dtype=dtype), x, weight,
             gamma, beta, torch.zeros(mid), torch.ones(mid), stride, relu, 1e-5)


def _drive_ohem(dtype, logits_shape, target_shape) -> None:
    from bisenet_fast.triton_kernels import ohem_cross_entropy

    logits = torch.randn(*logits_shape, dtype=dtype)
    for target_dtype in (torch.uint8, torch.int32, torch.int64):
        target = torch.randint(0, logits_shape[1], target_shape).to(target_dtype)
        _attempt(ohem_cross_entropy.forward, logits, target, 0.7, 100, 255)
        _attempt(ohem_cross_entropy.backward, torch.ones(()), logits, target, torch.tensor(0.5), 255)


def _drive_wrappers() -> None:
    """Call every op's Triton wrapper: each dtype and layout the ops accept at odd small
    sizes, and the network's channel counts at sizes divisible by 16."""
    from bisenet_fast.triton_kernels import ohem_cross_entropy

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        _drive_bga(dtype, 8, (12, 20), (3, 5))
        _drive_bga(dtype, 128, (32, 64), (8, 16))
        if dtype != torch.float32:  # float32: below
            _drive_ge_layer(dtype, 16, 16, 1, (10, 14))
            _drive_ge_layer(dtype, 16, 32, 2, (10, 14))
        _drive_ge_expand_train(dtype, 16, 6, 1, True, (10, 14))
        _drive_ge_expand_train(dtype, 16, 6, 2, False, (10, 14))
        _drive_ohem(dtype, (2, 19, 9, 13), (2, 67, 101))
        _drive_ohem(dtype, (4, 19, 32, 32), (4, 256, 256))
    # The GE layers in float32: 3xTF32 dots (cuDNN kept off TF32) at the odd small sizes for
    # every target; TF32 dots there, and the network's layers in both precisions, for sm_90
    # only: sm_86 float32 builds of those spill (triton_kernels/ge_layer.py says why that is
    # accepted).
    global _recorded_archs
    allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        _drive_ge_layer(torch.float32, 16, 16, 1, (10, 14))
        _drive_ge_layer(torch.float32, 16, 32, 2, (10, 14))
        _recorded_archs = (90,)
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = tf32
            if tf32:
                _drive_ge_layer(torch.float32, 16, 16, 1, (10, 14))
                _drive_ge_layer(torch.float32, 16, 32, 2, (10, 14))
            for cin, cout, stride in GE_LAYERS:
                _drive_ge_layer(torch.float32, cin, cout, stride, (32, 64))
                _drive_ge_layer(torch.float32, cin, cout, stride, (8, 16))
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
        _recorded_archs = None
    # The network's layers in float16, the dtype of the published fps setting (inference) and
    # of AMP training (the block sizes depend on the channels, not on the dtype): with the
    # interpreter's SM count 64- and 16-pixel blocks, unsplit; with an H100's/H200's 132 SMs
    # the 16-pixel blocks and split K loops (ge_layer._k_splits) the deep layers get there.
    from bisenet_fast.triton_kernels import ge_layer

    interpreter_sms = ge_layer.INTERPRETER_SMS
    try:
        for ge_layer.INTERPRETER_SMS in (interpreter_sms, 132):
            for cin, cout, stride in GE_LAYERS:
                for size in ((32, 64), (8, 16)):
                    _drive_ge_layer(torch.float16, cin, cout, stride, size)
    finally:
        ge_layer.INTERPRETER_SMS = interpreter_sms
    for cin, ratio, stride, relu in GE_EXPANSIONS:
        _drive_ge_expand_train(torch.float16, cin, ratio, stride, relu, (32, 64))
    _attempt(ohem_cross_entropy._kth_smallest, torch.rand(5000), 10)


def _all_kernels() -> set[str]:
    from bisenet_fast.triton_kernels import bga, bga_pointwise, ge_expand_train, ge_layer, ohem_cross_entropy

    return {_kernel_name(value) for module in (bga, bga_pointwise, ge_expand_train, ge_layer, ohem_cross_entropy)
            for name, value in vars(module).items()
            if isinstance(value, JITFunction) and name.endswith("_kernel")}


def _kernel_name(fn: JITFunction) -> str:
    """module.function of the module that defines the kernel (others may import it)."""
    return f"{fn.fn.__module__.rsplit('.', 1)[1]}.{fn.__name__}"


def _distinct_compilations() -> list[tuple[str, JITFunction, tuple, GPUTarget]]:
    """(kernel name, fn, specialisation, target) of every distinct compilation the recorded
    launches need, in launch order (many launches share a specialisation)."""
    found, keys = [], set()
    for (fn, args, kwargs), archs in zip(launches, launch_archs):
        for target in TARGETS:
            if archs is not None and target.arch not in archs:
                continue
            specialisation = specialise(fn, args, kwargs, target)
            signature, constexprs, attrs, options = specialisation
            key = (_kernel_name(fn), target.arch, repr(signature), repr(constexprs), repr(attrs), repr(options))
            if key not in keys:
                keys.add(key)
                found.append((_kernel_name(fn), fn, specialisation, target))
    return found


def _parse_shard(argv: list[str]) -> tuple[int, int]:
    if not argv:
        return 0, 1
    if len(argv) == 2 and argv[0] == "--shard":
        k, _, n = argv[1].partition("/")
        if k.isdigit() and n.isdigit() and 0 <= int(k) < int(n):
            return int(k), int(n)
    raise SystemExit(f"usage: python -m tests.triton_sm90 [--shard K/N] with 0 <= K < N, got {' '.join(argv)}")


def main(argv: list[str]) -> int:
    shard, shards = _parse_shard(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels with Python functions", file=sys.stderr)
        return 2
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda self, grid: _Recorder(self)
    try:
        _drive_wrappers()
    finally:
        JITFunction.__getitem__ = original

    failures = []
    compilations = _distinct_compilations()
    for name, fn, specialisation, target in compilations[shard::shards]:
        where = f"{name} (sm_{target.arch})"
        try:
            kernel = compile_specialisation(fn, specialisation, target)
        except Exception as error:  # noqa: BLE001 - report every kernel, then fail
            failures.append(f"{where}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            continue
        if kernel.metadata.shared > SHARED_LIMIT:
            failures.append(f"{where}: {kernel.metadata.shared} B of shared memory, more than the {SHARED_LIMIT} B "
                            "an sm_86/sm_89 block may use")
        registers, stack = resource_usage(kernel)
        print(f"{where}: {registers} registers, {stack} B stack (spills), {kernel.metadata.shared} B shared, "
              f"{kernel.metadata.num_warps} warps")
        # Spills cost: the OHEM backward's 1.8 KiB per thread took it from 10.6 to 28 ms
        # on an H200, and the GE stride-2 kernel's 10 KiB made it 0.1-0.5x eager.
        if stack:
            failures.append(f"{where}: spills {stack} B of registers per thread to the stack")
    for name in sorted(_all_kernels() - {_kernel_name(fn) for fn, _, _ in launches}):
        failures.append(f"{name}: never launched by the wrappers")
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
