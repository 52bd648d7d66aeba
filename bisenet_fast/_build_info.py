import importlib.metadata

import torch

from bisenet_fast import _C


def _version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_info() -> dict:
    """What was compiled into bisenet_fast._C and what it runs with.

    Keys: cpu (always True), cuda (CUDA kernels compiled), cuda_archs (TORCH_CUDA_ARCH_LIST
    of the build), openmp, parallel (ATen's parallel_info(): threads and parallel backend in
    this process), compiled_with_torch, torch, torch_cuda, triton (version or None),
    cuda_available, backends (those that can run here).
    """
    from bisenet_fast import backends

    info = dict(_C.build_info())
    info.update(
        cpu=True,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton=_version_of("triton"),
        cuda_available=torch.cuda.is_available(),
        backends=backends.available(),
    )
    return info
