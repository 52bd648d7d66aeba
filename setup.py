"""Builds bisenet_fast._C: C++ CPU kernels always, CUDA kernels when CUDA is usable.

CUDA is compiled when torch is a CUDA build and nvcc is found and a GPU is visible, or
whenever FORCE_CUDA=1 (e.g. on a build machine without a GPU). FORCE_CUDA=0 disables it.
TORCH_CUDA_ARCH_LIST picks the architectures (default: 8.0;8.6;8.9;9.0).
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
except ModuleNotFoundError as err:  # pip's isolated build environment has no torch: say what to run instead
    raise SystemExit(
        f"bisenet_fast compiles against the torch already installed, which this build cannot import ({err}). "
        "Install torch first, then build without pip's isolated environment: "
        "pip install --no-build-isolation .  (or -e . ; see README.md, 'Installing into your own environment')"
    ) from None
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def nvcc_found() -> bool:
    """torch's CUDA_HOME may be a runtime-only toolkit (it falls back to /usr/local/cuda when
    that folder exists), which cannot compile: nvcc itself must be there."""
    return CUDA_HOME is not None and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))


def want_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA", "")
    if force == "0":
        return False
    if torch.version.cuda is None or not nvcc_found():
        if force == "1":
            raise RuntimeError(
                "FORCE_CUDA=1 but "
                + ("torch is a CPU-only build" if torch.version.cuda is None
                   else f"nvcc was not found under CUDA_HOME={CUDA_HOME} (set CUDA_HOME to a CUDA toolkit)")
            )
        return False
    return force == "1" or torch.cuda.is_available()


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("BISENET_FAST_TORCH_VERSION", f'"{torch.__version__}"')]
    # at::parallel_for is a header template: with torch's OpenMP backend (the pip wheels'),
    # its `#pragma omp parallel` only runs in parallel when the extension itself is compiled
    # with -fopenmp; without it every CPU kernel silently runs on one thread. Compile only:
    # the GOMP_* calls then bind, at load time, to the OpenMP runtime libtorch_cpu already
    # depends on, so there is one runtime and no link-time need for the compiler's libgomp.
    cxx_flags = ["-O3"]
    if torch.backends.openmp.is_available():
        cxx_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not want_cuda():
        define_macros.append(("BISENET_FAST_CUDA_ARCHS", '""'))
        return CppExtension(
            "bisenet_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    define_macros += [("BISENET_FAST_WITH_CUDA", None), ("BISENET_FAST_CUDA_ARCHS", f'"{archs}"')]
    return CUDAExtension(
        "bisenet_fast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )


setup(
    packages=find_packages(include=["bisenet_fast", "bisenet_fast.*"]),
    package_data={"bisenet_fast": ["configs/*.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
