"""The main job: learn the synthetic street scenes on a CPU in a few minutes.

    python -m bisenet_fast.demo [--out demo_out] [--iters N] [--backend auto] [--threads N]

Generates the synthetic Cityscapes-layout set (if absent), trains the 'synthetic' recipe
(the spec §7 pipeline and loop on small images), evaluates single-scale mIoU on its val
split, prints the per-class IoU table and writes <out>/prediction.png: image, ground truth
and prediction in the Cityscapes palette, one row per val image shown.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import bisenet_fast as bf
from bisenet_fast.cli_args import POSITIVE_INT, SEED
from bisenet_fast.configs import load_recipe
from bisenet_fast.data import synthetic
from bisenet_fast.data.cityscapes import CLASSES, CityscapesDataset
from bisenet_fast.distributed import init_distributed
from bisenet_fast.evaluate import evaluate_model
from bisenet_fast.inference import predict_probs
from bisenet_fast.metrics import format_table
from bisenet_fast.palette import colorize
from bisenet_fast.train import train


def write_predictions(model, dataset, test_cfg: dict, path: Path, count: int = 3) -> Path:
    rows = []
    for i in range(min(count, len(dataset))):
        image, label = dataset[i]
        pred = predict_probs(model, image, tuple(test_cfg["img_scale"])).argmax(dim=0).cpu().numpy().astype(np.uint8)
        rows.append(np.concatenate([image.numpy(), colorize(label.numpy()), colorize(pred)], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="dataset, checkpoints, logs and prediction.png go here")
    p.add_argument("--iters", type=POSITIVE_INT, default=None, help="training iterations (default: the recipe's)")
    p.add_argument("--train-images", type=POSITIVE_INT, default=200)
    p.add_argument("--val-images", type=POSITIVE_INT, default=40)
    p.add_argument("--backend", default=None,
                   help="bisenet_fast kernels: auto, eager, cpp, cuda, triton (default: BISENET_FAST_BACKEND, else auto)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="torch CPU threads (default: the cores less the loader worker; 1 on a busy machine)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    data_root = out / "synthetic"
    if not (data_root / "leftImg8bit" / "val").is_dir():
        print(f"generating {args.train_images} train / {args.val_images} val synthetic scenes in {data_root}")
        synthetic.generate(data_root, args.train_images, args.val_images, seed=args.seed)
    recipe = load_recipe("synthetic")
    recipe["data"]["root"] = str(data_root)
    if args.iters:
        recipe["schedule"]["max_iters"] = args.iters
    recipe["eval_interval"] = 0  # evaluated once below
    recipe["checkpoint_interval"] = recipe["schedule"]["max_iters"]
    work_dir = out / "work"
    start = time.perf_counter()
    result = train(recipe, work_dir, device=args.device, backend=args.backend, seed=args.seed, threads=args.threads)
    train_seconds = time.perf_counter() - start

    ctx = init_distributed(args.device)
    model = bf.BiSeNetV2Segmentor(num_classes=recipe["model"]["num_classes"])
    bf.load_mmseg_checkpoint(model, result["checkpoint"])
    model.to(ctx.device).eval()
    val_set = CityscapesDataset(data_root, "val")
    with bf.backends.use_or_current(args.backend):
        metrics = evaluate_model(model, val_set, ctx, recipe["test"], num_classes=recipe["model"]["num_classes"])
        picture = write_predictions(model, val_set, recipe["test"], out / "prediction.png")
    print(format_table(metrics, CLASSES))
    print(f"trained {result['iteration']} iterations in {train_seconds:.0f} s on {ctx.device} "
          f"({torch.get_num_threads()} threads); val mIoU {metrics['mIoU']:.2f}; prediction image {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
