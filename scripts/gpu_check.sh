#!/usr/bin/env bash
# GPU validation in one go, for a lent GPU machine where torch, triton, nvcc, ninja and
# pytest are already installed: build the extension in place with CUDA, run the whole
# test suite (CUDA and Triton tests run natively there), run the benchmarks, and leave
# logs and JSON in the folder given as argument.
#
#   scripts/gpu_check.sh OUT_DIR [STAGE_TIMEOUT_S]
# Environment: TESTS (pytest selection, default: tests, on 8 xdist workers), BENCH_ONLY (comma-separated
# benchmark module substrings, default: all), BENCH_ARGS (extra benchmarks.run arguments).
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [STAGE_TIMEOUT_S]}
stage_timeout=${2:-240}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvcc --version | tail -2
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"

SECONDS=0  # stage times go to the log, to plan the next lent machine's minutes
echo "== build" | tee "$out/build.log"
# The extension must share libstdc++ with torch: a toolchain that links libstdc++ statically
# (seen on a lent H200 image, CXX=/opt/gcc/bin/g++) gives the extension its own C++ runtime,
# and every c10::Error it throws then crashes the process instead of raising. Prefer the
# system compiler, which links libstdc++ dynamically; tests/test_build.py checks the result.
if [ -x /usr/bin/g++ ] && [ -z "${KEEP_CXX:-}" ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if ! timeout "$stage_timeout" $py setup.py build_ext --inplace >>"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "BUILD FAILED"
  exit 1
fi
$py -c "import bisenet_fast as bf; print(bf.build_info())" 2>&1 | tee -a "$out/build.log"

echo "== tests (build took ${SECONDS} s)"
SECONDS=0
# Default: the whole suite, over 8 workers where pytest-xdist is installed.
default_tests=tests
if $py -c "import xdist" 2>/dev/null; then default_tests="tests -n 8"; fi
timeout "$stage_timeout" $py -m pytest ${TESTS:-$default_tests} -q -rs -p no:cacheprovider --timeout=120 --junitxml="$out/tests.xml" \
  >"$out/tests.log" 2>&1
tests_rc=$?
tail -25 "$out/tests.log"

echo "== benchmarks (tests took ${SECONDS} s)"
SECONDS=0
timeout "$stage_timeout" $py -m benchmarks.run --device cuda --only "${BENCH_ONLY:-}" ${BENCH_ARGS:-} --out "$out/bench.json" >"$out/bench.log" 2>&1
bench_rc=$?
tail -60 "$out/bench.log"
echo "tests rc=$tests_rc bench rc=$bench_rc (benchmarks took ${SECONDS} s)"
