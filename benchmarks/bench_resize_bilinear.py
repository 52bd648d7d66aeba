"""The fused model's final step: the decode head's logits (19 channels, 1/8 of the input)
resized bilinearly to the input size, on the CPU.

impls: eager (F.interpolate on NCHW and on channels_last logits, the layout the fused
model's head produces) and cpp (bisenet_fast.ops.resize_bilinear). CPU only: the op has no
GPU kernel (ATen's upsample runs it on a GPU); on a GPU this module reports no rows. Every
impl returns a fresh output, so each pays the same first-touch page faults.

    python -m benchmarks.bench_resize_bilinear [--quick] [--out out.json]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks.run import main as cli
from benchmarks.timing import measure, result_row
from bisenet_fast import ops

IMAGES = [(512, 1024), (1024, 2048)]
QUICK_IMAGES = [(128, 256)]


def run(device: str, quick: bool):
    if torch.device(device).type != "cpu":
        return
    for h, w in QUICK_IMAGES if quick else IMAGES:
        x = torch.randn(1, 19, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
        x_cl = x.contiguous(memory_format=torch.channels_last)
        candidates = [
            ("eager", "NCHW", lambda: F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)),
            ("eager", "channels_last", lambda: F.interpolate(x_cl, size=(h, w), mode="bilinear", align_corners=False)),
            ("cpp", "channels_last", lambda: ops.resize_bilinear(x_cl, (h, w))),
        ]
        eager = None
        for impl, layout, fn in candidates:
            with torch.inference_mode():
                timing = measure(fn, device, warmup=2, repeats=5 if quick else 20)
            eager = eager or timing
            bytes_moved = (x.numel() + 19 * h * w) * x.element_size()
            yield result_row("resize_bilinear", f"19x{h // 8}x{w // 8} -> {h}x{w}, {layout}", impl,
                             torch.float32, list(x.shape), timing, eager, bytes_moved)


if __name__ == "__main__":
    sys.exit(cli(module="bench_resize_bilinear"))
