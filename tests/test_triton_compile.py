"""Every Triton kernel compiles for sm_90 (H100/H200) and sm_86, checked ahead of time on a
GPU-less machine by tests/triton_sm90.py in a process without the interpreter."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bisenet_fast as bf

ROOT = Path(__file__).resolve().parents[1]


def _why_skipped() -> str | None:
    problem = bf.backends.triton_install_problem()  # e.g. a CPU-only torch comes without triton
    if problem is not None:
        return problem
    if torch.cuda.is_available():
        # There the Triton tests compile and run every kernel natively; this check would only
        # spend minutes of a lent GPU machine (longer than gpu_check.sh's per-test limit).
        return "a CUDA device is present: the Triton tests compile and run the kernels on it"
    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None or not (Path(spec.origin).parent / "bin" / "ptxas").exists():
        return "Triton's NVIDIA backend (ptxas) is not installed"
    return None


SKIP_REASON = _why_skipped()


@pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.triton_sm90"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "spills" in result.stdout
