"""Every benchmark module runs on its quick shapes on the CPU and returns well-formed rows, so
a broken benchmark shows here rather than on a lent GPU machine's scarce minutes; the runner
keeps every row measured, also of a module that fails or a run that is stopped."""
import copy
import importlib
import itertools
import json
import math
import sys
import types

import pytest
import torch

from benchmarks import bench_model
from benchmarks import run as runner
from benchmarks.timing import compile_baseline, device_name

REQUIRED = ("op", "case", "impl", "dtype", "ms")


@pytest.mark.parametrize("module", runner.modules(None))
def test_module_runs_quick_on_cpu(module):
    rows = list(importlib.import_module(f"benchmarks.{module}").run("cpu", True))
    assert rows, f"{module} returned no rows on the CPU"
    for row in rows:
        missing = [key for key in REQUIRED if key not in row]
        assert not missing, f"{module}: row {row} lacks {missing}"
        assert math.isfinite(row["ms"]) and row["ms"] > 0, row
        # Each fused row's output was checked against its eager row's and agrees with it.
        assert row.get("output_ok", True), row
    if module != "bench_loader":  # data loading: no eager twin to compare with
        checked = [row for row in rows if "rel_err" in row]
        assert checked, f"{module}: no row's output was checked against eager"
    assert runner.format_table(rows).count("\n") == len(rows)  # header + one line per row


def test_device_name_names_the_cpu_threads():
    assert device_name("cpu").startswith("CPU ") and "threads" in device_name("cpu")


def test_only_runs_matching_modules_in_the_given_order():
    assert runner.modules(["ohem", "bga_", "ohem_cross"]) == [
        "bench_ohem_cross_entropy", "bench_bga_pointwise"]


def test_only_naming_a_module_selects_it_alone():
    """"bga" is bench_bga's name: it must not also run bench_bga_pointwise (whose name
    contains it), nor must `python -m benchmarks.bench_bga`."""
    assert runner.modules(["bga"]) == runner.modules(["bench_bga"]) == ["bench_bga"]
    assert runner.modules(["ge_layer", "bga_pointwise"]) == ["bench_ge_layer", "bench_bga_pointwise"]


def test_all_modules_run_the_targets_modules_first():
    names = runner.modules(None)
    assert names[:len(runner.FIRST)] == list(runner.FIRST)
    rest = names[len(runner.FIRST):]
    assert rest == sorted(rest) and "bench_loader" in rest and len(set(names)) == len(names)


def test_only_naming_no_module_is_a_usage_error(capsys):
    """A typo in --only must not run nothing and exit 0 (a GPU run would write no results)."""
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--only", "ohem,nosuch"])
    assert exit_.value.code == 2
    assert "no benchmark module matches 'nosuch'" in capsys.readouterr().err


def _fake_module(monkeypatch, name, run):
    module = types.ModuleType(f"benchmarks.{name}")
    module.run = run
    monkeypatch.setitem(sys.modules, f"benchmarks.{name}", module)
    monkeypatch.setattr(runner, "modules", lambda only: [name])


