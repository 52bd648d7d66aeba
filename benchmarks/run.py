"""Run every benchmark module (benchmarks/bench_*.py), print one table, write JSON.

    python -m benchmarks.run [--device cuda] [--quick] [--only ohem,bga] [--out results.json]
    python -m benchmarks.bench_bga [same options but --only]   (that module alone)

Each module exposes run(device: str, quick: bool) -> an iterable of row dicts (a generator,
so that every row is kept as soon as it is measured); modules that build torch.compile
baselines also take compile_mode. The JSON records the device, torch/triton versions, build,
commit, compile mode, the device's copy bandwidth and the date, and is rewritten (atomically)
after every row: a run stopped at a deadline keeps all it measured. Every row's output is
checked against its eager row's (rel_err; benchmarks.timing.output_check): a row beyond
tolerance is listed under "output_mismatches" and fails the run, its times kept.

The torch.compile rows come after every module's other rows (--compile-rows after-all, the
default): the modules' own rows first, in --only's order, then each module's compile rows
(their speed-ups over their case's eager row, measured again in that pass). A compile takes
seconds to minutes (max-autotune's tuning), so a run stopped at its deadline loses compile
rows, not a later module's fused rows.

On a GPU each module runs in a child process of its own (--isolate, the default there),
which appends its rows to the same JSON: a fault that leaves the CUDA context unusable (an
illegal address in a kernel never run on that GPU before) then costs that module alone.
cuDNN's autotuner is on there (torch.backends.cudnn.benchmark, as mmseg's configs train),
so the eager baselines run cuDNN's fastest algorithms; the warm-up calls absorb its search.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import traceback

import torch

import benchmarks
import bisenet_fast as bf
from benchmarks.timing import copy_bandwidth_gbps, default_compile_mode, device_name

COLUMNS = ("op", "case", "impl", "dtype", "ms", "speedup_vs_eager", "device_ms", "device_x_eager", "saved_mb",
           "peak_extra_mb", "gbps", "pct_of_copy_bw", "samples_per_s", "rel_err")
# The modules the issues' targets are measured by, first: a run cut short at its deadline
# loses the others.
FIRST = ("bench_ohem_cross_entropy", "bench_bga", "bench_train_step", "bench_model", "bench_ge_layer")


def modules(only: list[str] | None):
    """Benchmark module names: all, the targets' (FIRST) first, then the rest sorted; or those
    matching `only`, in the order of its keys (so a time-limited run does the first-named
    ones first). A key that names a module ("bga" or "bench_bga") selects that module alone;
    any other key, every module whose name contains it ("ohem")."""
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    if not only:
        return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]

    def matching(key: str) -> list[str]:
        exact = [n for n in names if key in (n, n.removeprefix("bench_"))]
        return exact or [n for n in names if key in n]

    unmatched = [key for key in only if not matching(key)]
    if unmatched:
        raise ValueError(f"--only: no benchmark module matches {', '.join(map(repr, unmatched))}; "
                         f"the modules are {', '.join(names)}")
    return list(dict.fromkeys(n for key in only for n in matching(key)))


def format_table(rows: list[dict]) -> str:
    def cell(value, column):
        if value is None:
            return "-"
        if column == "rel_err":  # 1e-7 to 1e-2: three decimals would read 0.000
            return f"{value:.1e}"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    table = [COLUMNS] + [tuple(cell(r.get(c), c) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table)


def commit() -> str | None:
    """The checkout's commit, with "+dirty" for uncommitted changes; outside git (a device
    machine gets the working tree without .git) the GIT_COMMIT environment variable, or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GIT_COMMIT")
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def run_metadata(device: str, quick: bool, compile_mode: str, argv: list[str]) -> dict:
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "build": bf.build_info(),
        "commit": commit(),
        "argv": argv,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "compile_mode": compile_mode,
    }
    if torch.device(device).type == "cuda":
        meta.update({
            "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "copy_gbps": copy_bandwidth_gbps(device),
        })
    return meta


