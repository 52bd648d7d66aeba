"""One training step of the published recipes: fused kernels (backend auto) vs the eager model.

A step is forward of the five heads, their losses, backward and the SGD step, on a fixed
batch (data loading excluded: see bench_loader). GPU: the 4x4 recipe's per-GPU batch
(4 x 1024 x 1024), plain fp32, OHEM, and float16 autocast with the static loss scale; peak
memory from torch.cuda.max_memory_allocated. Quick/CPU: 2 x 128 x 128.

    python -m benchmarks.bench_train_step [--device cuda] [--full]
"""
from __future__ import annotations


import sys

import torch

import bisenet_fast as bf
from benchmarks.timing import measure
from bisenet_fast.configs import load_recipe
from bisenet_fast.train import LOSS_KEYS, build_optimizer
from benchmarks.run import main as cli

RECIPES = {
    "4x4 fp32": "bisenetv2_fcn_4x4_1024x1024_160k_cityscapes",
    "4x4 ohem": "bisenetv2_fcn_ohem_4x4_1024x1024_160k_cityscapes",
    "4x4 fp16": "bisenetv2_fcn_fp16_4x4_1024x1024_160k_cityscapes",
}


def make_step(recipe: dict, device: torch.device, batch: int, size: int):
    torch.manual_seed(0)
    model = bf.BiSeNetV2Segmentor(**recipe["model"]).to(device).train()
    opt = build_optimizer(model, recipe)
    amp = recipe.get("amp") or {}
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(amp.get("dtype"))
    scaler = torch.amp.GradScaler(device.type, init_scale=512.0, enabled=dtype is torch.float16)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 19, (batch, size, size), device=device)
    y[:, :, -size // 8 :] = 255  # some padding / ignored pixels, as after RandomCrop + Pad

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(sum(losses[k] for k in LOSS_KEYS)).backward()
        scaler.step(opt)
        if scaler.is_enabled():
            scaler.update(512.0)

    return step


def run(device: str = "cpu", quick: bool = True) -> list[dict]:
    dev = torch.device(device)
    batch, size = (2, 128) if quick or dev.type == "cpu" else (4, 1024)
    cases = ["4x4 fp32"] if dev.type == "cpu" else list(RECIPES)
    rows = []
    for case in cases:
        recipe = load_recipe(RECIPES[case])
        timings = {}
        for impl, backend in (("eager", "eager"), ("fused", "auto")):
            with bf.backends.use(backend):
                step = make_step(recipe, dev, batch, size)
                t = measure(step, dev, warmup=2, repeats=3 if quick else 10)
            timings[impl] = t
            rows.append({
                "op": "train_step", "case": case, "impl": impl if impl == "eager" else bf.backends.resolve(
                    "ohem_cross_entropy", dev), "dtype": (recipe.get("amp") or {}).get("dtype", "float32"),
                "shape": [batch, 3, size, size], "ms": t["ms"], "ms_min": t["ms_min"],
                "peak_extra_mb": t.get("peak_extra_mb"),
                "speedup_vs_eager": timings["eager"]["ms"] / t["ms"],
            })
    return rows


if __name__ == "__main__":
    sys.exit(cli(["--only", "bench_train_step", *sys.argv[1:]]))
