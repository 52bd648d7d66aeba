"""The compiled extension is linked so that its errors reach Python as exceptions."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[1]


def test_sdist_carries_every_source_the_build_needs(tmp_path):
    # `pip install bisenet_fast-*.tar.gz` (and `python -m build`, which builds the wheel from
    # the sdist) compiles from the sdist alone: without MANIFEST.in setuptools packs neither
    # the headers nor, when the sdist is made without CUDA, the .cu sources.
    subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "--dist-dir", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "FORCE_CUDA": "0"}, check=True, capture_output=True,
    )
    (archive,) = tmp_path.glob("bisenet_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = [
        path.relative_to(ROOT).as_posix()
        for folder in ("csrc", "triton_kernels", "bisenet_fast/configs")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert needed and not sorted(set(needed) - packed)
    # Tests that need the repository's helpers and data would be packed without them.
    assert not [name for name in packed if name.startswith("tests/") or name == "Makefile"]


def test_a_build_without_torch_says_to_build_without_isolation(tmp_path):
    """A plain `pip install .` runs setup.py in pip's isolated build environment, which has no
    torch: the build failed with a bare "No module named 'torch'" beside an installed torch."""
    (tmp_path / "torch").mkdir()  # a torch that cannot be imported, as in that environment
    (tmp_path / "torch" / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path), "FORCE_CUDA": "0"})
    assert result.returncode != 0
    assert "pip install --no-build-isolation ." in result.stderr, result.stderr

@pytest.fixture
def setup_functions(monkeypatch):
    """setup.py's functions, run without building (setuptools.setup does nothing)."""
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("FORCE_CUDA", "0")
    return runpy.run_path(str(ROOT / "setup.py"))


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build")
def test_cuda_is_built_only_where_nvcc_is(setup_functions, tmp_path, monkeypatch):
    """torch's CUDA_HOME can be a runtime-only toolkit (/usr/local/cuda without nvcc): a plain
    install builds the CPU kernels there, and FORCE_CUDA=1 says nvcc is missing."""
    want_cuda = setup_functions["want_cuda"]
    monkeypatch.setitem(want_cuda.__globals__, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("FORCE_CUDA")
    assert not want_cuda()
    monkeypatch.setenv("FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match=f"nvcc was not found under CUDA_HOME={tmp_path}"):
        want_cuda()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    assert want_cuda()
    monkeypatch.delenv("FORCE_CUDA")
    assert want_cuda()
    monkeypatch.setenv("FORCE_CUDA", "0")
    assert not want_cuda()


def test_an_unbuilt_checkout_says_how_to_build(tmp_path):
    shutil.copytree(ROOT / "bisenet_fast", tmp_path / "bisenet_fast",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    # The editable install's finder would still hand out this checkout's built _C.
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "import bisenet_fast")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert "bisenet_fast._C could not be loaded" in result.stderr and "make setup" in result.stderr
