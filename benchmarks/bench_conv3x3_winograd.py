"""Each dense 3x3 stride-1 conv of BiSeNetV2's inference form that model.fuse() runs as the
Winograd op on the CPU (32+ channels in and out), with its folded bias and ReLU, in both
tile sizes: F(4x4, 3x3), the one the model uses, and F(2x2, 3x3).

impls: eager (F.conv2d + ReLU, i.e. oneDNN's direct conv, NCHW and channels_last) and cpp
(bisenet_fast.ops.conv3x3_winograd on channels_last, tiles 4 and 2). CPU only: the op has no GPU kernel
(cuDNN runs these convs on a GPU); on a GPU this module reports no rows.

    python -m benchmarks.bench_conv3x3_winograd [--quick] [--out out.json]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks.run import main as cli
from benchmarks.timing import measure, result_row
from bisenet_fast import ops

# (where, cin, cout, size as a fraction of the image, how many such convs in the model)
CONVS = [
    ("detail stage 1", 64, 64, 2, 1),
    ("detail stage 2", 64, 64, 4, 2),
    ("detail stage 3 / BGA conv", 128, 128, 8, 3),
    ("decode head", 128, 1024, 8, 1),
    ("GE conv1 (32)", 32, 32, 8, 2),
    ("GE conv1 (64)", 64, 64, 16, 2),
    ("GE conv1 (128) / CE / BGA", 128, 128, 32, 5),
]
CPU_IMAGE = (512, 1024)  # the CPU whole-model target's setting
QUICK_IMAGE = (128, 256)


def run(device: str, quick: bool):
    if torch.device(device).type != "cpu":
        return
    image = QUICK_IMAGE if quick else CPU_IMAGE
    repeats = 5 if quick else 20
    gen = torch.Generator().manual_seed(0)
    for where, cin, cout, frac, count in CONVS:
        h, w = image[0] // frac, image[1] // frac
        x = torch.randn(1, cin, h, w, generator=gen)
        weight = torch.randn(cout, cin, 3, 3, generator=gen) * (9 * cin) ** -0.5
        bias = torch.randn(cout, generator=gen) * 0.1
        x_cl = x.contiguous(memory_format=torch.channels_last)
        weight_cl = weight.contiguous(memory_format=torch.channels_last)
        packed = {tile: ops.winograd_weight(weight, tile) for tile in (4, 2)}
        candidates = [
            ("eager", "NCHW", lambda: F.relu_(F.conv2d(x, weight, bias, padding=1))),
            ("eager", "channels_last", lambda: F.relu_(F.conv2d(x_cl, weight_cl, bias, padding=1))),
            ("cpp", "F(4x4) channels_last", lambda: ops.conv3x3_winograd(x_cl, packed[4], bias, relu=True)),
            ("cpp", "F(2x2) channels_last", lambda: ops.conv3x3_winograd(x_cl, packed[2], bias, relu=True)),
        ]
        eager = None
        for impl, layout, fn in candidates:
            with torch.inference_mode():
                timing = measure(fn, device, warmup=2 if quick else 5, repeats=repeats)
            eager = eager or timing
            row = result_row("conv3x3_winograd", f"{where}: {cin}->{cout} x{count}, {layout}", impl, torch.float32,
                             [1, cin, h, w], timing, eager)
            row["gflops"] = 2 * h * w * cin * cout * 9 / timing["ms"] / 1e6  # direct-conv FLOPs per second
            yield row


if __name__ == "__main__":
    sys.exit(cli(module="bench_conv3x3_winograd"))
