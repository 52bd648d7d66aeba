"""mIoU evaluation (spec §5, §9): single-scale whole-image or ms+flip, on one or many GPUs.

    python -m bisenet_fast.evaluate --recipe bisenetv2_fcn_4x4_1024x1024_160k_cityscapes \\
        --checkpoint bisenetv2_fcn_4x4_1024x1024_160k_cityscapes_20210902_015551-bcf10f09.pth \\
        --data-root data/cityscapes [--aug-test] [--amp float16]
    torchrun --nproc_per_node 4 -m bisenet_fast.evaluate ...   # images sharded, histograms all_reduced
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping

import torch

import bisenet_fast as bf
from bisenet_fast.cli_args import POSITIVE_INT
from bisenet_fast.checkpoint import read_checkpoint
from bisenet_fast.configs import load_recipe, recipe_names
from bisenet_fast.data.cityscapes import CityscapesDataset, class_names
from bisenet_fast.distributed import DistContext, init_distributed, leave_distributed, usable_cores
from bisenet_fast.inference import predict_probs
from bisenet_fast.metrics import IoUAccumulator, format_table

AMP_DTYPES = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_RECIPE = "bisenetv2_fcn_4x4_1024x1024_160k_cityscapes"


def checkpoint_recipe(checkpoint: Mapping) -> str | None:
    """The bundled recipe that wrote a bisenet_fast training checkpoint (its meta.recipe), else
    None (an official mmseg checkpoint, a bare state_dict, a recipe read from a file)."""
    meta = checkpoint.get("meta") if isinstance(checkpoint, Mapping) else None
    name = meta.get("recipe") if isinstance(meta, Mapping) else None
    return name if isinstance(name, str) and name in recipe_names() else None


def recipe_eval_amp(recipe: dict, device: torch.device) -> str:
    """The autocast dtype ('none', 'float16', 'bfloat16') a recipe evaluates in without --amp:
    on CUDA, the recipe's AMP dtype where it sets eval_autocast (mmseg 0.x tested its fp16
    recipe under float16 autocast); else 'none'. Training's evaluations use it too."""
    amp = recipe.get("amp") or {}
    return amp.get("dtype", "none") if amp.get("eval_autocast") and device.type == "cuda" else "none"


def label_name(dataset, index: int) -> str:
    """The label file of item `index` where the dataset tells it (CityscapesDataset.pairs)."""
    pairs = getattr(dataset, "pairs", None)
    return str(pairs[index][1]) if pairs is not None else f"label of item {index}"


@torch.no_grad()
def evaluate_model(model, dataset, ctx: DistContext, test_cfg: dict, aug_test=False, amp_dtype=None,
                   num_classes=19, limit=None, log=print) -> dict:
    """mIoU over `dataset` (raw uint8 items), this rank taking images rank, rank+world, ...;
    the histograms are summed over ranks. Returns metrics.IoUAccumulator.result()."""
    was_training = model.training
    model.eval()
    try:  # the model goes back to training mode on an error (or Ctrl-C) too
        ratios = tuple(test_cfg["aug_ratios"]) if aug_test else (1.0,)
        flip = bool(test_cfg.get("aug_flip", True)) and aug_test
        acc = IoUAccumulator(num_classes, device=ctx.device)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        start = time.perf_counter()
        for n, i in enumerate(range(ctx.rank, count, ctx.world_size)):
            image, label = dataset[i]
            probs = predict_probs(model, image, tuple(test_cfg["img_scale"]), ratios, flip, amp_dtype)
            try:
                acc.update(probs.argmax(dim=0), label.to(probs.device))
            except ValueError as err:
                raise ValueError(f"{label_name(dataset, i)}: {err} (labelIds not yet converted to trainIds? run "
                                 "python -m bisenet_fast.data.convert <root>)") from err
            if ctx.is_main and log and (n + 1) % 50 == 0:
                log(f"eval {(n + 1) * ctx.world_size}/{count} images, {time.perf_counter() - start:.0f} s")
        acc.all_reduce()
    finally:
        model.train(was_training)
    return acc.result()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None,
                   help="recipe name (0.x or 1.x) or .json path: gives num_classes, the test scales and the "
                        f"default --amp (default: the bundled recipe that trained a bisenet_fast checkpoint, as "
                        f"its meta.recipe says; else {DEFAULT_RECIPE})")
    p.add_argument("--checkpoint", required=True, help="official mmseg .pth or a bisenet_fast training checkpoint")
    p.add_argument("--data-root", help="Cityscapes root (default: the recipe's)")
    p.add_argument("--split", default="val")
    p.add_argument("--aug-test", action="store_true", help="ms+flip: the recipe's ratios, each with a flip")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default=None,
                   help="autocast dtype (default on CUDA: the recipe's AMP dtype where it sets eval_autocast, i.e. "
                        "float16 for the fp16 recipe, as mmseg 0.x did; else none)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", default=None,
                   help="bisenet_fast kernels: auto, eager, cpp, cuda, triton (default: BISENET_FAST_BACKEND, else auto)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="evaluate only the first N images")
    p.add_argument("--fused", action="store_true",
                   help="evaluate the inference form (model.fuse(): BN folded, fused kernels), in the --amp dtype "
                        "instead of under autocast")
    p.add_argument("--autotune", action="store_true",
                   help="with --fused: each GE layer runs the fastest of its implementations per input size, "
                        "timed on that size's first image (model.fuse(autotune=True))")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = init_distributed(args.device)
    checkpoint = read_checkpoint(args.checkpoint)
    written_by = checkpoint_recipe(checkpoint)
    recipe = load_recipe(args.recipe or written_by or DEFAULT_RECIPE)
    if args.recipe and written_by and recipe.get("name") != written_by:
        print(f"evaluate: {args.checkpoint} was trained with recipe {written_by!r}; evaluating with "
              f"{recipe.get('name')!r}'s test settings as --recipe asks", file=sys.stderr)
    if ctx.device.type == "cpu":
        torch.set_num_threads(max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))))
    amp = args.amp if args.amp is not None else recipe_eval_amp(recipe, ctx.device)
    if args.autotune and not args.fused:
        raise SystemExit("evaluate: --autotune tunes the inference form; use it with --fused")
    model = bf.BiSeNetV2Segmentor(num_classes=recipe["model"]["num_classes"])
    bf.load_mmseg_checkpoint(model, checkpoint, strict=True)
    model.to(ctx.device)
    autocast_dtype = AMP_DTYPES[amp]
    if args.fused:
        model, autocast_dtype = model.fuse(dtype=autocast_dtype, autotune=args.autotune), None
    dataset = CityscapesDataset(args.data_root or recipe["data"]["root"], args.split)
    with bf.backends.use_or_current(args.backend):
        result = evaluate_model(model, dataset, ctx, recipe["test"], args.aug_test, autocast_dtype,
                                recipe["model"]["num_classes"], args.limit)
    if ctx.is_main:
        mode = "ms+flip" if args.aug_test else "single-scale"
        precision = f"fused, {amp if amp != 'none' else 'float32'}" if args.fused else f"autocast {amp}"
        precision += ", autotuned" if args.autotune else ""
        print(f"{args.checkpoint} on {args.split} ({mode}, {precision}, {ctx.world_size} process(es)):")
        print(format_table(result, class_names(recipe["model"]["num_classes"])))
    leave_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
