"""The CUDA kernels' emulated tests once more, built with AddressSanitizer and
UndefinedBehaviorSanitizer (tests/cuda_emulation: BISENET_FAST_EMULATION_SANITIZE=1), in a
child pytest with libasan preloaded. They catch what the emulation's results cannot show
and a GPU may not report: a read past a tensor's or the shared memory's end, a misaligned
16-byte access (a fault on the GPU), signed overflow in index arithmetic."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cuda_emulation import SOURCES

ROOT = Path(__file__).resolve().parents[1]
EMULATED_TEST_FILES = ["tests/test_ge_layer.py", "tests/test_ohem_cross_entropy.py", "tests/test_bga.py"]


def _runtime(name: str) -> str | None:
    """The path of gcc's runtime library `name`, None if gcc has none."""
    try:
        path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = path.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def test_emulated_kernels_under_sanitizers():
    libasan, libstdcxx = _runtime("libasan.so"), _runtime("libstdc++.so.6")
    if libasan is None or libstdcxx is None:
        pytest.skip("gcc's libasan/libstdc++ not found: the sanitized build needs them")
    env = {
        **os.environ,
        "BISENET_FAST_EMULATION_SANITIZE": "1",
        # libstdc++ too: triton's module throws C++ exceptions, which ASan's interceptor can
        # only forward if libstdc++ was loaded before it.
        "LD_PRELOAD": f"{libasan} {libstdcxx}",
        "ASAN_OPTIONS": "detect_leaks=0",
        "UBSAN_OPTIONS": "print_stacktrace=1",
    }
    # The modules build at once, one process each, before the child's tests need them one
    # after another: the build is most of this test's time.
    builders = [
        subprocess.Popen([sys.executable, "-c", f"from tests.cuda_emulation import load; load({source!r})"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for source in SOURCES
    ]
    for builder in builders:
        log, _ = builder.communicate(timeout=1200)
        assert builder.returncode == 0, log[-6000:]
    # A report aborts the child before pytest prints anything; the report is on its stderr.
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "emulated", *EMULATED_TEST_FILES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert child.returncode == 0 and " passed" in child.stdout, child.stdout[-3000:] + child.stderr[-6000:]
