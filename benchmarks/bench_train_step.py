"""One training step of the published recipes: fused kernels (backend auto) vs the eager model.

A step is forward of the five heads, their losses, backward and the SGD step, on a fixed
batch (data loading excluded: see bench_loader). Implementations per recipe (IMPLS):
  eager                     backend 'eager'
  <backend>                 backend 'auto' (the fused kernels)
  <backend>+ge_train        plus the recomputing GE expansion (use_fused_ge_training)
  <backend>+recompute       plus the recomputing detail branch too (train --recompute)
  eager+cl, <backend>+recompute+cl
                            eager and <backend>+recompute in channels_last (train --channels-last)

Memory, two numbers:
  saved_mb       activations autograd holds for backward after forward+loss
                 (timing.saved_activation_mb; parameters, buffers and the batch excluded);
                 measured on every device from one extra forward.
  peak_extra_mb  torch.cuda.max_memory_allocated over the timed steps on GPU; on CPU the
                 allocator's peak during one more step (timing.cpu_peak_extra_mb; quick
                 runs only).

Each row's first step (same weights, batch and dropout masks in every impl) is checked
against eager's: its loss and all the parameters' gradients (timing.output_check).

Shapes: quick, 2 x 128 x 128. Full, the 4x4 recipes' per-GPU batch, 4 x 1024 x 1024: on GPU
the plain fp32, OHEM and float16-autocast (static loss scale) recipes and OHEM under that
float16 autocast, timed after warm-up;
on CPU only the OHEM recipe in fp32, timed as one step without warm-up (a step takes tens of
seconds there and needs ~10 GB; the number that matters there is saved_mb).

    python -m benchmarks.bench_train_step [--device cuda] [--quick] [--out rows.json]
"""
from __future__ import annotations

import sys

import torch

import bisenet_fast as bf
from benchmarks.run import main as cli
from benchmarks.timing import accuracy, measure, saved_activation_mb, speedups
from bisenet_fast.configs import load_recipe
from bisenet_fast.models import use_fused_ge_training, use_recomputing_detail_branch
from bisenet_fast.train import LOSS_KEYS, build_optimizer

RECIPES = {
    "4x4 fp32": "bisenetv2_fcn_4x4_1024x1024_160k_cityscapes",
    "4x4 ohem": "bisenetv2_fcn_ohem_4x4_1024x1024_160k_cityscapes",
    "4x4 fp16": "bisenetv2_fcn_fp16_4x4_1024x1024_160k_cityscapes",
    "4x4 ohem fp16": "bisenetv2_fcn_ohem_4x4_1024x1024_160k_cityscapes",
}
# Not a published recipe, but the training step that issue #5's target names: the OHEM
# recipe under the fp16 recipe's AMP (float16 autocast, static loss scale 512).
AMP_OVERRIDES = {"4x4 ohem fp16": "bisenetv2_fcn_fp16_4x4_1024x1024_160k_cityscapes"}
QUICK_SHAPE = (2, 128)  # batch, crop size
FULL_SHAPE = (4, 1024)

# impl label -> (backend, model transforms applied after construction, channels_last)
RECOMPUTE = (use_fused_ge_training, use_recomputing_detail_branch)
IMPLS = {
    "eager": ("eager", (), False),
    "fused": ("auto", (), False),
    "fused+ge_train": ("auto", (use_fused_ge_training,), False),
    "fused+recompute": ("auto", RECOMPUTE, False),
    "eager+cl": ("eager", (), True),
    "fused+recompute+cl": ("auto", RECOMPUTE, True),
}


class TrainStep:
    """A model, its optimizer and a fixed batch; step() is one full training step."""

    def __init__(self, recipe: dict, device: torch.device, batch: int, size: int, transforms=(),
                 channels_last: bool = False):
        torch.manual_seed(0)
        self.model = bf.BiSeNetV2Segmentor(**recipe["model"]).to(device).train()
        for transform in transforms:
            transform(self.model)
        image_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=image_format)
        self.opt = build_optimizer(self.model, recipe)
        self.device_type = device.type
        amp = recipe.get("amp") or {}
        self.amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(amp.get("dtype"))
        self.scaler = torch.amp.GradScaler(device.type, init_scale=512.0, enabled=self.amp_dtype is torch.float16)
        self.x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=image_format)
        self.y = torch.randint(0, 19, (batch, size, size), device=device)
        self.y[:, :, -size // 8 :] = 255  # some padding / ignored pixels, as after RandomCrop + Pad

    def forward_loss(self) -> torch.Tensor:
        """The scaled sum of the five heads' losses, with its autograd graph."""
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses = self.model.loss(self.x, self.y)
        return self.scaler.scale(sum(losses[k] for k in LOSS_KEYS))

    def step(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step; returns its (scaled) loss and the parameters' gradients, which the first
        step of every impl computes from the same weights, batch and dropout masks (the seed
        is reset each step): the rows' output check."""
        torch.manual_seed(0)
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward_loss()
        loss.backward()
        grads = [p.grad for p in self.model.parameters()]
        self.scaler.step(self.opt)
        if self.scaler.is_enabled():
            self.scaler.update(512.0)
        return loss.detach(), grads

    def saved_mb(self) -> float:
        """Activation memory held for backward by one forward+loss (not the model's own tensors)."""
        resident = [*self.model.parameters(), *self.model.buffers(), self.x, self.y]
        return saved_activation_mb(self.forward_loss, exclude=resident)


def run(device: str = "cpu", quick: bool = True):
    dev = torch.device(device)
    batch, size = QUICK_SHAPE if quick else FULL_SHAPE
    on_cpu = dev.type == "cpu"
    if on_cpu:
        cases = ["4x4 fp32", "4x4 ohem"] if quick else ["4x4 ohem"]
        warmup, repeats = (2, 3) if quick else (0, 1)
    else:
        cases = list(RECIPES)
        warmup, repeats = (2, 3) if quick else (2, 10)
    fused_backend = bf.backends.resolve("ohem_cross_entropy", dev)
    for case in cases:
        recipe = load_recipe(RECIPES[case])
        if case in AMP_OVERRIDES:
            recipe = {**recipe, "amp": load_recipe(AMP_OVERRIDES[case])["amp"]}
        dtype = (recipe.get("amp") or {}).get("dtype", "float32")
        eager = None
        for impl, (backend, transforms, channels_last) in IMPLS.items():
            with bf.backends.use(backend):
                train_step = TrainStep(recipe, dev, batch, size, transforms, channels_last)
                saved_mb = train_step.saved_mb()
                # A whole step. The full CPU run takes no second step for the peak memory: a
                # step takes tens of seconds there, and saved_mb is that run's number.
                t = measure(train_step.step, dev, warmup=warmup, repeats=repeats, top_kernels=15,
                            cpu_peak_memory=quick)
            del train_step
            eager = eager or t
            yield {
                "op": "train_step", "case": case, "impl": impl.replace("fused", fused_backend),
                "dtype": dtype, "shape": [batch, 3, size, size],
                "ms": t["ms"], "ms_min": t["ms_min"], "repeats": repeats, "saved_mb": saved_mb,
                "peak_extra_mb": t["peak_extra_mb"], **speedups(eager, t),
                **accuracy(eager, t, getattr(torch, dtype)),
            }


if __name__ == "__main__":
    sys.exit(cli(module="bench_train_step"))
