"""The training loop: schedule, SGD step, DDP over gloo, exact resume, signals, checkpoint
safety, non-finite losses. Everything runs on tiny synthetic data with the eager loss."""
import copy
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

import bisenet_fast as bf
from bisenet_fast import evaluate as evaluate_module
from bisenet_fast import train as train_module
from bisenet_fast import train_state
from bisenet_fast.configs import load_recipe, recipe_names
from bisenet_fast.data.cityscapes import CityscapesDataset
from bisenet_fast.data.synthetic import generate
from bisenet_fast.distributed import (DistContext, broadcast_bn_statistics, heads_to_sync_bn, init_distributed,
                                      leave_distributed, mean_over_ranks)
from bisenet_fast.evaluate import evaluate_model
from bisenet_fast.evaluate import main as evaluate_main
from bisenet_fast.evaluate import parse_args as evaluate_parse_args
from bisenet_fast.train import (
    LOSS_KEYS,
    NonFiniteLossError,
    apply_overrides,
    build_model,
    build_optimizer,
    lr_at,
    non_finite_error,
    non_finite_heads,
    parse_args,
    poly_lr,
    train,
    wrap_for_training,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads spinning for each other
    make tiny steps many times slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), num_train=6, num_val=2, height=32, width=64)


def tiny_recipe(data_root, iters=6):
    recipe = load_recipe("synthetic")
    recipe["data"].update(root=str(data_root), img_scale=[64, 32], crop_size=[32, 32], samples_per_gpu=2,
                          workers_per_gpu=0, photometric_distortion=True, ratio_range=[0.5, 2.0])
    recipe["schedule"].update(max_iters=iters, warmup_iters=2)
    recipe.update(eval_interval=0, checkpoint_interval=1000, log_interval=1)
    return recipe


