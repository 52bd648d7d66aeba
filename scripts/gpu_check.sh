#!/usr/bin/env bash
# GPU validation in one go, for a lent GPU machine where torch, triton, nvcc, ninja and
# pytest are already installed: build the extension in place with CUDA, run the
# GPU tests (CUDA and Triton tests run natively there), run the benchmarks, and leave
# logs and JSON in the folder given as argument.
#
#   scripts/gpu_check.sh OUT_DIR [TOTAL_S]
# TOTAL_S (default 540): the whole script's time; the build gets at most 240 s, the tests
# at most TESTS_S (default 180) while leaving the benchmarks 140 s, and the benchmarks the
# rest, so a lent machine's minutes are used to the end and nothing outlives the call.
# Environment: TESTS (pytest selection, default: tests, on 8 xdist workers), TESTS_S,
# TESTS_K (a pytest -k expression; default: the tests that need the GPU or its build, below;
# the rest run in CI, and the whole suite outlasts a lent machine's minutes before reaching
# the OHEM GPU tests; TESTS_K= runs everything),
# BENCH_ONLY (comma-separated benchmark module names, e.g. bga for bench_bga alone, or
# substrings of them, e.g. ohem; run in that order; default: all),
# BENCH_ARGS (extra benchmarks.run arguments, e.g. "--compile-mode default": the compiled
# baselines take max-autotune-no-cudagraphs on a GPU otherwise, whose tuning takes minutes
# per model; the compile rows of every module are timed after every module's other rows
# (benchmarks.run --compile-rows after-all), so a run stopped at its deadline loses those
# first; on a GPU each module runs in a process of its own, twice where it has compile rows),
# GIT_COMMIT (the commit the working tree is at, recorded in env.txt and bench.json: the
# device machine gets the tree without .git).
# Everything printed also goes to OUT/summary.log (the device tool returns only the output's
# tail); the exit status is non-zero when the build, a test or a benchmark failed.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [TOTAL_S]}
deadline=$(( $(date +%s) + ${2:-540} ))
left() { echo $(( deadline - $(date +%s) )); }
at_most() { local limit=$1 spare=$(( $(left) - $2 )); echo $(( spare < limit ? (spare > 10 ? spare : 10) : limit )); }
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the script moves to the repository root next
exec > >(tee -a "$out/summary.log") 2>&1
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}

{
  date -u
  echo "commit ${GIT_COMMIT:-unknown}"
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
if ! timeout "$(at_most 240 150)" $py setup.py build_ext --inplace >>"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "BUILD FAILED"
  exit 1
fi
# A build that links can still fail to load (an undefined symbol only shows at import) or
# lack the CUDA backend: then every test and benchmark would fail, and the minutes left
# are worth more to a rerun than to a stage of errors.
if ! $py -c "import bisenet_fast as bf; info = bf.build_info(); print(info)
assert info['cuda'] and 'cuda' in info['backends'], 'the CUDA backend is not usable'" 2>&1 | tee -a "$out/build.log"; then
  echo "BUILD UNUSABLE: bisenet_fast does not import, or its CUDA backend does not run"
  exit 1
fi

echo "== tests (build took ${SECONDS} s)"
SECONDS=0
# Over 8 workers where pytest-xdist is installed; a per-test limit
# where pytest-timeout is (a hung kernel then costs one test, not the stage).
default_tests=tests
if $py -c "import xdist" 2>/dev/null; then
  default_tests="tests -n 8"
  # One OpenMP team per core: 8 workers of 16 threads each on 16 cores made the CPU tests
  # crawl (43 % of the suite in 230 s on an H200 machine, 4 compile tests past 120 s).
  export OMP_NUM_THREADS=$(( $(nproc) / 8 > 0 ? $(nproc) / 8 : 1 ))
fi
# test_build: the build's libstdc++ check (see CXX above); device_time: the only GPU test of
# device_ms. Neither has cuda or triton in its name, and CI has no GPU to run them.
tests_k=${TESTS_K-"(cuda or triton or test_build or device_time) and not emulated"}
per_test=""
if $py -c "import pytest_timeout" 2>/dev/null; then per_test="--timeout=120"; fi
# -v: one line per finished test, so a stage stopped at its deadline (no summary, no junit
# file) still tells which tests passed and failed.
# SIGINT at the deadline: pytest then still prints its summary with the failures' tracebacks
# (a SIGTERM lost them on 2026-11-27); SIGKILL 20 s later if it hangs.
timeout -s INT -k 20 "$(at_most "${TESTS_S:-180}" 140)" $py -m pytest ${TESTS:-$default_tests} ${tests_k:+-k "$tests_k"} -v -rfEs -p no:cacheprovider \
  $per_test --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
tests_rc=$?
# The summary's failures, errors and skips (without its last line), then the counts.
sed -n '/short test summary info/,$p' "$out/tests.log" | sed '$d' | head -60
tail -1 "$out/tests.log"
if [ "$tests_rc" -ge 124 ]; then  # 124: SIGINT at the deadline; 137: SIGKILL after it
  echo "tests stopped at the deadline: $(grep -c " PASSED " "$out/tests.log") passed," \
    "$(grep -c -E " (FAILED|ERROR) " "$out/tests.log") failed or errored so far"
fi

unset OMP_NUM_THREADS
echo "== benchmarks (tests took ${SECONDS} s, $(left) s left)"
SECONDS=0
timeout -k 10 "$(at_most 100000 15)" $py -m benchmarks.run --device cuda --only "${BENCH_ONLY:-}" ${BENCH_ARGS:-} \
  --out "$out/bench.json" >"$out/bench.log" 2>&1
bench_rc=$?
tail -60 "$out/bench.log"
echo "tests rc=$tests_rc bench rc=$bench_rc (benchmarks took ${SECONDS} s; rc 124 = stopped at the deadline)"
exit $(( tests_rc != 0 || bench_rc != 0 ))
