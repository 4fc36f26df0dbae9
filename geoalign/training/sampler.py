"""StepSampler: the data order as a pure function of (seed, epoch, global step, global batch size).

Each optimizer step takes the next ``global_batch_size`` indices of a seeded per-epoch permutation and splits them
over accumulation micro-batches and ranks. Resuming at step s just starts there: no data is replayed or skipped,
and changing the number of GPUs (same global batch) keeps the same samples in every step.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch


class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches (lists of dataset indices) for optimizer steps ``start_step`` .. ``total``.

    Step s uses indices ``perm_e[(s % S) * GB : (s % S + 1) * GB]`` of epoch e = s // S, where ``perm_e`` is a
    permutation of the dataset seeded with (seed, e), wrapped around to fill the last global batch; micro-batch m
    of rank r takes the slice ``[(m * world + r) * B : (m * world + r + 1) * B]`` of it.
    """

    def __init__(self, n: int, *, global_batch: int, per_device: int, world: int, rank: int, seed: int,
                 start_step: int, total_steps: int, shuffle: bool = True):
        self.n, self.gb, self.b, self.world, self.rank = n, global_batch, per_device, world, rank
        self.seed, self.start, self.total, self.shuffle = seed, start_step, total_steps, shuffle
        self.ga = global_batch // (per_device * world)
        self.steps_per_epoch = math.ceil(n / global_batch)

    def _perm(self, epoch: int) -> list[int]:
        if not self.shuffle:
            base = list(range(self.n))
        else:
            g = torch.Generator().manual_seed(int(self.seed) * 1000003 + epoch)
            base = torch.randperm(self.n, generator=g).tolist()
        need = self.steps_per_epoch * self.gb
        return (base * (need // self.n + 1))[:need]

    def step_indices(self, step: int) -> list[list[int]]:
        epoch, s = divmod(step, self.steps_per_epoch)
        chunk = self._perm(epoch)[s * self.gb:(s + 1) * self.gb]
        return [chunk[(m * self.world + self.rank) * self.b:(m * self.world + self.rank + 1) * self.b]
                for m in range(self.ga)]

    def __iter__(self) -> Iterator[list[int]]:
        cache: tuple[int, list[int]] | None = None
        for step in range(self.start, self.total):
            epoch, s = divmod(step, self.steps_per_epoch)
            if cache is None or cache[0] != epoch:
                cache = (epoch, self._perm(epoch))
            chunk = cache[1][s * self.gb:(s + 1) * self.gb]
            for m in range(self.ga):
                lo = (m * self.world + self.rank) * self.b
                yield chunk[lo:lo + self.b]

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.ga
