"""Training-loader throughput (decode + spec §7 pipeline + collate) per DataLoader worker.

Writes a few synthetic scenes at Cityscapes' 1024x2048 (quick: 256x512 with the recipe scaled
by 1/4) to a temporary folder and times the recipe's loader with 0, 1 and 2 workers. "ms" is
the time per sample; "samples_per_s_per_worker" divides the throughput by the workers (the
main process counts as one worker for num_workers=0).

    python -m benchmarks.bench_loader [--quick] [--out out.json]
"""
from __future__ import annotations

import itertools
import sys
import tempfile
import time

import torch

from bisenet_fast.data.cityscapes import CityscapesDataset
from bisenet_fast.data.sampler import InfiniteShardedSampler
from bisenet_fast.data.synthetic import generate
from bisenet_fast.data.transforms import TrainPipeline
from benchmarks.run import main as cli
from benchmarks.timing import device_name


def loader_rate(dataset, workers: int, batch: int, batches: int) -> float:
    """Samples per second once the workers are running (the first batch is not timed)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=InfiniteShardedSampler(len(dataset)),
                                         num_workers=workers, drop_last=True)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batches * batch / (time.perf_counter() - start)


def run(device: str = "cpu", quick: bool = True):
    height, width = (256, 512) if quick else (1024, 2048)
    factor = width / 2048
    pipeline = TrainPipeline(img_scale=(width, height), crop_size=(int(1024 * factor), int(1024 * factor)))
    batch, batches = 4, (4 if quick else 8)
    with tempfile.TemporaryDirectory() as root:
        generate(root, num_train=8, num_val=0, height=height, width=width)
        dataset = CityscapesDataset(root, "train", pipeline)
        for workers in (0, 1, 2):
            rate = loader_rate(dataset, workers, batch, batches)
            yield {  # CPU work whatever --device says: the row names the CPU it ran on
                "op": "train_loader", "runs_on": device_name("cpu"), "case": f"{height}x{width} crop {pipeline.crop_size[0]}", "impl": f"workers={workers}",
                "dtype": "uint8->float32", "shape": [batch, 3, *pipeline.crop_size], "ms": 1000 / rate,
                "ms_min": None, "peak_extra_mb": None, "speedup_vs_eager": None,
                "samples_per_s": rate, "samples_per_s_per_worker": rate / max(1, workers),
            }


if __name__ == "__main__":
    sys.exit(cli(module="bench_loader"))