class Results:
    """The run's rows and failures, rewritten to `path` (if any) after every change: to a
    temporary file, then renamed over the old one, so a run killed mid-write leaves the
    previous complete file."""

    def __init__(self, meta: dict, path: str | None):
        self.meta, self.path = meta, path
        self.rows: list[dict] = []
        self.failed: list[str] = []
        # Rows whose output is not the eager row's (benchmarks.timing.output_check): their
        # times are kept, but they measure a wrong result and fail the run.
        self.mismatched: list[str] = []

    @classmethod
    def load(cls, path: str) -> "Results":
        """The results saved at `path`, to add to (a module's child process, --append)."""
        with open(path) as f:
            saved = json.load(f)
        results = cls(saved["meta"], path)
        results.rows, results.failed, results.mismatched = saved["rows"], saved["failed"], saved["output_mismatches"]
        return results

    def add(self, row: dict) -> None:
        copy_gbps = self.meta.get("copy_gbps")
        if copy_gbps and row.get("gbps"):
            row["pct_of_copy_bw"] = 100 * row["gbps"] / copy_gbps
        if row.get("output_ok") is False:
            self.mismatched.append(f"{row['op']} | {row['case']} | {row['impl']} | {row['dtype']}: "
                                   f"rel_err {row['rel_err']:.3g} against eager")
        self.rows.append(row)
        self.save()

    def fail(self, module: str) -> None:
        self.failed.append(module)
        self.save()

    def start(self, module: str | None) -> None:
        self.meta["running"] = module  # which module a run stopped at its deadline was in
        self.save()

    def save(self) -> None:
        if not self.path:
            return
        temporary = f"{self.path}.tmp"
        with open(temporary, "w") as f:
            json.dump({"meta": self.meta, "rows": self.rows, "failed": self.failed,
                       "output_mismatches": self.mismatched}, f, indent=1)
        os.replace(temporary, self.path)


# --compile-rows: "after-all" runs every module with "skip", then every module that has
# compile rows with "only"; a module's run(compile_rows=...) takes "last" (its own rows, then
# its compile rows: a module run alone), "skip" or "only" (its eager baselines are measured
# again for the compile rows' speed-ups, and not yielded).
COMPILE_ROWS = ("after-all", "last", "skip", "only")


def has_compile_rows(name: str) -> bool:
    """Whether module `name` can time its compile rows apart (run takes compile_rows)."""
    try:
        run = importlib.import_module(f"benchmarks.{name}").run
    except Exception:  # its failure is recorded by the pass that ran its other rows
        return False
    return "compile_rows" in inspect.signature(run).parameters


def _label(name: str, compile_rows: str) -> str:
    """How the JSON's meta.running and failed name a module's run in this pass."""
    return f"{name} (compile rows)" if compile_rows == "only" else name


def run_module(name: str, results: Results, device: str, quick: bool, compile_mode: str,
               compile_rows: str = "last") -> None:
    """Module `name`'s rows into `results`, in this process. compile_rows "skip" or "only":
    see COMPILE_ROWS; a module without compile rows runs whole with "skip", not with "only"."""
    if compile_rows == "only" and not has_compile_rows(name):
        return
    label = _label(name, compile_rows)
    print(f"== {label}", flush=True)
    results.start(label)
    first = len(results.rows)
    try:
        run = importlib.import_module(f"benchmarks.{name}").run
        parameters = inspect.signature(run).parameters
        options = {"compile_mode": compile_mode} if "compile_mode" in parameters else {}
        if "compile_rows" in parameters:
            options["compile_rows"] = compile_rows
        for row in run(device, quick, **options):
            results.add(row)
    except Exception:  # one broken benchmark must not hide the others' numbers
        results.fail(label)
        traceback.print_exc()
    print(format_table(results.rows[first:]), flush=True)


