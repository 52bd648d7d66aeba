#!/usr/bin/env bash
# The whole test suite against another torch than the Makefile's, on this machine: a venv of
# its own, a clean checkout of HEAD, the extension built there (with CUDA when nvcc and a
# CUDA build of torch are present, as `make test` does), then pytest. For the torch of the
# lent GPU machines (2.11.0 with triton 3.6.0, Python 3.12 there), run before a GPU session
# so that its minutes are not spent on version breakage:
#
#   scripts/test_other_torch.sh 2.11.0 triton==3.6.0 'numpy<2.4'
#
# Arguments: the torch version, then any further pip requirements. Environment: WORK (where
# the venv and checkout go; default /tmp/bisenet_fast-torch-VERSION), PYTEST_ARGS,
# NO_CUDA_BUILD=1 (CPU part only).
set -euo pipefail
version=${1:?usage: scripts/test_other_torch.sh TORCH_VERSION [PIP_REQUIREMENT ...]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/bisenet_fast-torch-$version}
venv=$work/venv
src=$work/src
py=$venv/bin/python

if [ ! -x "$py" ]; then
  python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q "torch==$version" "$@" pillow pytest ninja wheel 'setuptools>=64'
fi
rm -rf "$src"
git clone -q "$repo" "$src"
# The contract (../shared beside the checkout) holds reference files some tests read.
if [ -d "$repo/../shared" ]; then ln -sfn "$(cd "$repo/../shared" && pwd)" "$work/shared"; fi
"$py" -c "import torch; print('torch', torch.__version__)"
"$py" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"

cd "$src"
build_env=(FORCE_CUDA=0)
nvidia=$("$py" -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))" 2>/dev/null || true)
# torch's own CUDA headers (CUDA 13 builds: nvidia/cu13); older CUDA 12 builds lack that
# folder, and then only the CPU part is built.
if [ -n "$nvidia" ] && [ -d "$nvidia/include" ] && [ -x /usr/local/cuda/bin/nvcc ] && [ -z "${NO_CUDA_BUILD:-}" ]; then
  build_env=(FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CUDA_HOME=/usr/local/cuda
             CPATH="$nvidia/include" LIBRARY_PATH="$nvidia/lib")
fi
env "${build_env[@]}" MAX_JOBS="${MAX_JOBS:-2}" "$py" setup.py build_ext --inplace -q
"$py" -c "import bisenet_fast as bf; info = bf.build_info(); print({k: info[k] for k in ('torch', 'triton', 'cuda', 'backends')})"
TRITON_INTERPRET=1 "$py" -m pytest -q -rs -p no:cacheprovider ${PYTEST_ARGS:-}
