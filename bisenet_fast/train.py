"""Train BiSeNetV2 with one of the published recipes (spec §7, mmseg 0.x semantics).

    python -m bisenet_fast.train --recipe bisenetv2_fcn_4x4_1024x1024_160k_cityscapes \\
        --data-root data/cityscapes --work-dir work_dirs/4x4
    torchrun --nproc_per_node 4 -m bisenet_fast.train --recipe ...   # NCCL on GPUs, gloo on CPU
    python -m bisenet_fast.train ... --resume auto                    # continue exactly

Per iteration: lr from the 0.x poly-with-warmup schedule, forward under autocast (AMP
recipes), the five head losses (OHEM per recipe), backward (static loss scale 512 for
float16: steps with a non-finite loss or inf/NaN gradients are skipped, the scale never
changes, and each skipped step is reported), SGD step. A NaN or inf loss stops
float32/bfloat16 runs at once, float16 runs after MAX_SKIPPED_STEPS skipped steps in a row,
for either reason.
Checkpoints (atomic) every checkpoint_interval iterations and on SIGTERM/SIGINT; mIoU on the
val split every eval_interval iterations; a progress line and log.csv / eval.csv in work_dir.
log.csv has each head's loss averaged over the log interval and the ranks, as mmcv logs it,
but not mmseg's per-head pixel accuracy (acc_seg): it needs the label-resolution logits
that the fused loss never materialises.
"""
from __future__ import annotations

import argparse
import csv
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bisenet_fast as bf
from bisenet_fast.checkpoint import CheckpointMismatchError
from bisenet_fast.cli_args import MAX_SEED, NON_NEGATIVE_INT, POSITIVE_INT, SEED, int_at_least
from bisenet_fast.configs import load_recipe
from bisenet_fast.data.cityscapes import CityscapesDataset, class_names
from bisenet_fast.data.sampler import InfiniteShardedSampler
from bisenet_fast.data.transforms import IGNORE_INDEX, PhotoMetricDistortion, TrainPipeline
from bisenet_fast.distributed import (DistContext, any_rank, broadcast_bn_statistics, gather_objects,
                                      heads_to_sync_bn, init_distributed, leave_distributed, max_over_ranks,
                                      mean_over_ranks, usable_cores)
from bisenet_fast.evaluate import AMP_DTYPES, evaluate_model, recipe_eval_amp
from bisenet_fast.metrics import format_table
from bisenet_fast.models import use_fused_ge_training, use_recomputing_detail_branch
from bisenet_fast.train_state import (
    capture_rng_state,
    latest_checkpoint,
    load_training_checkpoint,
    restore_rng_state,
    save_training_checkpoint,
)

LOSS_KEYS = ("decode.loss_ce", "aux_0.loss_ce", "aux_1.loss_ce", "aux_2.loss_ce", "aux_3.loss_ce")
# float16 runs skip a step whose loss is not finite, as mmcv's static-scale Fp16OptimizerHook
# does (its GradScaler finds the inf/NaN gradients); this many in a row mean the run has
# diverged rather than overflowed once, and stop it.
MAX_SKIPPED_STEPS = 100
# The CEBlock's BatchNorm after global pooling sees one value per channel per image, and a
# training-mode BatchNorm needs more than one (plain per-process BN, at any crop size).
MIN_BATCH = 2
DEFAULT_LOG_INTERVAL = 50  # mmseg's


class NonFiniteLossError(FloatingPointError):
    """A head's loss became NaN or inf."""


def poly_lr(iteration: int, base_lr=0.05, max_iters=160000, power=0.9, min_lr=1e-4, warmup_iters=1000,
            warmup_ratio=0.1) -> float:
    """mmcv 0.x PolyLrUpdaterHook with linear warmup (spec §7), t the 0-based iteration:
    (base - min)(1 - t/T)^power + min, times (warmup_ratio + (1 - warmup_ratio) t / W) for t < W."""
    lr = (base_lr - min_lr) * (1 - iteration / max_iters) ** power + min_lr
    if iteration < warmup_iters:
        lr *= warmup_ratio + (1 - warmup_ratio) * iteration / warmup_iters
    return lr