def read_log(work_dir):
    with open(Path(work_dir) / "log.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


# ---------------------------------------------------------------- recipes and schedule
def test_recipes_are_the_four_published_ones_plus_the_demo():
    assert set(recipe_names()) == {
        "bisenetv2_fcn_4x4_1024x1024_160k_cityscapes", "bisenetv2_fcn_ohem_4x4_1024x1024_160k_cityscapes",
        "bisenetv2_fcn_fp16_4x4_1024x1024_160k_cityscapes", "bisenetv2_fcn_4x8_1024x1024_160k_cityscapes",
        "synthetic",
    }
    assert load_recipe("bisenetv2_fcn_4xb4-ohem-160k_cityscapes-1024x1024")["model"]["ohem"] is True
    assert load_recipe("bisenetv2_fcn_4xb8-160k_cityscapes-1024x1024")["data"]["samples_per_gpu"] == 8
    fp16 = load_recipe("bisenetv2_fcn_fp16_4x4_1024x1024_160k_cityscapes")["amp"]
    assert fp16["dtype"] == "float16" and fp16["loss_scale"] == 512.0
    plain = load_recipe("bisenetv2_fcn_4x4_1024x1024_160k_cityscapes")
    assert plain["optimizer"] == {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005}
    assert plain["data"]["crop_size"] == [1024, 1024] and plain["data"]["cat_max_ratio"] == 0.75
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(FileNotFoundError, match="recipe file 'missing/mine.json' does not exist"):
        load_recipe("missing/mine.json")


@pytest.mark.parametrize("iteration, expected", [
    (0, 0.005000000000000001),        # 0.05 * warmup factor 0.1
    (999, 0.04967475789202575),       # last warmup iteration: factor 0.1 + 0.9 * 0.999
    (1000, 0.04971922458348093),      # warmup over; poly still spans all 160k iterations (0.x)
    (80000, 0.026840747890280514),    # 0.0499 * 0.5 ** 0.9 + 1e-4
    (159999, 0.00010103369534665575),
])
def test_lr_schedule_of_the_published_recipes(iteration, expected):
    recipe = load_recipe("bisenetv2_fcn_4x4_1024x1024_160k_cityscapes")
    assert lr_at(iteration, recipe) == pytest.approx(expected, rel=1e-12)
    assert poly_lr(iteration) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("affinity, local_world, workers, device, expected", [
    (range(8), 1, 0, "cpu", 8),
    (range(8), 2, 1, "cpu", 3),   # 4 cores each, one of them left to the loader worker
    (range(8), 2, 1, "cuda", 4),  # the model runs on the GPU: the workers take no core from it
    ([0], 1, 0, "cpu", 1),        # taskset -c 0 on a bigger machine
    ([0, 1], 4, 2, "cpu", 1),     # never fewer than one
])
def test_cpu_threads_per_process_counts_the_cores_this_process_may_use(monkeypatch, affinity, local_world, workers,
                                                                       device, expected):
    """os.cpu_count() counts every core of the machine: under taskset or a job's cpuset, train()
    and evaluate set more threads than the process may run, where torch's own default did not."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    ctx = DistContext(world_size=local_world, device=torch.device(device))
    assert train_module.cpu_threads_per_process(ctx, workers) == expected


def test_one_optimizer_step_is_plain_sgd():
    torch.manual_seed(0)
    model = bf.BiSeNetV2Segmentor(num_classes=19)
    recipe = load_recipe("bisenetv2_fcn_4x4_1024x1024_160k_cityscapes")
    opt = build_optimizer(model, recipe)
    assert len(opt.param_groups) == 1 and sum(p.numel() for p in opt.param_groups[0]["params"]) == 14_804_255
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 19, (2, 32, 32))
    lrs = [lr_at(0, recipe), lr_at(1, recipe)]
    params, grads = [[p.detach().clone() for p in model.parameters()]], []
    with bf.backends.use("eager"):
        for lr in lrs:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad()
            sum(model.loss(x, y).values()).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            params.append([p.detach().clone() for p in model.parameters()])
    wd, momentum = 5e-4, 0.9
    for p0, p1, p2, g0, g1 in zip(*params, *grads):
        buf = g0 + wd * p0  # first step: the momentum buffer is the decayed gradient
        torch.testing.assert_close(p1, p0 - lrs[0] * buf, rtol=1e-6, atol=1e-7)
        buf = momentum * buf + (g1 + wd * p1)
        torch.testing.assert_close(p2, p1 - lrs[1] * buf, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- distributed
def test_sync_bn_only_in_the_heads():
    model = bf.BiSeNetV2Segmentor()
    keys = list(model.state_dict())
    heads_to_sync_bn(model)
    assert list(model.state_dict()) == keys  # same mmseg keys: checkpoints load either way
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.backbone.modules())
    for head in [model.decode_head, *model.auxiliary_head]:
        norms = [m for m in head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)


def _ddp_worker(rank, world, port, x, y, out_dir, data_root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    model = build_model(load_recipe("synthetic"), ctx)
    module = wrap_for_training(model, ctx)
    assert isinstance(module, torch.nn.parallel.DistributedDataParallel)
    # gloo on CPU: no SyncBN, the heads keep per-process BatchNorm2d
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    model.eval()  # see test_two_gloo_processes_equal_one_process_on_the_concatenated_batch
    opt = build_optimizer(model, load_recipe("synthetic"))
    half = x.shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    with bf.backends.use("eager"):
        losses = module(x[sl], y[sl])
        sum(losses.values()).backward()
    opt.step()
    # multi-process evaluation: images dealt round-robin, histograms summed with all_reduce
    with bf.backends.use("eager"):
        metrics = evaluate_model(model, CityscapesDataset(data_root, "val"), ctx,
                                 load_recipe("synthetic")["test"] | {"img_scale": [64, 32]}, log=None)
    if rank == 0:
        torch.save({"state_dict": model.state_dict(), "IoU": metrics["IoU"]}, Path(out_dir) / "ddp.pt")
    leave_distributed()


def test_two_gloo_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    """DDP averages the two processes' gradients; each process's loss is a mean over its own
    N*H*W pixels, so the average equals the gradient of one process on the concatenated batch,
    provided the forward pass is batch-independent. In training mode it is not: the backbone's
    BN (always per-GPU in mmseg) and, on gloo, the heads' BN too (SyncBN needs CUDA) normalise
    over each process's own images. The model is therefore compared in eval mode (BN running
    statistics, no dropout), which checks the DDP wrapping, gradient averaging and the step."""
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 19, (4, 32, 32))
    y[0, :4] = 255
    data_root = generate(tmp_path / "data", num_train=1, num_val=3, height=32, width=64)
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_ddp_worker, args=(2, port, x, y, str(tmp_path), str(data_root)), nprocs=2, join=True,
                       start_method="spawn")
    saved = torch.load(tmp_path / "ddp.pt")
    ddp_state = saved["state_dict"]

    torch.manual_seed(0)
    model = bf.BiSeNetV2Segmentor(num_classes=19).eval()
    opt = build_optimizer(model, load_recipe("synthetic"))
    with bf.backends.use("eager"):
        sum(model.loss(x, y).values()).backward()
    opt.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    changed = [k for k, v in model.state_dict().items() if k.startswith("auxiliary_head.3") and v.is_floating_point()]
    assert changed  # the heads were actually compared

    model.load_state_dict(ddp_state)
    with bf.backends.use("eager"):
        single = evaluate_model(model, CityscapesDataset(data_root, "val"), init_distributed("cpu"),
                                load_recipe("synthetic")["test"] | {"img_scale": [64, 32]}, log=None)
    np.testing.assert_array_equal(np.array(saved["IoU"]), np.array(single["IoU"]))  # NaN == NaN here


def _collectives_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    ctx = init_distributed("cpu")
    found = []
    for bad_rank in (None, 1):
        losses = {k: torch.tensor(1.0) for k in LOSS_KEYS}
        if rank == bad_rank:
            losses["aux_2.loss_ce"] = torch.tensor(float("inf"))
        found.append(non_finite_heads(losses, ctx))
    logged = mean_over_ranks(torch.tensor([1.0, 10.0]) * (rank + 1), ctx).tolist()
    torch.manual_seed(rank)  # each rank's own BN statistics, as after per-GPU BN training
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    broadcast_bn_statistics(model, ctx)
    torch.save({"found": found, "logged": logged, "bn": {k: v for k, v in model.state_dict().items() if "running" in k}},
               Path(out_dir) / f"rank{rank}.pt")
    leave_distributed(ranks_in_step=False)


def test_every_rank_sees_the_same_non_finite_heads_logged_means_and_bn_statistics(tmp_path):
    """A NaN/inf loss on one rank is reported on all of them at the same iteration (a rank
    stopping or skipping alone would leave the others waiting in DDP's gradient all_reduce until
    the timeout); logged losses are the mean over the ranks; before an evaluation every rank
    takes rank 0's BN statistics (mmseg's DistEvalHook), the checkpoint's."""
    port = 30500 + os.getpid() % 1000
    mp.start_processes(_collectives_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["found"][0] == [] and rank1["found"][0] == []  # finite everywhere
    assert rank0["found"][1] == ["aux_2.loss_ce (on another rank)"]
    assert rank1["found"][1] == ["aux_2.loss_ce=inf"]
    assert rank0["logged"] == rank1["logged"] == [1.5, 15.0]
    torch.manual_seed(0)
    assert len(rank0["bn"]) == 4
    for name, value in rank0["bn"].items():
        torch.testing.assert_close(rank1["bn"][name], value, rtol=0, atol=0)


# ---------------------------------------------------------------- resume, signals, checkpoint safety
def test_resumed_run_equals_uninterrupted_run(tiny_data, tmp_path):
    recipe = tiny_recipe(tiny_data)
    recipe["log_interval"] = 2  # the stop after iteration 3 falls inside a log interval
    full = train(copy.deepcopy(recipe), tmp_path / "full", backend="eager", threads=1, seed=3, log=None)
    first = train(copy.deepcopy(recipe), tmp_path / "split", backend="eager", threads=1, seed=3, stop_after=3, log=None)
    assert first["iteration"] == 3 and first["checkpoint"].name == "iter_3.pth"
    second = train(copy.deepcopy(recipe), tmp_path / "split", backend="eager", threads=1, seed=3, resume="auto", log=None)
    assert second["iteration"] == 6
    full_log, split_log = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    assert [r["iteration"] for r in split_log] == ["2", "4", "6"]
    # every head's loss, bit for bit (repr), and the lr; row 4 averages iterations 3 and 4,
    # one of them run before the stop
    assert split_log == full_log
    a = torch.load(full["checkpoint"], weights_only=True)
    b = torch.load(second["checkpoint"], weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    # the training checkpoint is also an mmseg-style checkpoint
    bf.load_mmseg_checkpoint(bf.BiSeNetV2Segmentor(), full["checkpoint"])


def test_logged_losses_are_means_over_the_log_interval(tiny_data, tmp_path):
    # mmcv's TextLoggerHook logs each loss averaged over the interval's iterations.
    recipe = tiny_recipe(tiny_data)
    train(copy.deepcopy(recipe), tmp_path / "every", backend="eager", threads=1, seed=3, log=None)
    recipe["log_interval"] = 4
    train(copy.deepcopy(recipe), tmp_path / "fourth", backend="eager", threads=1, seed=3, log=None)
    every, fourth = read_log(tmp_path / "every"), read_log(tmp_path / "fourth")
    assert [r["iteration"] for r in fourth] == ["4", "6"]  # the last, partial interval too
    for row, window in zip(fourth, (every[0:4], every[4:6])):
        assert row["lr"] == window[-1]["lr"]
        for key in ("loss", *LOSS_KEYS):
            assert float(row[key]) == pytest.approx(sum(float(r[key]) for r in window) / len(window), rel=1e-6), key


def test_recompute_trains_like_the_plain_model(tiny_data, tmp_path):
    recipe = tiny_recipe(tiny_data, iters=3)
    plain = train(copy.deepcopy(recipe), tmp_path / "plain", backend="eager", threads=1, seed=3, log=None)
    recomputed = train(copy.deepcopy(recipe), tmp_path / "recompute", backend="eager", threads=1, seed=3,
                       recompute=True, log=None)
    plain_log, recomputed_log = read_log(tmp_path / "plain"), read_log(tmp_path / "recompute")
    assert [r.keys() for r in recomputed_log] == [r.keys() for r in plain_log] and len(plain_log) == 3
    assert recomputed_log[0] == plain_log[0]  # the forward is the eager one, bit for bit
    for a, b in zip(plain_log[1:], recomputed_log[1:]):  # after updates from rounding-level gradient differences
        for key in a:
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-3), key
    a = torch.load(plain["checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(recomputed["checkpoint"], weights_only=True)["state_dict"]
    assert list(b) == list(a)  # same keys: checkpoints interchange
    for key in a:  # float rounding only: within 1e-3 of each tensor's scale, 1e-5 absolute
        if a[key].is_floating_point():
            scale = a[key].abs().max()
            # Except a tensor that is rounding noise as a whole: the BN biases before a 1x1 conv
            # and a training-mode BN (the shortcuts' depthwise BNs) have an analytically zero
            # gradient, so after updates they hold noise (~5e-5, different with each torch
            # release), compared in absolute terms.
            tolerance = 1e-3 * scale + 1e-5 if scale >= 1e-4 else 1e-4
            assert (b[key] - a[key]).abs().max() <= tolerance, key
        else:
            assert torch.equal(b[key], a[key]), key


def test_channels_last_trains_like_nchw(tiny_data, tmp_path):
    recipe = tiny_recipe(tiny_data, iters=2)
    # 64x64 crops, so the 1/32 stage is 2x2: at 32x32 its training-mode BatchNorms see two
    # values per channel and turn rounding into 1e-2 loss differences (float64 disagrees with
    # both layouts as much), which says nothing about the layout.
    recipe["data"].update(crop_size=[64, 64])
    train(copy.deepcopy(recipe), tmp_path / "nchw", backend="eager", threads=1, seed=3, log=None)
    nhwc = train(copy.deepcopy(recipe), tmp_path / "nhwc", backend="auto", threads=1, seed=3, channels_last=True,
                 log=None)
    weight = torch.load(nhwc["checkpoint"], weights_only=True)["state_dict"]["decode_head.convs.0.conv.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last)
    # Same first losses up to the convolutions' rounding; after an update, the tiny batches'
    # BatchNorm amplifies rounding to ~1e-3, so later steps are only required to be finite.
    first_nchw, first_nhwc = read_log(tmp_path / "nchw")[0], read_log(tmp_path / "nhwc")[0]
    for key in first_nchw:
        assert float(first_nhwc[key]) == pytest.approx(float(first_nchw[key]), rel=1e-4), key
    assert all(math.isfinite(float(v)) for row in read_log(tmp_path / "nhwc") for v in row.values())


def test_train_runs_outside_the_main_thread(tiny_data, tmp_path):
    """Only the main thread may install signal handlers: train() called in another thread (a
    notebook's, a job runner's) failed at once with "signal only works in main thread"."""
    outcome = {}

    def run():
        try:
            outcome["result"] = train(tiny_recipe(tiny_data, iters=2), tmp_path, backend="eager", threads=1, log=None)
        except Exception as err:  # noqa: BLE001 - an exception in a thread would only be printed; asserted below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"]["iteration"] == 2 and outcome["result"]["checkpoint"].exists()


def test_truncated_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    result = train(tiny_recipe(tiny_data, iters=2), tmp_path, backend="eager", threads=1, log=None)
    good = result["checkpoint"]
    bad = tmp_path / "iter_9.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(train_state.CheckpointCorruptError) as err:
        train_state.load_training_checkpoint(bad)
    assert str(bad) in str(err.value) and "truncated or corrupt" in str(err.value) and "iter_2.pth" in str(err.value)
    with pytest.raises(train_state.CheckpointCorruptError, match="not a bisenet_fast training checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "weights.pth")
        train_state.load_training_checkpoint(tmp_path / "weights.pth")


def test_interrupted_write_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    result = train(tiny_recipe(tiny_data, iters=2), tmp_path, backend="eager", threads=1, log=None)
    good_bytes = result["checkpoint"].read_bytes()
    state = train_state.load_training_checkpoint(result["checkpoint"])

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(train_state.torch, "save", dying_save)
    state["iteration"] = 2  # overwriting iter_2.pth in place must not destroy it either
    with pytest.raises(KeyboardInterrupt):
        train_state.save_training_checkpoint(state, tmp_path)
    assert result["checkpoint"].read_bytes() == good_bytes
    assert train_state.latest_checkpoint(tmp_path) == result["checkpoint"]
    assert not list(tmp_path.glob(".*tmp*"))
    monkeypatch.undo()
    train_state.load_training_checkpoint(result["checkpoint"])


def test_sigterm_writes_a_usable_checkpoint(tiny_data, tmp_path):
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "bisenet_fast.train", "--recipe", "synthetic", "--data-root", str(tiny_data),
           "--crop", "32", "32", "--batch", "2", "--workers", "0", "--iters", "1000", "--log-interval", "1",
           "--eval-interval", "0", "--backend", "eager", "--threads", "1", "--work-dir", str(work)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + out
    assert "SIGTERM: stopped after iteration" in out
    ckpt = train_state.latest_checkpoint(work)
    state = train_state.load_training_checkpoint(ckpt)
    stopped_at = state["iteration"]
    assert stopped_at >= 2 and ckpt.name == f"iter_{stopped_at}.pth"
    resumed = subprocess.run(cmd + ["--resume", "auto", "--stop-after", str(stopped_at + 1)], capture_output=True,
                             text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {ckpt} at iteration {stopped_at}" in resumed.stdout


@pytest.mark.parametrize("batch, seed, match", [
    (1, 0, "samples_per_gpu \\(--batch\\) must be an int >= 2: the CEBlock's BatchNorm"),
    (2, -1, "seed must be an int in \\[0, 4294967295\\], got -1"),
])
def test_train_refuses_one_image_per_process_and_bad_seeds(tiny_data, tmp_path, batch, seed, match):
    """Before any work, instead of BatchNorm's or numpy's error from deep inside the run."""
    recipe = tiny_recipe(tiny_data, iters=1)
    recipe["data"]["samples_per_gpu"] = batch
    with pytest.raises(ValueError, match=match):
        train(recipe, tmp_path, backend="eager", threads=1, seed=seed, log=None)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("key, value, match", [
    ("checkpoint_interval", 0, "checkpoint_interval must be an int >= 1, got 0"),
    ("log_interval", 2.5, "log_interval must be an int >= 1, got 2.5"),
    ("eval_interval", -1, "eval_interval \\(0 or null: no evaluation\\) must be an int >= 0, got -1"),
])
def test_train_refuses_bad_intervals(tiny_data, tmp_path, key, value, match):
    recipe = tiny_recipe(tiny_data, iters=1)
    recipe[key] = value
    with pytest.raises(ValueError, match=match):
        train(recipe, tmp_path, backend="eager", threads=1, log=None)
    assert not list(tmp_path.iterdir())


def test_a_recipe_file_lacking_keys_is_a_clear_error_and_its_name_defaults_to_the_stem(tmp_path):
    recipe = load_recipe("synthetic")
    del recipe["name"]
    good = tmp_path / "my_recipe.json"
    good.write_text(json.dumps(recipe))
    assert load_recipe(str(good))["name"] == "my_recipe"
    del recipe["data"]["crop_size"], recipe["checkpoint_interval"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recipe))
    with pytest.raises(ValueError, match="bad.json' lacks checkpoint_interval, data.crop_size \\(the bundled"):
        load_recipe(str(bad))
    bad.write_text("{\"data\": ")
    with pytest.raises(ValueError, match="bad.json' is not valid JSON"):
        load_recipe(str(bad))


def test_resume_restores_only_this_device_cuda_rng_state(monkeypatch):
    """A checkpoint keeps each rank's own device's CUDA generator state; one written before,
    with a state per GPU the saving process saw, restores the entry of this device only
    (torch.cuda.set_rng_state_all failed where fewer GPUs are visible)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(state.tolist()))
    state = train_state.capture_rng_state()
    assert state["cuda"].tolist() == [7]
    train_state.restore_rng_state(state)
    per_gpu = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]
    train_state.restore_rng_state({**state, "cuda": per_gpu})
    train_state.restore_rng_state({**state, "cuda": per_gpu[:1]})  # saved with one GPU: nothing for device 1
    assert restored == [[7], [1]]


def test_training_evaluates_the_float16_recipe_in_float32_on_the_cpu(tiny_data, tmp_path, monkeypatch):
    """As `evaluate` does (and the README says): float16 autocast only on CUDA."""
    seen = []
    monkeypatch.setattr(train_module, "evaluate_model", lambda *args, amp_dtype, **kwargs: seen.append(amp_dtype) or
                        {"mIoU": 0.0, "mAcc": 0.0, "aAcc": 0.0, "IoU": [0.0] * 19, "Acc": [0.0] * 19})
    recipe = float16_recipe(tiny_data, iters=1)
    recipe["amp"]["eval_autocast"] = True
    recipe["eval_interval"] = 1
    train(recipe, tmp_path, backend="eager", threads=1, device="cpu", log=None)
    assert seen == [None]


@pytest.mark.parametrize("amp, expected", [
    ({"dtype": "float16", "loss_scale": 512.0, "eval_autocast": True}, torch.float16),  # the fp16 recipe's
    ({"dtype": "bfloat16", "loss_scale": 512.0, "eval_autocast": True}, torch.bfloat16),
    ({"dtype": "bfloat16", "loss_scale": 512.0}, None),
    (None, None),
], ids=["float16", "bfloat16", "bfloat16-train-only", "no-amp"])
def test_evaluate_on_cuda_autocasts_in_the_recipes_amp_dtype(tiny_data, tmp_path, monkeypatch, amp, expected):
    """Without --amp, evaluate took float16 for every recipe that sets eval_autocast, where
    training's evaluations took the recipe's own AMP dtype: a bfloat16 recipe scored in
    eval.csv and in `evaluate` under different autocasts. The GPU is faked: evaluate only
    reads the device (the model is not moved, the evaluation is recorded, not run)."""
    seen = []
    recipe = tiny_recipe(tiny_data)
    recipe["amp"] = amp
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    torch.save(bf.BiSeNetV2Segmentor().state_dict(), tmp_path / "weights.pth")
    monkeypatch.setattr(evaluate_module, "init_distributed", lambda device: DistContext(device=torch.device("cuda", 0)))
    monkeypatch.setattr(nn.Module, "to", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(evaluate_module, "evaluate_model",
                        lambda model, dataset, ctx, test_cfg, aug_test, amp_dtype, *rest: seen.append(amp_dtype) or
                        {"mIoU": 0.0, "mAcc": 0.0, "aAcc": 0.0, "IoU": [0.0] * 19, "Acc": [0.0] * 19})
    assert evaluate_main(["--recipe", str(tmp_path / "recipe.json"), "--checkpoint", str(tmp_path / "weights.pth")]) == 0
    assert seen == [expected]


def test_resuming_past_the_schedule_is_an_error_and_at_its_end_trains_nothing(tiny_data, tmp_path):
    recipe = tiny_recipe(tiny_data, iters=2)
    train(copy.deepcopy(recipe), tmp_path, backend="eager", threads=1, log=None)
    said = []
    again = train(copy.deepcopy(recipe), tmp_path, backend="eager", threads=1, resume="auto",
                  log=lambda line, **_: said.append(line))
    assert again["iteration"] == 2 and again["checkpoint"] is None
    assert any("nothing left to train" in line for line in said)
    recipe["schedule"]["max_iters"] = 1
    with pytest.raises(ValueError, match="it is at iteration 2, past this run's max_iters \\(1, --iters\\)"):
        train(recipe, tmp_path, backend="eager", threads=1, resume="auto", log=None)


def test_resuming_at_or_past_stop_after_trains_nothing(tiny_data, tmp_path, monkeypatch):
    recipe = tiny_recipe(tiny_data)
    train(copy.deepcopy(recipe), tmp_path, backend="eager", threads=1, stop_after=3, log=None)
    steps = count_optimizer_steps(monkeypatch)
    for stop_after in (3, 2):
        messages = []
        result = train(copy.deepcopy(recipe), tmp_path, backend="eager", threads=1, stop_after=stop_after,
                       resume="auto", log=lambda *a, **k: messages.append(a[0]))
        assert result["iteration"] == 3 and not steps
        assert f"iteration 3 is at or past --stop-after ({stop_after}): nothing to train" in messages


def test_resuming_after_a_crash_logs_each_iteration_once(tiny_data, tmp_path):
    """A run that dies after its last checkpoint (an OOM kill, a lost node: no SIGTERM
    checkpoint) has already logged the iterations past it; the resumed run logs them again.
    log.csv and eval.csv must then read as a run never stopped, not repeat those rows."""
    recipe = tiny_recipe(tiny_data, iters=6)
    recipe.update(checkpoint_interval=4, eval_interval=2)
    full = train(copy.deepcopy(recipe), tmp_path / "full", backend="eager", threads=1, seed=3, log=None)

    class Crash(Exception):
        pass

    def crash_after_iteration_5(line, **_):
        if line.startswith("iter 5/"):
            raise Crash

    with pytest.raises(Crash):  # after evaluating iteration 2, checkpointing 4, evaluating 4, logging 5
        train(copy.deepcopy(recipe), tmp_path / "crash", backend="eager", threads=1, seed=3, log=crash_after_iteration_5)
    resumed = train(copy.deepcopy(recipe), tmp_path / "crash", backend="eager", threads=1, seed=3, resume="auto",
                    log=None)
    assert full["iteration"] == resumed["iteration"] == 6
    assert read_log(tmp_path / "crash") == read_log(tmp_path / "full")
    assert [r["iteration"] for r in read_log(tmp_path / "crash")] == ["1", "2", "3", "4", "5", "6"]
    evals = [Path(tmp_path / d / "eval.csv").read_text() for d in ("full", "crash")]
    assert evals[0] == evals[1] and [line.split(",")[0] for line in evals[1].splitlines()[1:]] == ["2", "4", "6"]


def test_a_stop_before_an_evaluation_leaves_it_to_the_resumed_run(tiny_data, tmp_path):
    """SIGTERM at an evaluation iteration checkpoints at once; the resumed run evaluates that
    checkpoint first, so eval.csv has every scheduled row, as a run never stopped has."""
    recipe = tiny_recipe(tiny_data, iters=4)
    recipe["eval_interval"] = 2

    def stop_at_iteration_2(line, **_):
        if line.startswith("iter 2/"):
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = train(copy.deepcopy(recipe), tmp_path, backend="eager", threads=1, log=stop_at_iteration_2)
    assert stopped["stopped_by"] == "SIGTERM" and stopped["iteration"] == 2
    assert torch.load(stopped["checkpoint"], weights_only=True)["eval_pending"] is True
    resumed = train(copy.deepcopy(recipe), tmp_path, backend="eager", threads=1, resume="auto", log=None)
    assert resumed["iteration"] == 4
    with open(tmp_path / "eval.csv") as f:
        assert [row["iteration"] for row in csv.DictReader(f)] == ["2", "4"]


def test_evaluating_unconverted_labels_names_the_file_and_the_converter_and_restores_training_mode(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for label in (data / "gtFine" / "val").rglob("*_labelTrainIds.png"):
        Image.fromarray(np.full((32, 64), 26, dtype=np.uint8)).save(label)  # a labelId: car
    dataset = CityscapesDataset(data, "val")
    model = bf.BiSeNetV2Segmentor().train()
    with pytest.raises(ValueError, match=re.escape(f"{dataset.pairs[0][1]}: label values must be in [0, 19) or 255 "
                                                   "(labelIds not yet converted to trainIds? run python -m "
                                                   "bisenet_fast.data.convert <root>)")):
        evaluate_model(model, dataset, DistContext(), load_recipe("synthetic")["test"])
    # Left in eval mode, a caller that goes on training would train with frozen BatchNorm
    # statistics and no dropout, silently.
    assert all(module.training for module in model.modules())


def test_an_error_while_loader_workers_run_ends_the_process(tiny_data, tmp_path):
    """The workers ignore SIGTERM (to outlive a process-group signal until the checkpoint is
    written). An error in the loop must still end the run: before train() stopped them
    itself, the interpreter's exit sent them SIGTERM and waited for them for ever."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for label in (data / "gtFine" / "train").rglob("*_labelTrainIds.png"):
        Image.fromarray(np.full((32, 64), 30, dtype=np.uint8)).save(label)  # 30: no class, not ignored
    cmd = [sys.executable, "-m", "bisenet_fast.train", "--recipe", "synthetic", "--data-root", str(data),
           "--crop", "32", "32", "--batch", "2", "--workers", "1", "--iters", "3", "--eval-interval", "0",
           "--backend", "eager", "--threads", "1", "--work-dir", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "_gtFine_labelTrainIds.png: label values must be in [0, 19) or 255, found 30 (labelIds not yet converted" \
        in run.stderr


@pytest.mark.parametrize("flag, value", [("--iters", "0"), ("--batch", "1"), ("--crop", "0"), ("--workers", "-1"),
                                         ("--checkpoint-interval", "0"), ("--log-interval", "0"),
                                         ("--stop-after", "0"), ("--eval-interval", "-1"), ("--iters", "x"),
                                         ("--seed", "-1"), ("--seed", str(2**32))])
def test_bad_numbers_on_the_command_line_are_usage_errors(flag, value, capsys):
    argv = [flag, value, "32"] if flag == "--crop" else [flag, value]
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_command_line_values_override_the_recipe_even_when_small():
    recipe = apply_overrides(load_recipe("synthetic"), parse_args(["--iters", "1", "--batch", "2", "--eval-interval", "0"]))
    assert recipe["schedule"]["max_iters"] == 1 and recipe["data"]["samples_per_gpu"] == 2
    assert recipe["eval_interval"] == 0


@pytest.mark.parametrize("parse, default", [
    (parse_args, "(default: bisenetv2_fcn_4x4_1024x1024_160k_cityscapes)"),
    (evaluate_parse_args, "(default: the bundled recipe that trained a bisenet_fast checkpoint, as its meta.recipe "
                          "says; else bisenetv2_fcn_4x4_1024x1024_160k_cityscapes)"),
], ids=["train", "evaluate"])
def test_help_names_the_recipe_taken_without_recipe(parse, default, capsys, monkeypatch):
    """--help says which recipe runs without --recipe (it did not)."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: the text is not wrapped
    with pytest.raises(SystemExit):
        parse(["--help"])
    assert default in capsys.readouterr().out


@pytest.mark.parametrize("recipe_arg, expected_scale, warned", [
    ([], [256, 128], False),  # the synthetic recipe that wrote the checkpoint, not the 4x4 recipe's [2048, 1024]
    (["--recipe", "bisenetv2_fcn_4x4_1024x1024_160k_cityscapes"], [2048, 1024], True),
    (["--recipe", "synthetic"], [256, 128], False),
], ids=["from-checkpoint", "other-recipe-warned", "same-recipe"])
def test_evaluate_takes_the_recipe_that_wrote_the_checkpoint(tiny_data, tmp_path, monkeypatch, capsys, recipe_arg,
                                                             expected_scale, warned):
    """Without --recipe, evaluate took the 4x4 recipe's test scale (2048x1024) for any
    checkpoint, a synthetic demo run's too; the recipe named in a training checkpoint's meta
    is now taken, and another --recipe is said on stderr."""
    result = train(tiny_recipe(tiny_data, iters=1), tmp_path, backend="eager", threads=1, log=None)
    seen = []
    monkeypatch.setattr(evaluate_module, "evaluate_model",
                        lambda model, dataset, ctx, test_cfg, *rest: seen.append(test_cfg["img_scale"]) or
                        {"mIoU": 0.0, "mAcc": 0.0, "aAcc": 0.0, "IoU": [0.0] * 19, "Acc": [0.0] * 19})
    assert evaluate_main([*recipe_arg, "--checkpoint", str(result["checkpoint"]), "--data-root", str(tiny_data),
                          "--device", "cpu"]) == 0
    assert seen == [expected_scale]
    assert ("was trained with recipe 'synthetic'" in capsys.readouterr().err) == warned


@pytest.mark.parametrize("parse", [parse_args, evaluate_parse_args], ids=["train", "evaluate"])
def test_help_prints_the_example_commands_as_written(parse, capsys):
    """A backslash ending a line of the module docstring (the --help text) joined the next line
    onto it: the example command printed as one line with a run of spaces in the middle."""
    with pytest.raises(SystemExit):
        parse(["--help"])
    description = capsys.readouterr().out.split("\n\n", 1)[1].split("\noptions:")[0]  # between usage and options
    assert [line for line in description.splitlines() if re.search(r"\S {2,}--", line)] == []


@pytest.mark.parametrize("content", [b"hello\n", b"PK\x03\x04" + bytes(200)])  # text; a broken zip
def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "not_a_checkpoint.pth"
    path.write_bytes(content)
    with pytest.raises(train_state.CheckpointCorruptError, match="not a torch checkpoint, or it is truncated"):
        train_state.load_training_checkpoint(path)
    with pytest.raises(ValueError, match="not a torch checkpoint, or it is truncated"):
        bf.checkpoint.read_checkpoint(path)


def test_non_finite_loss_names_iteration_and_head(tiny_data, tmp_path):
    losses = {k: torch.tensor(1.0) for k in LOSS_KEYS}
    losses["aux_2.loss_ce"] = torch.tensor(float("nan"))
    bad = non_finite_heads(losses, DistContext())
    assert bad == ["aux_2.loss_ce=nan"]
    assert "non-finite loss at iteration 8 in head(s): aux_2.loss_ce=nan;" in str(non_finite_error(bad, 7))
    recipe = tiny_recipe(tiny_data, iters=5)
    recipe["optimizer"]["lr"] = 1e30  # the first step blows the weights up
    with pytest.raises(NonFiniteLossError, match=r"at iteration [23] in head"):
        train(recipe, tmp_path, backend="eager", threads=1, log=None)


def float16_recipe(data_root, iters):
    """The tiny recipe under the fp16 recipe's AMP, on 96x96 crops: at 32x32 the 1/32 maps are
    1x1, and the BN gradients over 2 values overflow float16 at scale 512 in every step; at
    64x64 (2x2) they still did in some steps, depending on the images' exact pixels."""
    recipe = tiny_recipe(data_root, iters)
    recipe["data"].update(crop_size=[96, 96], img_scale=[192, 96])
    recipe["amp"] = {"dtype": "float16", "loss_scale": 512.0}
    return recipe


def count_optimizer_steps(monkeypatch) -> list:
    """One entry per SGD step taken (GradScaler calls it only for steps it does not skip)."""
    steps, sgd_step = [], torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: steps.append(1) or sgd_step(self, *a, **k))
    return steps


def _decode_loss_changed_on_calls(monkeypatch, calls, change):
    """The decode head's loss replaced by change(loss) on the given forward calls (1-based)."""
    loss, count = bf.BiSeNetV2Segmentor.loss, [0]

    def changed(self, images, labels):
        losses = loss(self, images, labels)
        count[0] += 1
        if count[0] in calls:
            losses["decode.loss_ce"] = change(losses["decode.loss_ce"])
        return losses

    monkeypatch.setattr(bf.BiSeNetV2Segmentor, "loss", changed)


def _inf_decode_loss_on_calls(monkeypatch, calls):
    """Make the decode head's loss inf on the given forward calls, as an fp16 overflow would."""
    _decode_loss_changed_on_calls(monkeypatch, calls, lambda value: value * float("inf"))


def test_the_backend_environment_variable_reaches_training(tiny_data, tmp_path, monkeypatch):
    """Without --backend (train()'s backend=None) BISENET_FAST_BACKEND decides; it used to be
    overridden by the 'auto' default."""
    assert train_module.parse_args(["--recipe", "synthetic"]).backend is None
    seen, loss = [], bf.BiSeNetV2Segmentor.loss

    def spying_loss(self, images, labels):
        seen.append(bf.backends.current("ohem_cross_entropy"))
        return loss(self, images, labels)

    monkeypatch.setattr(bf.BiSeNetV2Segmentor, "loss", spying_loss)
    monkeypatch.setenv(bf.backends.ENV_VAR, "eager")
    train(tiny_recipe(tiny_data, iters=1), tmp_path, threads=1, log=None)
    assert seen == ["eager"]


def test_float16_skips_a_step_with_a_non_finite_loss_as_mmcv(tiny_data, tmp_path, monkeypatch):
    """The fp16 recipe's static GradScaler skips such a step and training goes on (spec §7)."""
    _inf_decode_loss_on_calls(monkeypatch, {2})
    steps = count_optimizer_steps(monkeypatch)
    messages = []
    result = train(float16_recipe(tiny_data, iters=3), tmp_path, backend="eager", threads=1, log=lambda *a, **k: messages.append(a[0]))
    assert result["iteration"] == 3 and len(steps) == 2
    assert any("iteration 2: non-finite loss in head(s) decode.loss_ce=inf; step skipped" in m for m in messages)
    assert math.isinf(float(read_log(tmp_path)[1]["decode.loss_ce"]))
    state = train_state.load_training_checkpoint(result["checkpoint"])
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert state["scaler"]["scale"] == 512.0  # static: a dynamic scaler halves it on the overflow


def test_float16_stops_after_too_many_skipped_steps_in_a_row(tiny_data, tmp_path, monkeypatch):
    _inf_decode_loss_on_calls(monkeypatch, {2, 3})
    monkeypatch.setattr(sys.modules["bisenet_fast.train"], "MAX_SKIPPED_STEPS", 2)
    with pytest.raises(NonFiniteLossError, match=r"in 2 steps in a row, the last at iteration 3, in head\(s\): decode"):
        train(float16_recipe(tiny_data, iters=4), tmp_path, backend="eager", threads=1, log=None)


class _InfGradient(torch.autograd.Function):
    """Identity forward; inf gradient backward: a finite loss whose float16 gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _inf_gradients_on_calls(monkeypatch, calls):
    """The decode head's loss stays finite, but its gradients are inf on the given forward calls."""
    _decode_loss_changed_on_calls(monkeypatch, calls, _InfGradient.apply)


def test_float16_reports_a_step_skipped_for_overflowing_gradients(tiny_data, tmp_path, monkeypatch):
    """The static GradScaler also skips a step whose loss is finite but whose float16 gradients
    overflow (at small crops every step can): the run must say so, not train nothing silently."""
    _inf_gradients_on_calls(monkeypatch, {2})
    steps = count_optimizer_steps(monkeypatch)
    messages = []
    result = train(float16_recipe(tiny_data, iters=3), tmp_path, backend="eager", threads=1,
                   log=lambda *a, **k: messages.append(a[0]))
    assert result["iteration"] == 3 and len(steps) == 2
    assert any("iteration 2: inf/NaN gradients at the float16 static loss scale 512; step skipped" in m
               for m in messages)
    assert math.isfinite(float(read_log(tmp_path)[1]["decode.loss_ce"]))


def test_float16_stops_after_too_many_skipped_steps_of_either_kind(tiny_data, tmp_path, monkeypatch):
    _inf_gradients_on_calls(monkeypatch, {2, 4})
    _inf_decode_loss_on_calls(monkeypatch, {3})
    monkeypatch.setattr(sys.modules["bisenet_fast.train"], "MAX_SKIPPED_STEPS", 3)
    with pytest.raises(NonFiniteLossError, match=r"inf/NaN gradients in 3 steps in a row, the last at iteration 4"):
        train(float16_recipe(tiny_data, iters=5), tmp_path, backend="eager", threads=1, log=None)


def test_a_missing_val_split_fails_before_training(tmp_path):
    data_root = generate(tmp_path / "data", num_train=2, num_val=1, height=32, width=64)
    for path in sorted((data_root / "leftImg8bit" / "val").rglob("*.png"), reverse=True):
        path.unlink()
    recipe = tiny_recipe(data_root, iters=4)
    recipe["eval_interval"] = 2
    with pytest.raises(FileNotFoundError, match="no \\*_leftImg8bit.png files under"):
        train(recipe, tmp_path / "run", backend="eager", threads=1, log=None)
    log = tmp_path / "run" / "log.csv"
    assert not log.exists() or read_log(tmp_path / "run") == []  # not one iteration ran


def test_float16_static_loss_scale_stays_512(tiny_data, tmp_path, monkeypatch):
    steps = count_optimizer_steps(monkeypatch)
    result = train(float16_recipe(tiny_data, iters=2), tmp_path, backend="eager", threads=1, log=None)
    assert len(steps) == 2  # no step skipped: the scale is not too large for these gradients
    state = train_state.load_training_checkpoint(result["checkpoint"])
    assert state["scaler"]["scale"] == 512.0
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("device, match", [
    ("gpu", "--device: expected 'cpu', 'cuda' or 'cuda:<index>', got 'gpu'"),
    ("meta", "--device: expected 'cpu', 'cuda' or 'cuda:<index>', got 'meta'"),
    ("cuda:99", "--device 'cuda:99' \\(CUDA device 99\\): this machine has [0-9]+ usable CUDA device"),
])
def test_evaluate_cli_names_a_bad_device(tiny_data, tmp_path, device, match):
    """A device name torch does not know, or a CUDA device the machine lacks, was a RuntimeError
    from torch.device or torch.cuda's initialisation."""
    with pytest.raises(ValueError, match=match):
        evaluate_main(["--recipe", "synthetic", "--checkpoint", str(tmp_path / "x.pth"), "--data-root",
                       str(tiny_data), "--device", device])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cli_device_cuda_without_a_gpu_is_a_clear_error(tiny_data, tmp_path):
    recipe = tiny_recipe(tiny_data, iters=1)
    with pytest.raises(ValueError, match="--device 'cuda' \\(CUDA device 0\\): this machine has 0 usable CUDA "
                                         "device\\(s\\); use --device cpu"):
        train(recipe, tmp_path, device="cuda", backend="eager", threads=1, log=None)


def test_a_recipe_file_with_a_wrongly_typed_value_is_a_clear_error(tmp_path):
    """A string lr or a non-pair crop_size used to fail mid-run as a TypeError inside torch or
    the transforms (num_classes 0 as a conv RuntimeError); load_recipe names each such key."""
    recipe = load_recipe("synthetic")
    recipe["optimizer"]["lr"] = "0.05"
    recipe["data"]["crop_size"] = [64]
    recipe["model"]["num_classes"] = 0
    recipe["model"]["ohem"] = 1
    recipe["test"]["aug_ratios"] = []
    bad = tmp_path / "typed.json"
    bad.write_text(json.dumps(recipe))
    with pytest.raises(ValueError, match="typed.json' has invalid values") as err:
        load_recipe(str(bad))
    for line in ("data.crop_size: expected a list of two positive integers, got [64]",
                 "model.num_classes: expected an integer >= 1, got 0", "model.ohem: expected a boolean, got 1",
                 "optimizer.lr: expected a number, got '0.05'",
                 "test.aug_ratios: expected a list of one or more numbers, got []"):
        assert line in str(err.value)
    ok = load_recipe("synthetic")
    ok["schedule"]["warmup_ratio"], ok["test"]["aug_ratios"] = 0, [1]  # an int number, another count of ratios
    good = tmp_path / "ok.json"
    good.write_text(json.dumps(ok))
    assert load_recipe(str(good))["test"]["aug_ratios"] == [1]


@pytest.mark.parametrize("key, value, message", [
    ("amp", {"dtype": "fp16", "loss_scale": 512.0},
     "amp.dtype: expected one of ('none', 'float16', 'bfloat16'), got 'fp16'"),
    ("amp", "float16", "amp: expected null or an object such as"),
    ("amp", {"dtype": "float16", "loss_scale": "512"}, "amp.loss_scale: expected a positive number, got '512'"),
    ("amp", {"dtype": "float16", "loss_scale": 0}, "amp.loss_scale: expected a positive number, got 0"),
    ("amp", {"dtype": "float16", "eval_autocast": "yes"}, "amp.eval_autocast: expected a boolean, got 'yes'"),
    ("name", 5, "name: expected a non-empty string"),
    ("name", "", "name: expected a non-empty string"),
], ids=["amp-dtype", "amp-not-an-object", "amp-string-scale", "amp-zero-scale", "amp-eval-autocast", "name-int",
        "name-empty"])
def test_a_recipe_files_bad_optional_value_is_a_clear_error(tmp_path, key, value, message):
    """'amp' and 'name' are optional, so the check of the required keys skipped them: an amp
    dtype 'fp16' stopped training as KeyError: 'fp16', a string amp as an AttributeError, a
    name 5 as a TypeError in os.path.join; an empty name trained in work_dirs/ itself."""
    recipe = load_recipe("synthetic")
    recipe[key] = value
    path = tmp_path / "optional.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(ValueError, match="optional.json' has invalid values") as err:
        load_recipe(str(path))
    assert message in str(err.value)

def test_evaluate_cli_names_a_missing_checkpoint(tiny_data, tmp_path):
    """A missing --checkpoint was torch.serialization's FileNotFoundError, a directory its IsADirectoryError."""
    args = ["--recipe", "synthetic", "--data-root", str(tiny_data), "--device", "cpu", "--checkpoint"]
    with pytest.raises(FileNotFoundError, match="checkpoint '.*nothere.pth' does not exist"):
        evaluate_main(args + [str(tmp_path / "nothere.pth")])
    with pytest.raises(FileNotFoundError, match="is a directory, not a checkpoint file"):
        evaluate_main(args + [str(tmp_path)])


def test_resuming_a_checkpoint_of_another_model_names_the_checkpoint_and_recipe(tiny_data, tmp_path):
    """--resume of a checkpoint written with another num_classes was load_state_dict's bare
    RuntimeError; it names the checkpoint, both models and what to do."""
    first = train(tiny_recipe(tiny_data, iters=1), tmp_path / "a", backend="eager", threads=1, log=None)
    other = tiny_recipe(tiny_data, iters=2)
    other["model"]["num_classes"] = 5
    with pytest.raises(bf.checkpoint.CheckpointMismatchError,
                       match=f"cannot resume from {re.escape(str(first['checkpoint']))}: its weights do not fit this "
                             "run's model \\(recipe 'synthetic', num_classes 5; the checkpoint was written by recipe "
                             "'synthetic'\\); resume with the recipe that wrote it"):
        train(other, tmp_path / "b", resume=str(first["checkpoint"]), backend="eager", threads=1, log=None)


def test_a_work_dir_that_is_a_file_is_a_clear_error(tiny_data, tmp_path):
    """--work-dir naming a file (or below one) was pathlib's bare FileExistsError/NotADirectoryError."""
    taken = tmp_path / "taken"
    taken.write_text("")
    for work_dir in (taken, taken / "run"):
        with pytest.raises(NotADirectoryError, match=f"cannot use '{re.escape(str(work_dir))}' as the work dir "
                                                     "\\(--work-dir\\), where checkpoints and logs go: "):
            train(tiny_recipe(tiny_data, iters=1), work_dir, backend="eager", threads=1, log=None)


def test_evaluate_cli_reads_training_checkpoints(tiny_data, tmp_path, capsys):
    result = train(tiny_recipe(tiny_data, iters=1), tmp_path, backend="eager", threads=1, log=None)
    code = evaluate_main(["--recipe", "synthetic", "--checkpoint", str(result["checkpoint"]), "--data-root",
                          str(tiny_data), "--aug-test", "--limit", "1", "--backend", "eager", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "ms+flip" in out and "mIoU" in out and "bicycle" in out


def test_evaluate_cli_fused_matches_unfused(tiny_data, tmp_path, capsys):
    result = train(tiny_recipe(tiny_data, iters=1), tmp_path, backend="eager", threads=1, log=None)
    args = ["--recipe", "synthetic", "--checkpoint", str(result["checkpoint"]), "--data-root", str(tiny_data),
            "--limit", "2", "--device", "cpu"]
    summaries = []
    for extra in ([], ["--fused"], ["--fused", "--autotune"]):
        assert evaluate_main(args + extra) == 0
        out = capsys.readouterr().out
        summaries.append([float(v) for v in re.findall(r"(?:mIoU|mAcc|aAcc) ([0-9.]+)", out)])
    assert "(single-scale, fused, float32, autotuned, 1 process(es))" in out
    # The float32 inference form agrees with the model to ~1e-6: at most a near-tied pixel
    # or two may flip class.
    for fused in summaries[1:]:
        assert len(fused) == 3 and fused == pytest.approx(summaries[0], abs=0.05)
    with pytest.raises(SystemExit, match="use it with --fused"):
        evaluate_main(args + ["--autotune"])


def test_torchrun_two_gloo_processes_train_evaluate_and_resume(tiny_data, tmp_path):
    """The whole loop under torchrun on CPU: sharded sampler, per-rank RNG states gathered into
    rank 0's checkpoint, histograms all_reduced, and a resume of that checkpoint."""
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(30500 + os.getpid() % 1000), "-m", "bisenet_fast.train", "--recipe", "synthetic", "--data-root",
           str(tiny_data), "--crop", "32", "32", "--batch", "2", "--workers", "0", "--iters", "3", "--stop-after", "2",
           "--eval-interval", "2", "--log-interval", "1", "--backend", "eager", "--threads", "1", "--work-dir", str(work)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "iteration 2: val mIoU" in first.stdout
    assert "warning: recipe synthetic was published for 1 GPUs; this run has 2 x 2 = 4 images per step" in first.stdout
    state = train_state.load_training_checkpoint(work / "iter_2.pth")
    assert len(state["rng"]) == 2 and state["sampler"]["world_size"] == 2
    # The mIoU logged is the checkpoint's: both ranks evaluated with rank 0's BN statistics.
    model = bf.BiSeNetV2Segmentor(**load_recipe("synthetic")["model"])
    model.load_state_dict(state["state_dict"])
    with bf.backends.use("eager"):
        single = evaluate_model(model, CityscapesDataset(tiny_data, "val"), DistContext(), load_recipe("synthetic")["test"],
                                log=None)
    with open(work / "eval.csv") as f:
        assert float(next(csv.DictReader(f))["mIoU"]) == single["mIoU"]
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each rank's own dropout stream
    at = cmd.index("--stop-after")
    resume = cmd[:at] + cmd[at + 2 :] + ["--resume", "auto"]  # on to iteration 3
    second = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "iter 3/3" in second.stdout


def test_a_rank_the_checkpoint_lacks_keeps_a_dropout_stream_of_its_own(tiny_data, tmp_path):
    """A checkpoint of one process resumed on two: the second rank has no saved RNG state. It
    used to take rank 0's, and both ranks then drew the same dropout masks."""
    recipe = tiny_recipe(tiny_data, iters=2)
    train(copy.deepcopy(recipe), tmp_path, backend="eager", threads=1, stop_after=1, log=None)
    with open(tmp_path / "recipe.json", "w") as f:
        json.dump(recipe, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(31500 + os.getpid() % 1000), "-m", "bisenet_fast.train", "--recipe", str(tmp_path / "recipe.json"),
           "--backend", "eager", "--threads", "1", "--work-dir", str(tmp_path), "--resume", "auto"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "the data order will differ" in run.stdout
    state = train_state.load_training_checkpoint(tmp_path / "iter_2.pth")
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
