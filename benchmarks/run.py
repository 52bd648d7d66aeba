"""Run every benchmark module (benchmarks/bench_*.py), print one table, write JSON.

    python -m benchmarks.run [--device cuda] [--quick] [--only ohem,bga] [--out results.json]
    python -m benchmarks.bench_bga [same options]      (one module)

Each module exposes run(device: str, quick: bool) -> list[dict] (bench_model also takes
compile_mode); the JSON records the device, torch/triton versions, build and date.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import pkgutil
import sys
import traceback

import torch

import benchmarks
import bisenet_fast as bf
from benchmarks.timing import device_name

COLUMNS = ("op", "case", "impl", "dtype", "ms", "speedup_vs_eager", "device_ms", "device_x_eager", "saved_mb",
           "peak_extra_mb", "gbps", "samples_per_s")


def modules(only: list[str] | None):
    """Benchmark module names: all, sorted; or those matching `only`, in the order of its
    keys (so a time-limited run does the first-named ones first)."""
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    if not only:
        return names
    unmatched = [key for key in only if not any(key in n for n in names)]
    if unmatched:
        raise ValueError(f"--only: no benchmark module matches {', '.join(map(repr, unmatched))}; "
                         f"the modules are {', '.join(names)}")
    return list(dict.fromkeys(n for key in only for n in names if key in n))


def format_table(rows: list[dict]) -> str:
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    table = [COLUMNS] + [tuple(cell(r.get(c)) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (CI-sized)")
    parser.add_argument("--only", default="", help="comma-separated substrings of module names, run in this order")
    parser.add_argument("--out", default=None, help="write the rows and metadata as JSON here")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the whole-model baseline")
    args = parser.parse_args(argv)

    meta = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "build": bf.build_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
    }
    try:
        names = modules([s for s in args.only.split(",") if s])
    except ValueError as err:
        parser.error(str(err))
    rows, failures = [], []
    for name in names:
        print(f"== {name}", flush=True)
        try:
            run = importlib.import_module(f"benchmarks.{name}").run
            options = {"compile_mode": args.compile_mode} if "compile_mode" in inspect.signature(run).parameters else {}
            module_rows = run(args.device, args.quick, **options)
        except Exception:  # one broken benchmark must not hide the others' numbers
            failures.append(name)
            traceback.print_exc()
            continue
        rows += module_rows
        print(format_table(module_rows), flush=True)
        if args.out:  # written after every module so a time-out still leaves results
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows, "failed": failures}, f, indent=1)
    print(f"\n{meta['device']} | torch {meta['torch']} | {meta['date']}")
    print(format_table(rows))
    if failures:
        print(f"FAILED benchmark modules: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