def lr_at(iteration: int, recipe: dict) -> float:
    return poly_lr(iteration, recipe["optimizer"]["lr"], **recipe["schedule"])


def check_training_options(recipe: dict, seed: int) -> None:
    """What the CLI's argument types check, for a recipe from JSON or a direct call."""
    batch = recipe["data"]["samples_per_gpu"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < MIN_BATCH:
        raise ValueError(f"samples_per_gpu (--batch) must be an int >= {MIN_BATCH}: the CEBlock's BatchNorm after "
                         f"global pooling sees one value per channel per image; got {batch!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {seed!r}")
    for key, value, least in (("schedule.max_iters (--iters)", recipe["schedule"]["max_iters"], 1),
                              ("checkpoint_interval", recipe["checkpoint_interval"], 1),
                              ("log_interval", recipe.get("log_interval", DEFAULT_LOG_INTERVAL), 1),
                              ("eval_interval (0 or null: no evaluation)", recipe.get("eval_interval") or 0, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{key} must be an int >= {least}, got {value!r}")


def build_optimizer(model: nn.Module, recipe: dict) -> torch.optim.SGD:
    """SGD on all parameters, BN and biases included (no paramwise config, spec §7)."""
    opt = recipe["optimizer"]
    return torch.optim.SGD(model.parameters(), lr=opt["lr"], momentum=opt["momentum"],
                           weight_decay=opt["weight_decay"])


class LossModule(nn.Module):
    """forward(images, labels) -> the five losses, so DDP's gradient hooks see the loss pass."""

    def __init__(self, segmentor: bf.BiSeNetV2Segmentor):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, images, labels):
        return self.segmentor.loss(images, labels)


def build_model(recipe: dict, ctx: DistContext, recompute: bool = False,
                channels_last: bool = False) -> bf.BiSeNetV2Segmentor:
    """The segmentor on ctx.device; under NCCL its heads use SyncBN (mmseg), the backbone plain BN.
    With gloo on CPU, SyncBN cannot run, so each process keeps its own BN statistics in the heads.
    recompute: the GE expansions and the detail branch rebuild activations in backward instead
    of keeping them (same parameters and results, less memory). channels_last: the conv weights
    in NHWC, so activations follow (the layout tensor-core convolutions run natively)."""
    model = bf.BiSeNetV2Segmentor(**recipe["model"]).to(ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if recompute:
        use_recomputing_detail_branch(use_fused_ge_training(model))
    if ctx.enabled and ctx.device.type == "cuda":
        heads_to_sync_bn(model)
    return model


def wrap_for_training(model: bf.BiSeNetV2Segmentor, ctx: DistContext) -> nn.Module:
    """LossModule, under DDP when distributed."""
    if not ctx.enabled:
        return LossModule(model)
    # broadcast_buffers=False as mmseg: BN running statistics stay per process (rank 0's are saved)
    return DistributedDataParallel(LossModule(model), device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                   else None, broadcast_buffers=False)


def build_train_loader(recipe: dict, ctx: DistContext, seed: int, start_iteration: int):
    data = recipe["data"]
    pipeline = TrainPipeline(
        img_scale=tuple(data["img_scale"]), ratio_range=tuple(data["ratio_range"]), crop_size=tuple(data["crop_size"]),
        cat_max_ratio=data["cat_max_ratio"], flip_prob=data["flip_prob"],
        photometric=PhotoMetricDistortion() if data["photometric_distortion"] else None,
    )
    dataset = CityscapesDataset(data["root"], data["train_split"], pipeline, num_classes=recipe["model"]["num_classes"],
                                ignore_index=IGNORE_INDEX)
    batch = data["samples_per_gpu"]
    sampler = InfiniteShardedSampler(len(dataset), ctx.rank, ctx.world_size, seed, start=start_iteration * batch)
    workers = data["workers_per_gpu"]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=ctx.device.type == "cuda",
        drop_last=True, prefetch_factor=2 if workers else None, worker_init_fn=ignore_stop_signals,
        generator=torch.Generator(),  # keeps the loader from drawing on (and shifting) the global torch RNG
    )
    return loader, sampler


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process (a terminal or torchrun may
    signal the whole process group), which checkpoints and then shuts them down
    (stop_workers)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_workers(batches) -> None:
    """Stop the DataLoader workers of the iterator `batches` now. Left to the interpreter's
    exit, after an error whose traceback keeps the iterator alive, they are sent SIGTERM,
    which they ignore, and waited for, for ever. _shutdown_workers (private) is what the
    iterator's own __del__ calls; it is idempotent, and absent without workers."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the iteration and exits.

    Only the main thread can install the handlers (Python runs them there): train() called in
    another thread runs without them, and a signal acts on the process as it would otherwise."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal would raise ValueError
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.signum = signum

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def non_finite_heads(losses: dict, ctx: DistContext) -> list[str]:
    """The heads whose loss is NaN or inf on any rank, the same list on every rank: 'name=value'
    where this rank saw it, 'name (on another rank)' where only another did. Every rank must act
    on it alike: a rank stopping or skipping alone would leave the others waiting in the next
    gradient all_reduce until the process group's timeout."""
    values = torch.stack([losses[k].detach().float() for k in LOSS_KEYS])
    local = ~torch.isfinite(values)
    anywhere = max_over_ranks(local.to(torch.int32), ctx).tolist()
    return [f"{k}={values[i].item()}" if local[i] else f"{k} (on another rank)"
            for i, k in enumerate(LOSS_KEYS) if anywhere[i]]


def non_finite_error(bad: list[str], iteration: int, steps_in_a_row: int = 1) -> NonFiniteLossError:
    """The error that stops a run at 0-based `iteration`, for non_finite_heads' list `bad`."""
    where = f"at iteration {iteration + 1}" if steps_in_a_row == 1 else \
        f"in {steps_in_a_row} steps in a row, the last at iteration {iteration + 1},"
    return NonFiniteLossError(f"non-finite loss {where} in head(s): {', '.join(bad)}; stopping (lower the lr, or "
                              "resume from the last checkpoint)")


def gradients_overflowed(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """After scaler.step(optimizer) and before scaler.update(): whether the scaler skipped the
    step for inf/NaN gradients. (GradScaler keeps that only in a private record, the one its own
    step() reads; False where it is absent or the scaler is disabled.)"""
    if not scaler.is_enabled():
        return False
    found = getattr(scaler, "_found_inf_per_device", None)
    if found is None:
        return False
    return any(bool(v.item()) for v in found(optimizer).values())


def gradient_overflow_error(iteration: int, steps_in_a_row: int, loss_scale: float) -> NonFiniteLossError:
    return NonFiniteLossError(f"inf/NaN gradients in {steps_in_a_row} steps in a row, the last at iteration "
                              f"{iteration + 1}: the float16 static loss scale {loss_scale:g} overflows them and "
                              "every such step is skipped, so the model is not training; stopping (train in "
                              "float32 or bfloat16, or with larger crops, or resume from the last checkpoint)")


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class CsvLog:
    """A CSV file of rows keyed by 'iteration', appended to as the run goes.

    start: the iteration this run starts from (the checkpoint resumed, or 0). An existing file's
    rows past it (and at it, with keep_start False) are dropped first: this run writes them
    anew, and a run that died after its last checkpoint (a crash, a killed job) had already
    written them, so appending alone would repeat those iterations."""

    def __init__(self, path: Path, fields, start: int = 0, keep_start: bool = True):
        self.path, self.fields = path, list(fields)
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or "iteration" not in rows[0]:
            return
        column = rows[0].index("iteration")

        def kept(row) -> bool:
            try:
                iteration = int(row[column])
            except (IndexError, ValueError):
                return True
            return iteration < start or (keep_start and iteration == start)

        body = [row for row in rows[1:] if kept(row)]
        if len(body) != len(rows) - 1:
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([rows[0], *body])
            os.replace(tmp, path)

    def write(self, row: dict):
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in self.fields])


def cpu_threads_per_process(ctx: DistContext, loader_workers: int) -> int:
    """The cores this job may use (usable_cores) shared out among its processes on this machine
    (torchrun's LOCAL_WORLD_SIZE), less the DataLoader workers when the model also runs on the
    CPU: OpenMP threads that have to share a core with other busy processes spin waiting for
    each other and slow every step down."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    cores = usable_cores() // local_world
    return max(1, cores - (loader_workers if ctx.device.type == "cpu" else 0))


def train(recipe: dict, work_dir: str | os.PathLike, *, resume: str | None = None, device: str | None = None,
          backend: str | None = None, seed: int = 0, stop_after: int | None = None, deterministic: bool = False,
          threads: int | None = None, recompute: bool = False, channels_last: bool = False, log=print) -> dict:
    """Runs (or continues) training; returns {'iteration', 'checkpoint', 'metrics', 'stopped_by'}.
    backend: bisenet_fast's kernels (default: the current choice, see backends.use_or_current);
    threads: torch CPU threads per process (default: cpu_threads_per_process); recompute and
    channels_last: see build_model (the batches follow channels_last too).
    Like a training script, it sets process-wide state and leaves it set: torch's CPU thread
    count, cudnn.benchmark/deterministic (from `deterministic`) and the torch RNG's seed."""
    check_training_options(recipe, seed)
    ctx = init_distributed(device)
    work_dir = Path(work_dir)
    if ctx.is_main:
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError, PermissionError) as err:
            raise NotADirectoryError(f"cannot use {str(work_dir)!r} as the work dir (--work-dir), where checkpoints "
                                     f"and logs go: {err.strerror.lower()} ({err.filename}); give a directory "
                                     "that can be created or written") from None
    say = log if ctx.is_main and log is not None else (lambda *a, **k: None)
    torch.set_num_threads(threads or cpu_threads_per_process(ctx, recipe["data"]["workers_per_gpu"]))
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.manual_seed(seed + ctx.rank)

    model = build_model(recipe, ctx, recompute, channels_last)
    image_format = torch.channels_last if channels_last else torch.contiguous_format
    optimizer = build_optimizer(model, recipe)
    amp = recipe.get("amp") or {}
    amp_dtype = AMP_DTYPES[amp.get("dtype", "none")]
    loss_scale = float(amp.get("loss_scale", 512.0))
    # mmcv's static Fp16OptimizerHook: GradScaler skips steps with inf/NaN grads, and the scale is
    # set back to loss_scale after every step, so it never changes.
    scaler = torch.amp.GradScaler(ctx.device.type, init_scale=loss_scale, enabled=amp_dtype is torch.float16)

    start_iteration = 0
    if resume == "auto":
        resume = latest_checkpoint(work_dir)
        if resume is None:
            say(f"--resume auto: no checkpoint in {work_dir}, starting from scratch")
    if resume:
        state = load_training_checkpoint(resume)
        try:
            model.load_state_dict(state["state_dict"])
        except RuntimeError as err:  # another model: num_classes, or weights of another network
            written_by = (state.get("meta") or {}).get("recipe") if isinstance(state.get("meta"), dict) else None
            raise CheckpointMismatchError(
                f"cannot resume from {resume}: its weights do not fit this run's model (recipe {recipe.get('name')!r}, "
                f"num_classes {recipe['model']['num_classes']}; the checkpoint was written by recipe {written_by!r}); "
                f"resume with the recipe that wrote it, or train afresh in another --work-dir\n{err}") from None
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_iteration = int(state["iteration"])
        sampler_state = state["sampler"]
        batch_then = sampler_state["consumed_per_rank"] // max(start_iteration, 1)
        if (sampler_state["world_size"] != ctx.world_size or sampler_state["seed"] != seed
                or (start_iteration and batch_then != recipe["data"]["samples_per_gpu"])):
            say(f"warning: checkpoint was written with world_size {sampler_state['world_size']}, seed "
                f"{sampler_state['seed']} and {batch_then} images per process; the data order will differ "
                "from a run never stopped")
        rng = state["rng"]
        if ctx.rank < len(rng):
            restore_rng_state(rng[ctx.rank])
        # else: a rank the checkpoint's run did not have keeps its own seed (seed + rank, above);
        # rank 0's state would give it rank 0's dropout stream.
        say(f"resumed from {resume} at iteration {start_iteration}")
        max_iters = recipe["schedule"]["max_iters"]
        if start_iteration > max_iters:
            raise ValueError(f"cannot resume from {resume}: it is at iteration {start_iteration}, past this run's "
                             f"max_iters ({max_iters}, --iters)")
        eval_pending = bool(state.get("eval_pending"))
        # The losses summed since the last log line, so that the next line averages the same
        # iterations as a run never stopped (absent if another number of processes wrote it).
        windows = state.get("log_window") or []
        log_window = windows[ctx.rank] if len(windows) == ctx.world_size else None
    else:
        eval_pending, log_window = False, None

    step_module = wrap_for_training(model, ctx)
    model.train()
    # Built now, so that a missing or unconverted val split fails before hours of training.
    val_set = CityscapesDataset(recipe["data"]["root"], recipe["data"]["val_split"]) if recipe.get("eval_interval") \
        else None
    loader, sampler = build_train_loader(recipe, ctx, seed, start_iteration)
    batches = None  # iter(loader), which starts the workers, inside the try that stops them
    max_iters = recipe["schedule"]["max_iters"]
    batch = recipe["data"]["samples_per_gpu"]
    published_gpus = recipe.get("gpus")
    if published_gpus and published_gpus != ctx.world_size:
        say(f"warning: recipe {recipe.get('name')} was published for {published_gpus} GPUs; this run has "
            f"{ctx.world_size} x {batch} = {ctx.world_size * batch} images per step (the lr is not rescaled)")
    log_interval = recipe.get("log_interval", DEFAULT_LOG_INTERVAL)
    # Rows past the starting iteration came from a run that died after its last checkpoint (or
    # from an earlier run in this work_dir): this run logs those iterations again. An evaluation
    # still pending at the checkpoint runs again too, so its row (if one was written) goes as well.
    loss_log = CsvLog(work_dir / "log.csv", ["iteration", "lr", "loss", *LOSS_KEYS, "seconds"],
                      start_iteration) if ctx.is_main else None
    eval_log = CsvLog(work_dir / "eval.csv", ["iteration", "mIoU", "mAcc", "aAcc"], start_iteration,
                      keep_start=not (eval_pending and val_set is not None)) if ctx.is_main else None
    stop = StopRequest().install()
    result = {"iteration": start_iteration, "checkpoint": None, "metrics": None, "stopped_by": None}

    def is_eval_iteration(iteration: int) -> bool:
        interval = recipe.get("eval_interval")
        return bool(interval) and (iteration % interval == 0 or iteration == max_iters)

    def checkpoint(iteration: int, eval_pending: bool = False) -> Path | None:
        """eval_pending: a stop came before this iteration's evaluation, which a resumed run
        then runs first."""
        per_rank = gather_objects({"rng": capture_rng_state(),
                                   "log_window": {"loss_sums": loss_sums.cpu(), "iterations": summed_iters}}, ctx)
        if not ctx.is_main:
            return None
        state = {
            "meta": {"recipe": recipe.get("name"), "torch": str(torch.__version__), "bisenet_fast": bf.__version__},
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "iteration": iteration,
            "rng": [r["rng"] for r in per_rank],
            "log_window": [r["log_window"] for r in per_rank],
            "sampler": {"seed": seed, "world_size": ctx.world_size, "consumed_per_rank": iteration * batch},
            "eval_pending": eval_pending,
        }
        path = save_training_checkpoint(state, work_dir)
        result["checkpoint"] = path
        say(f"checkpoint {path}")
        return path

    def run_eval(iteration: int):
        broadcast_bn_statistics(model, ctx)
        # As `evaluate` does: mmseg 0.x's fp16 recipe evaluated under float16 autocast, on GPUs.
        eval_dtype = AMP_DTYPES[recipe_eval_amp(recipe, ctx.device)]
        metrics = evaluate_model(model, val_set, ctx, recipe["test"], amp_dtype=eval_dtype,
                                 num_classes=recipe["model"]["num_classes"], log=say)
        result["metrics"] = metrics
        if ctx.is_main:
            say(f"iteration {iteration}: val mIoU {metrics['mIoU']:.2f}\n"
                + format_table(metrics, class_names(recipe["model"]["num_classes"])))
            eval_log.write({"iteration": iteration, "mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"],
                            "aAcc": metrics["aAcc"]})

    try:
        with bf.backends.use_or_current(backend):
            if eval_pending and val_set is not None:
                say(f"iteration {start_iteration}: the evaluation the stop interrupted")
                run_eval(start_iteration)
            if start_iteration == max_iters:
                say(f"iteration {start_iteration} is this run's last (max_iters): nothing left to train")
            end = max_iters if stop_after is None else min(max_iters, max(stop_after, start_iteration))
            if start_iteration == end < max_iters:
                say(f"iteration {start_iteration} is at or past --stop-after ({stop_after}): nothing to train")
            batches = iter(loader)
            tick = time.perf_counter()
            window_start, window_iters = tick, 0
            # Each head's loss summed over the iterations since the last log line: mmcv's
            # logger reports their mean over the interval, not the last iteration's value.
            loss_sums, summed_iters = torch.zeros(len(LOSS_KEYS), device=ctx.device), 0
            if log_window is not None:
                loss_sums.copy_(log_window["loss_sums"])
                summed_iters = log_window["iterations"]
            skipped_in_a_row = 0
            for iteration in range(start_iteration, end):
                lr = lr_at(iteration, recipe)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images, labels = next(batches)
                images = images.to(ctx.device, non_blocking=True).contiguous(memory_format=image_format)
                labels = labels.to(ctx.device, non_blocking=True)
                with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = step_module(images, labels)
                bad = non_finite_heads(losses, ctx)
                if bad and not scaler.is_enabled():
                    raise non_finite_error(bad, iteration)
                if bad:
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                        raise non_finite_error(bad, iteration, skipped_in_a_row)
                    say(f"iteration {iteration + 1}: non-finite loss in head(s) {', '.join(bad)}; step skipped "
                        "(float16 static loss scale)", flush=True)
                total = sum(losses[k] for k in LOSS_KEYS)
                optimizer.zero_grad(set_to_none=True)
                # Every rank runs backward, so DDP's all_reduce pairs up even on a skipped step.
                scaler.scale(total).backward()
                if not bad:
                    scaler.step(optimizer)
                    # A finite loss whose float16 gradients overflowed at the static scale: the
                    # GradScaler skipped this step too (as mmcv's does). The gradients were
                    # all_reduced, so every rank finds the same.
                    if gradients_overflowed(scaler, optimizer):
                        skipped_in_a_row += 1
                        if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                            raise gradient_overflow_error(iteration, skipped_in_a_row, loss_scale)
                        say(f"iteration {iteration + 1}: inf/NaN gradients at the float16 static loss scale "
                            f"{loss_scale:g}; step skipped", flush=True)
                    else:
                        skipped_in_a_row = 0
                if scaler.is_enabled():
                    scaler.update(loss_scale)
                done = iteration + 1
                result["iteration"] = done
                window_iters += 1
                loss_sums += torch.stack([losses[k].detach().float() for k in LOSS_KEYS])
                summed_iters += 1

                if done % log_interval == 0 or done == max_iters:
                    # The mean over the interval and the ranks, as mmseg logs it (every rank
                    # joins the all_reduce).
                    means = mean_over_ranks(loss_sums / summed_iters, ctx)
                    values = dict(zip(LOSS_KEYS, means.tolist()))
                    loss_sums.zero_()
                    summed_iters = 0
                if ctx.is_main and (done % log_interval == 0 or done == max_iters):
                    now = time.perf_counter()
                    speed = window_iters / max(now - window_start, 1e-9)
                    window_start, window_iters = now, 0
                    loss_value = sum(values.values())
                    loss_log.write({"iteration": done, "lr": repr(lr), "loss": repr(loss_value),
                                    **{k: repr(v) for k, v in values.items()}, "seconds": f"{now - tick:.3f}"})
                    say(f"iter {done}/{max_iters}  loss {loss_value:.4f}  decode {values['decode.loss_ce']:.4f}  "
                        f"lr {lr:.3e}  {speed:.2f} it/s  ETA {format_eta((max_iters - done) / speed)}", flush=True)

                if any_rank(stop.signum is not None, ctx):
                    checkpoint(done, eval_pending=is_eval_iteration(done))
                    signum = stop.signum or signal.SIGTERM
                    result["stopped_by"] = signal.Signals(signum).name
                    say(f"{result['stopped_by']}: stopped after iteration {done}; resume with --resume "
                        f"{result['checkpoint'] or 'auto'}", flush=True)
                    return result
                last = done == end
                if done % recipe["checkpoint_interval"] == 0 or last:
                    checkpoint(done)
                if is_eval_iteration(done):
                    run_eval(done)
                if last:
                    break
    finally:
        stop.uninstall()
        stop_workers(batches)
    return result


