"""The compiled extension is linked so that its errors reach Python as exceptions."""
import shutil
import subprocess
import sys

import pytest
import torch

import bisenet_fast as bf


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None, reason="needs Linux readelf")
def test_extension_shares_torchs_libstdcxx():
    # A statically linked libstdc++ gives the extension a C++ runtime of its own; a
    # c10::Error thrown by a kernel is then freed by torch's runtime and the process crashes
    # (seen on a GPU image whose default compiler links libstdc++ statically).
    dynamic = subprocess.run(["readelf", "-d", bf._C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any("libstdc++.so" in line for line in needed), (
        f"{bf._C.__file__} does not link libstdc++ dynamically; rebuild with a compiler that does "
        "(e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc)\n" + "\n".join(needed)
    )


def test_kernel_errors_raise_runtime_error():
    detail = torch.randn(1, 2, 4, 4)
    low = torch.randn(1, 2, 2, 2)
    with pytest.raises(RuntimeError, match="semantic_down"):
        torch.ops.bisenet_fast.bga_aggregate(detail, low, low, low[..., :1])
