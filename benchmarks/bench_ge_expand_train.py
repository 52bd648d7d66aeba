"""GE expansion convs in training (grouped 3x3 conv -> BN with batch statistics -> [ReLU]):
forward + backward of the fused op (bisenet_fast.ops.ge_expand_train, via
FusedExpandConvModule) against the eager ConvModule, per distinct expansion conv of
BiSeNetV2, and the whole segmentor's training step with use_fused_ge_training() on ("triton
GE"/"cpp GE") vs off ("eager GE"), every other op on backend auto in both.

Besides time and peak memory, rows report "saved_mb": the bytes autograd keeps for
backward (distinct storages, counted with saved_tensors_hooks).
That is the memory the fused op saves.
Per conv it includes the output (kept by the ReLU); inside the network the next layer keeps
that tensor anyway, so the model rows show the real saving.

Shapes: the training setting, N=4 at 1024x1024 (GE inputs at 1/4..1/32), on GPU; on the CPU
N=2 at 512x512 (quick: 256x256); whole model on the CPU at N=2, 256x256 (quick: 128x128).

    python -m benchmarks.bench_ge_expand_train [--device cuda] [--quick] [--out out.json]
"""
from __future__ import annotations

import copy
import sys

import torch

from benchmarks.run import main as cli
from benchmarks.timing import accuracy, measure, saved_activation_mb, speedups
from bisenet_fast.models import BiSeNetV2Segmentor, use_fused_ge_training
from bisenet_fast.models.conv_module import ConvModule
from bisenet_fast.models.fused_training import FusedExpandConvModule

# (cin, ratio, stride, relu, input size as a fraction of the image) of every distinct
# expansion conv: the 6x grouped conv of each GE layer, and the stride-2 layers' depthwise
# conv on the expanded tensor.
CONVS = [
    (16, 6, 2, False, 4), (96, 1, 1, True, 8), (32, 6, 1, True, 8), (32, 6, 2, False, 8), (192, 1, 1, True, 16),
    (64, 6, 1, True, 16), (64, 6, 2, False, 16), (384, 1, 1, True, 32), (128, 6, 1, True, 32),
]


def _row(op, case, impl, dtype, shape, timing, base, saved):
    return {
        "op": op, "case": case, "impl": impl, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape),
        "ms": timing["ms"], "ms_min": timing["ms_min"], "peak_extra_mb": timing["peak_extra_mb"],
        **speedups(base, timing), **accuracy(base, timing, dtype), "saved_mb": saved,
    }


def _conv_rows(device, gpu, quick, batch, image, repeats):
    fused_impl = "triton" if gpu else "cpp"
    for cin, ratio, stride, relu, frac in CONVS:
        size = image // frac
        eager = ConvModule(cin, cin * ratio, 3, stride, groups=cin, act=relu).to(device).train()
        fused = FusedExpandConvModule(copy.deepcopy(eager))
        x = torch.randn(batch, cin, size, size, device=device).relu().requires_grad_()
        grad = torch.randn(eager(x).shape, device=device)
        # No torch.compile rows: nine separate fwd+bwd compilations would blow the ~90 s budget.
        candidates = [("eager", eager), (fused_impl, fused)]
        base = None
        for impl, module in candidates:
            def step(module=module):
                out = module(x)
                out.backward(grad)
                grad_x, x.grad = x.grad, None  # else every call after the first adds into the old one
                module.zero_grad(set_to_none=True)
                return out, grad_x  # for the row's output check

            timing = measure(step, device, warmup=2 if quick else 5, repeats=repeats)
            base = base or timing
            saved = saved_activation_mb(lambda module=module: module(x), exclude=[*module.state_dict().values(), x])
            yield _row("ge_expand_train", f"{cin}x{ratio} s{stride}{' relu' if relu else ''}", impl,
                       torch.float32, x.shape, timing, base, saved)


def _model_rows(device, gpu, quick, batch, image, repeats):
    torch.manual_seed(0)
    eager = BiSeNetV2Segmentor(num_classes=19, ohem=True).to(device).train()
    fused = use_fused_ge_training(copy.deepcopy(eager))
    x = torch.randn(batch, 3, image, image, device=device)
    target = torch.randint(0, 19, (batch, image, image), device=device)
    autocast = [False, True] if gpu else [False]
    for amp in autocast:
        base = None
        # The two differ in the GE expansion convs only: every other op runs on backend auto.
        for impl, model in (("eager GE", eager), (f"{'triton' if gpu else 'cpp'} GE", fused)):
            def forward(model=model):
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    return sum(model.loss(x, target).values())

            def step(forward=forward, model=model):
                torch.manual_seed(0)  # the heads' dropout masks, the same in every impl's checked step
                loss = forward()
                loss.backward()
                grads = [p.grad for p in model.parameters()]
                model.zero_grad(set_to_none=True)
                return loss.detach(), grads  # for the row's output check

            timing = measure(step, device, warmup=1 if quick else 3, repeats=max(3, repeats // 2))
            base = base or timing
            saved = saved_activation_mb(forward, exclude=[*model.state_dict().values(), x, target])
            yield _row("train_step_ge_fused", "segmentor loss+backward (OHEM), other ops auto", impl,
                       torch.float16 if amp else torch.float32, x.shape, timing, base, saved)


def run(device: str, quick: bool):
    device = torch.device(device)
    gpu = device.type == "cuda"
    if gpu:
        batch, image, model_image, repeats = (2, 512, 512, 10) if quick else (4, 1024, 1024, 20)
    else:
        batch, image, model_image, repeats = (2, 256, 128, 3) if quick else (2, 512, 256, 5)
    yield from _conv_rows(device, gpu, quick, batch, image, repeats)
    yield from _model_rows(device, gpu, quick, batch, model_image, repeats)


if __name__ == "__main__":
    sys.exit(cli(module="bench_ge_expand_train"))