def apply_overrides(recipe: dict, args) -> dict:
    data = recipe["data"]
    if args.data_root:
        data["root"] = args.data_root
    if args.iters is not None:
        recipe["schedule"]["max_iters"] = args.iters
    if args.batch is not None:
        data["samples_per_gpu"] = args.batch
    if args.crop is not None:
        data["crop_size"] = list(args.crop)
    if args.workers is not None:
        data["workers_per_gpu"] = args.workers
    if args.amp:
        recipe["amp"] = None if args.amp == "none" else {**(recipe.get("amp") or {}), "dtype": args.amp,
                                                         "loss_scale": (recipe.get("amp") or {}).get("loss_scale", 512.0)}
    for key in ("eval_interval", "checkpoint_interval", "log_interval"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    return recipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="bisenetv2_fcn_4x4_1024x1024_160k_cityscapes",
                   help="recipe name (0.x or 1.x name, or 'synthetic') or a .json path (default: %(default)s)")
    p.add_argument("--work-dir", default=None, help="checkpoints and logs (default work_dirs/<recipe>)")
    p.add_argument("--data-root", help="Cityscapes root (default: the recipe's)")
    p.add_argument("--iters", type=POSITIVE_INT, help="total iterations (the schedule spans them)")
    p.add_argument("--batch", type=int_at_least(MIN_BATCH), help="images per process (samples_per_gpu), at least 2")
    p.add_argument("--crop", type=POSITIVE_INT, nargs=2, metavar=("H", "W"))
    p.add_argument("--workers", type=NON_NEGATIVE_INT, help="DataLoader workers per process")
    p.add_argument("--amp", choices=list(AMP_DTYPES), help="autocast dtype (float16 uses the static loss scale)")
    p.add_argument("--backend", default=None,
                   help="bisenet_fast kernels: auto, eager, cpp, cuda, triton (default: BISENET_FAST_BACKEND, else auto)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", default=None, help="a checkpoint path, or 'auto' for work_dir's last one")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="torch CPU threads per process (default: cores / processes on this machine, less the "
                        "loader workers when training on the CPU; use 1 on a machine busy with other work)")
    p.add_argument("--recompute", action="store_true",
                   help="keep fewer activations: the GE expansion convs' and the detail branch's outputs are "
                        "rebuilt in backward (use_fused_ge_training + use_recomputing_detail_branch)")
    p.add_argument("--channels-last", action="store_true",
                   help="train in NHWC (model and batches): the layout of tensor-core convolutions on GPUs")
    p.add_argument("--deterministic", action="store_true", help="cudnn deterministic, no cudnn benchmark")
    p.add_argument("--stop-after", type=POSITIVE_INT, default=None,
                   help="checkpoint and stop after this iteration (the schedule still spans --iters)")
    p.add_argument("--eval-interval", type=NON_NEGATIVE_INT, default=None, help="0 disables evaluation during training")
    p.add_argument("--checkpoint-interval", type=POSITIVE_INT, default=None)
    p.add_argument("--log-interval", type=POSITIVE_INT, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    recipe = apply_overrides(load_recipe(args.recipe), args)
    work_dir = args.work_dir or os.path.join("work_dirs", recipe["name"])
    finished = False
    try:
        result = train(recipe, work_dir, resume=args.resume, device=args.device, backend=args.backend,
                       seed=args.seed, stop_after=args.stop_after, deterministic=args.deterministic,
                       threads=args.threads, recompute=args.recompute, channels_last=args.channels_last)
        finished = True
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        leave_distributed(ranks_in_step=finished)
    if result["stopped_by"]:
        return 128 + signal.Signals[result["stopped_by"]].value
    return 0


if __name__ == "__main__":
    sys.exit(main())