def run_module_isolated(name: str, results: Results, device: str, quick: bool, compile_mode: str,
                        compile_rows: str = "last") -> Results:
    """Module `name` in a child process that appends its rows to results' file; returns the
    results as it left them. A child that died without recording its failure (a crash, a
    fatal CUDA error) is listed as failed here."""
    if compile_rows == "only" and not has_compile_rows(name):  # no child to start
        return results
    command = [sys.executable, "-m", "benchmarks.run", "--device", device, "--only", name, "--compile-mode",
               compile_mode, "--compile-rows", compile_rows, "--out", results.path, "--append", "--in-process",
               *(["--quick"] if quick else [])]
    before = (len(results.failed), len(results.mismatched))
    returncode = subprocess.run(command).returncode
    results = Results.load(results.path)
    if returncode != 0 and (len(results.failed), len(results.mismatched)) == before:
        print(f"{_label(name, compile_rows)}: its process exited with status {returncode}", file=sys.stderr)
        results.start(None)
        results.fail(_label(name, compile_rows))
    return results


def main(argv=None, module: str | None = None) -> int:
    """The command line; `module` (e.g. "bench_bga"): `python -m benchmarks.<module>`, which
    runs that module alone and has no --only."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{module}" if module else None, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Run the {module} benchmarks; the options and the output are benchmarks.run's." if module
        else __doc__,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (CI-sized)")
    if not module:
        parser.add_argument("--only", default="", help="comma-separated module names (bga, bench_bga) or substrings "
                                                       "of them (ohem), run in this order")
    parser.add_argument("--out", default=None, help="write the rows and metadata as JSON here")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the compiled baselines (default: max-autotune-no-cudagraphs "
                             "on GPU, default on CPU)")
    isolation = parser.add_mutually_exclusive_group()
    isolation.add_argument("--isolate", action="store_true", default=None,
                           help="each module in a child process of its own (the default on a GPU)")
    isolation.add_argument("--in-process", dest="isolate", action="store_false",
                           help="every module in this process (the default on the CPU)")
    parser.add_argument("--compile-rows", choices=COMPILE_ROWS, default="after-all",
                        help="when the torch.compile rows are timed: after-all (after every module's other "
                             "rows), last (after their own module's), skip, only")
    parser.add_argument("--append", action="store_true", help="add to the results already at --out")
    args = parser.parse_args(argv)
    try:
        names = modules([module] if module else [s for s in args.only.split(",") if s])
    except ValueError as err:
        parser.error(str(err))
    if args.append and not (args.out and os.path.exists(args.out)):
        parser.error("--append needs --out naming an existing results file")
    gpu = torch.device(args.device).type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    isolate = gpu if args.isolate is None else args.isolate
    compile_mode = args.compile_mode or default_compile_mode(args.device)
    if args.append:
        results = Results.load(args.out)
    else:
        out = args.out
        if isolate and not out:  # the children append to a file
            out = os.path.join(tempfile.mkdtemp(prefix="bisenet_fast_bench_"), "bench.json")
        results = Results(run_metadata(args.device, args.quick, compile_mode, argv), out)
        results.save()
    earlier_failures = (len(results.failed), len(results.mismatched))  # an --append run's are not its own
    passes = ["skip", "only"] if args.compile_rows == "after-all" else [args.compile_rows]
    for compile_rows in passes:
        for name in names:
            if isolate:
                results = run_module_isolated(name, results, args.device, args.quick, compile_mode, compile_rows)
            else:
                run_module(name, results, args.device, args.quick, compile_mode, compile_rows)
    results.start(None)
    failed = (len(results.failed), len(results.mismatched)) != earlier_failures
    if args.append:
        return 1 if failed else 0
    meta = results.meta
    print(f"\n{meta['device']} | torch {meta['torch']} | {meta['date']}")
    print(format_table(results.rows))
    if results.failed:
        print(f"FAILED benchmark modules: {', '.join(results.failed)}", file=sys.stderr)
    for mismatch in results.mismatched:
        print(f"OUTPUT MISMATCH {mismatch}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
