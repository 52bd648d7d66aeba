"""Every benchmark module runs on its quick shapes on the CPU and returns well-formed rows, so
a broken benchmark shows here rather than on a lent GPU machine's scarce minutes."""
import importlib
import math

import pytest

from benchmarks import run as runner
from benchmarks.timing import device_name

REQUIRED = ("op", "case", "impl", "dtype", "ms")


@pytest.mark.parametrize("module", runner.modules(None))
def test_module_runs_quick_on_cpu(module):
    rows = importlib.import_module(f"benchmarks.{module}").run("cpu", True)
    assert rows, f"{module} returned no rows on the CPU"
    for row in rows:
        missing = [key for key in REQUIRED if key not in row]
        assert not missing, f"{module}: row {row} lacks {missing}"
        assert math.isfinite(row["ms"]) and row["ms"] > 0, row
    assert runner.format_table(rows).count("\n") == len(rows)  # header + one line per row


def test_device_name_names_the_cpu_threads():
    assert device_name("cpu").startswith("CPU ") and "threads" in device_name("cpu")


def test_only_runs_matching_modules_in_the_given_order():
    assert runner.modules(["ohem", "bga", "ohem_cross"]) == [
        "bench_ohem_cross_entropy", "bench_bga", "bench_bga_pointwise"]
    assert runner.modules(None) == sorted(runner.modules(None))


def test_only_naming_no_module_is_a_usage_error(capsys):
    """A typo in --only must not run nothing and exit 0 (a GPU run would write no results)."""
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--only", "ohem,nosuch"])
    assert exit_.value.code == 2
    assert "no benchmark module matches 'nosuch'" in capsys.readouterr().err
