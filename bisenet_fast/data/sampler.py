"""An endless, rank-sharded, resumable sampler whose items carry their augmentation seed.

Epoch e is a permutation of the dataset drawn from (seed, e), padded to a multiple of the
world size by repeating its head (as DistributedSampler does) and dealt round-robin to the
ranks. Each item is (index, sample_seed) with sample_seed derived from (seed, epoch,
position): a sample's augmentation therefore depends only on where it sits in the stream,
not on the DataLoader worker that builds it, and `start` (samples already consumed by this
rank) restarts the stream exactly where a checkpoint left it.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class InfiniteShardedSampler(Sampler):
    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 start: int = 0):
        if size < 1:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.shuffle, self.start = seed, shuffle, start
        self.per_rank = math.ceil(size / world_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.size))
        # Padded to a multiple of world_size by repeating the order (as torch's DistributedSampler
        # does; more than once when the dataset is smaller than the padding).
        total = self.per_rank * self.world_size
        padded = (order * math.ceil(total / self.size))[:total]
        return padded[self.rank :: self.world_size]

    def sample_seed(self, epoch: int, position: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, position, self.rank]).generate_state(1)[0])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, position = divmod(self.start, self.per_rank)
        while True:
            indices = self.epoch_indices(epoch)
            for pos in range(position, self.per_rank):
                yield indices[pos], self.sample_seed(epoch, pos)
            epoch, position = epoch + 1, 0
