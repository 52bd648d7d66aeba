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
    # One process per core, each compiling its share: the compilations are this test's time.
    shards = max(1, min(4, os.cpu_count() or 1))
    children = [
        subprocess.Popen([sys.executable, "-m", "tests.triton_sm90", "--shard", f"{shard}/{shards}"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for shard in range(shards)
    ]
    for child in children:
        stdout, stderr = child.communicate(timeout=900)
        assert child.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert "spills" in stdout