def test_rows_of_a_module_that_fails_midway_are_kept(tmp_path, monkeypatch):
    """Every row is written as soon as it is measured; a module raising after two rows keeps
    them and is listed as failed."""
    out = tmp_path / "bench.json"
    seen_on_disk = []

    def run(device, quick):
        for i in range(2):
            yield {"op": "fake", "case": str(i), "impl": "eager", "dtype": "float32", "ms": 1.0, "gbps": 10.0}
            seen_on_disk.append(len(json.loads(out.read_text())["rows"]))
        raise RuntimeError("broken benchmark")

    _fake_module(monkeypatch, "bench_fake", run)
    assert runner.main(["--device", "cpu", "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert seen_on_disk == [1, 2]
    assert [r["case"] for r in result["rows"]] == ["0", "1"] and result["failed"] == ["bench_fake"]
    assert result["meta"]["running"] is None and result["meta"]["compile_mode"] == "default"
    assert not (tmp_path / "bench.json.tmp").exists()


def test_a_row_with_a_wrong_output_fails_the_run_and_keeps_its_times(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"

    def run(device, quick):
        yield {"op": "fake", "case": "c", "impl": "eager", "dtype": "float32", "ms": 2.0}
        yield {"op": "fake", "case": "c", "impl": "fast", "dtype": "float32", "ms": 1.0, "rel_err": 0.9,
               "output_ok": False}

    _fake_module(monkeypatch, "bench_fake", run)
    assert runner.main(["--device", "cpu", "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2 and result["failed"] == []
    assert result["output_mismatches"] == ["fake | c | fast | float32: rel_err 0.9 against eager"]
    assert "OUTPUT MISMATCH fake | c | fast" in capsys.readouterr().err


def test_isolated_modules_append_to_one_file(tmp_path):
    """--isolate (the GPU default): each module in a child process, its rows in the one JSON."""
    out = tmp_path / "bench.json"
    assert runner.main(["--device", "cpu", "--quick", "--only", "resize_bilinear", "--isolate", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] and {r["op"] for r in result["rows"]} == {"resize_bilinear"}
    assert result["failed"] == [] and result["meta"]["running"] is None and result["meta"]["quick"] is True


def test_an_isolated_module_that_dies_is_listed_as_failed(tmp_path, monkeypatch, capsys):
    """A child that dies without recording anything (a segfault, a fatal CUDA error): its
    module is failed, the run goes on to the next one and fails at the end."""
    out = tmp_path / "bench.json"
    monkeypatch.setattr(runner, "modules", lambda only: ["bench_a", "bench_b"])
    ran = []
    real_run = runner.subprocess.run

    def crashing_child(command, **kwargs):
        if "benchmarks.run" not in command:  # git, for the commit
            return real_run(command, **kwargs)
        ran.append(command[command.index("--only") + 1])
        assert "--append" in command and command[command.index("--out") + 1] == str(out)
        return types.SimpleNamespace(returncode=-11)

    monkeypatch.setattr(runner.subprocess, "run", crashing_child)
    assert runner.main(["--device", "cpu", "--isolate", "--out", str(out)]) == 1
    assert ran == ["bench_a", "bench_b"]
    assert json.loads(out.read_text())["failed"] == ["bench_a", "bench_b"]
    assert "bench_a: its process exited with status -11" in capsys.readouterr().err


def test_an_appending_run_fails_only_for_its_own_failures(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    runner.Results({"running": None}, str(out)).fail("bench_earlier")

    def run(device, quick):
        yield {"op": "fake", "case": "c", "impl": "eager", "dtype": "float32", "ms": 1.0}

    _fake_module(monkeypatch, "bench_fake", run)
    assert runner.main(["--device", "cpu", "--append", "--in-process", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["failed"] == ["bench_earlier"]


def test_gbps_rows_get_their_share_of_the_copy_bandwidth(tmp_path):
    results = runner.Results({"copy_gbps": 200.0}, str(tmp_path / "r.json"))
    results.add({"op": "a", "gbps": 50.0})
    results.add({"op": "b"})
    assert results.rows[0]["pct_of_copy_bw"] == pytest.approx(25.0) and "pct_of_copy_bw" not in results.rows[1]


def test_compile_baseline_refuses_to_time_a_recompile():
    """A compiled baseline is for one case: a call with another shape raises rather than
    being recompiled (with dynamic shapes) or, past the recompile limit, run eagerly."""
    fn = compile_baseline(lambda x: x.sin() + 1, "default", backend="eager")
    x = torch.randn(4, 5)
    assert torch.equal(fn(x), x.sin() + 1)
    assert torch.equal(fn(x), x.sin() + 1)  # no recompile: allowed
    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip("torch.compiler.set_stance needs torch 2.6+")
    with pytest.raises(Exception, match="(?i)recompil"):
        fn(torch.randn(6, 5))


def test_bga_times_its_compiled_baselines_after_every_other_row(monkeypatch):
    """A run stopped at its deadline (minutes of max-autotune tuning) loses compile rows, not
    fused ones; each compile row's speed-up is still over its own case's eager row."""
    from benchmarks import bench_bga

    monkeypatch.setattr(bench_bga, "CASES", [("tiny", 1, 8, 12, False), ("tiny", 1, 8, 12, True)])
    monkeypatch.setattr(bench_bga, "compile_baseline", lambda fn, mode: fn)
    rows = list(bench_bga.run("cpu", quick=False, compile_mode="default"))
    impls = [r["impl"] for r in rows]
    assert impls == ["eager", "cpp"] * 4 + ["compile"] * 4
    eager_ms = {r["case"]: r["ms"] for r in rows if r["impl"] == "eager"}
    for row in rows[8:]:
        case = row["case"].removesuffix(" mode=default")
        assert row["speedup_vs_eager"] == pytest.approx(eager_ms[case] / row["ms"]) and row["output_ok"]


def test_model_candidates_all_run_without_arguments(monkeypatch):
    """bench_model's GPU-only candidates (compile in both layouts, CUDA graphs, cuda-ge) are
    zero-argument callables like the others: checked on the CPU with the GPU parts faked,
    since a lent GPU's minutes are too scarce to find such a slip."""
    monkeypatch.setattr(bench_model, "compile_baseline", lambda model, mode: model)
    monkeypatch.setattr(bench_model, "_captured", lambda model, x: ((lambda: model(x)), 0.0))
    monkeypatch.setattr(bench_model.bf.backends, "available", lambda: ["eager", "cpp", "cuda"])
    monkeypatch.setattr(bench_model.bf.backends, "use", lambda *args, **kwargs: torch.no_grad())
    model = bench_model._model("cpu")
    models = {"eager": model, "eager_cl": copy.deepcopy(model).to(memory_format=torch.channels_last),
              "fused": model.fuse(), "tuned": model.fuse(autotune=True)}
    x = torch.randn(1, 3, 64, 128)
    seen = []
    with torch.inference_mode():
        for impl, variant, fn, extra in itertools.chain(bench_model.candidates(models, x, True),
                                                        bench_model.compile_candidates(models, x, "max-autotune")):
            assert fn().shape == (1, 19, 64, 128), (impl, variant)
            seen.append((impl, variant))
    assert ("compile", "channels_last mode=max-autotune") in seen and ("cuda-ge", "fused channels_last") in seen
    assert len(seen) == 9


def test_ge_layer_8warps_rows_only_where_eight_warps_change_the_launch(monkeypatch):
    """bench_ge_layer's triton-8warps rows (GPU only; the grid read with an H200's 132 SMs
    faked): in the float16 layers whose 64-pixel blocks take 4 warps, not in the 16-pixel
    blocks, which take 4 warps of their own that _eight_warps() leaves alone (a row there
    would time the triton row's kernel again under another name)."""
    pytest.importorskip("triton")
    from benchmarks import bench_ge_layer
    from bisenet_fast.triton_kernels import ge_layer as ge_triton

    monkeypatch.setattr(ge_triton, "_sm_count", lambda device: 132)
    gpu = torch.device("cuda")
    chosen = set()
    for dtype in (torch.float32, torch.float16):
        for cin, cout, stride, frac in bench_ge_layer.LAYERS:
            h, w = bench_ge_layer.FULL_IMAGE[0] // frac, bench_ge_layer.FULL_IMAGE[1] // frac
            pixels = h * w if stride == 1 else ((h - 1) // 2 + 1) * ((w - 1) // 2 + 1)
            mid = 6 * cin
            block_p = ge_triton.main_kernel_grid(stride, cin, mid, pixels, gpu)[0]
            options = ge_triton._launch_options(block_p, cout, dtype)
            with bench_ge_layer._eight_warps():
                changed = ge_triton._launch_options(block_p, cout, dtype) != options
            takes = bench_ge_layer._takes_half_narrow_warps(stride, cin, cout, mid, pixels, dtype, gpu)
            assert takes == changed, (cin, cout, stride, dtype)
            if takes:
                chosen.add((cin, cout, stride, dtype))
    assert chosen == {(16, 32, 2, torch.float16), (32, 32, 1, torch.float16)}


def _module_with_compile_rows(name):
    def run(device, quick, compile_mode=None, compile_rows="last"):
        if compile_rows != "only":
            yield {"op": name, "case": "c", "impl": "eager", "dtype": "float32", "ms": 2.0}
        if compile_rows != "skip":
            yield {"op": name, "case": "c", "impl": "compile", "dtype": "float32", "ms": 1.0}
    return run


def _three_modules(monkeypatch):
    """bench_a and bench_b with compile rows, bench_c (run without compile_rows) without."""
    for name in ("bench_a", "bench_b"):
        module = types.ModuleType(f"benchmarks.{name}")
        module.run = _module_with_compile_rows(name)
        monkeypatch.setitem(sys.modules, f"benchmarks.{name}", module)

    def plain(device, quick):
        yield {"op": "bench_c", "case": "c", "impl": "cpp", "dtype": "float32", "ms": 1.0}

    module = types.ModuleType("benchmarks.bench_c")
    module.run = plain
    monkeypatch.setitem(sys.modules, "benchmarks.bench_c", module)
    monkeypatch.setattr(runner, "modules", lambda only: ["bench_a", "bench_b", "bench_c"])


def test_a_module_command_runs_that_module_alone(tmp_path, monkeypatch, capsys):
    """`python -m benchmarks.bench_c` took a user's --only over its own module (argparse keeps
    the last --only), and its --help described every module's run."""
    _three_modules(monkeypatch)
    monkeypatch.setattr(runner, "modules", lambda only: only)
    out = tmp_path / "bench.json"
    assert runner.main(["--device", "cpu", "--out", str(out)], module="bench_c") == 0
    assert [r["op"] for r in json.loads(out.read_text())["rows"]] == ["bench_c"]
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--only", "bench_a"], module="bench_c")
    assert exit_.value.code == 2 and "unrecognized arguments: --only bench_a" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--help"], module="bench_c")
    assert "usage: python -m benchmarks.bench_c" in capsys.readouterr().out


def test_compile_rows_come_after_every_module_other_rows(tmp_path, monkeypatch):
    """Minutes of compiling in the first modules must not push a later module's fused rows
    past a lent GPU's deadline: every module's other rows first, then the compile rows."""
    _three_modules(monkeypatch)
    out = tmp_path / "bench.json"
    assert runner.main(["--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["op"], r["impl"]) for r in result["rows"]] == [
        ("bench_a", "eager"), ("bench_b", "eager"), ("bench_c", "cpp"), ("bench_a", "compile"), ("bench_b", "compile")]
    assert result["meta"]["running"] is None
    assert runner.main(["--device", "cpu", "--compile-rows", "last", "--out", str(out)]) == 0
    assert [(r["op"], r["impl"]) for r in json.loads(out.read_text())["rows"]] == [
        ("bench_a", "eager"), ("bench_a", "compile"), ("bench_b", "eager"), ("bench_b", "compile"), ("bench_c", "cpp")]


def test_isolated_modules_time_their_compile_rows_in_a_second_pass(tmp_path, monkeypatch):
    _three_modules(monkeypatch)
    out = tmp_path / "bench.json"
    ran = []
    real_run = runner.subprocess.run

    def child(command, **kwargs):
        if "benchmarks.run" not in command:  # git, for the commit
            return real_run(command, **kwargs)
        ran.append((command[command.index("--only") + 1], command[command.index("--compile-rows") + 1]))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(runner.subprocess, "run", child)
    assert runner.main(["--device", "cpu", "--isolate", "--out", str(out)]) == 0
    assert ran == [("bench_a", "skip"), ("bench_b", "skip"), ("bench_c", "skip"), ("bench_a", "only"),
                   ("bench_b", "only")]


def test_bga_and_ohem_time_compile_rows_alone_against_their_eager_rows(monkeypatch):
    """compile_rows "skip" and "only" split a module's rows in two; "only" measures the eager
    rows again for the speed-ups but does not yield them."""
    from benchmarks import bench_bga, bench_ohem_cross_entropy as bench_ohem

    monkeypatch.setattr(bench_bga, "CASES", [("tiny", 1, 8, 12, False)])
    monkeypatch.setattr(bench_bga, "compile_baseline", lambda fn, mode: fn)
    assert [r["impl"] for r in bench_bga.run("cpu", quick=False, compile_rows="skip")] == ["eager", "cpp"] * 2
    only = list(bench_bga.run("cpu", quick=False, compile_mode="default", compile_rows="only"))
    assert [r["impl"] for r in only] == ["compile"] * 2
    assert all(r["output_ok"] and r["speedup_vs_eager"] > 0 for r in only)

    # OHEM's compile rows (GPU only, at the decode head) faked at the 32x32 quick head
    monkeypatch.setattr(bench_ohem, "compiles", lambda device, head, quick: head == 32)
    monkeypatch.setattr(bench_ohem, "compile_baseline", lambda fn, mode: fn)
    rows = [(r["case"], r["impl"]) for r in bench_ohem.run("cpu", True, head_sizes=(128, 256), compile_mode="m")]
    assert rows[-2:] == [("32x32->256x256 early mode=m", "compile"), ("32x32->256x256 select mode=m", "compile")]
    assert all(impl != "compile" for _, impl in rows[:-2]) and len(rows) == 10
    assert all(r["impl"] != "compile" for r in bench_ohem.run("cpu", True, head_sizes=(128, 256), compile_rows="skip"))
    only = list(bench_ohem.run("cpu", True, head_sizes=(128, 256), compile_mode="m", compile_rows="only"))
    assert [r["impl"] for r in only] == ["compile"] * 2 and all(r["output_ok"] for r in only)


def test_model_graph_pool_is_what_the_capture_keeps_reserved(monkeypatch):
    """bench_model's graph_pool_mb (GPU only; torch.cuda faked): the graph's private pool
    holds the forward's intermediates, freed into it during the capture, so it shows in
    memory_reserved, not in memory_allocated, which counts only the output still referenced."""
    state = {"allocated": 100 * 2**20, "reserved": 100 * 2**20, "cached": 0}

    def capture(model, x):
        state["allocated"] += 8 * 2**20  # the static input and output, referenced after the capture
        state["reserved"] += 300 * 2**20  # + the pool's intermediates, freed into it
        state["cached"] += 50 * 2**20  # the warm-up's blocks, cached on its side stream
        return lambda x: x

    def empty_cache():
        state["cached"] = 0

    monkeypatch.setattr(bench_model, "capture_cuda_graph", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"] + state["cached"])
    run, pool_mb = bench_model._captured(None, torch.zeros(1))
    assert pool_mb == 300 and torch.equal(run(), torch.zeros(1))
