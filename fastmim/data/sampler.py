"""Deterministic, resumable, distributed batch order.

Per epoch one global plan is drawn from ``(seed, epoch)`` alone: a permutation of the
dataset and one augmentation seed per image. Global batch ``b`` is
``permutation[b*G:(b+1)*G]`` with ``G = batch_size * world_size``; rank ``r`` takes the
``r``-th slice of ``batch_size``. So the set of images (and their augmented pixels) of each
global batch is the same for any number of processes, a run restarted at
``(epoch, batch)`` replays exactly what it would have seen, and the number of DataLoader
workers changes nothing. The tail that does not fill a global batch is dropped (a
different tail every epoch).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["TrainBatchSampler", "derive_seed"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer ``keys`` (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & 0x7FFFFFFFFFFFFFFF


# The last key of each epoch's plan, derive_seed(seed, epoch, EPOCH_PLAN_SALT): keeps the data
# order's stream apart from the other streams derived from the run seed (the masks', the loader's).
EPOCH_PLAN_SALT = 0x5A3D


class TrainBatchSampler:
    """Yields, for one epoch from batch ``start`` on, lists of ``(index, aug_seed)`` pairs:
    this rank's share of each global batch. Use one per epoch as a DataLoader
    ``batch_sampler`` via :meth:`epoch`."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} images, fewer than one global batch of {global_batch} "
                             f"(batch size {batch_size} x {world_size} process(es))")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(permutation, aug_seeds)`` of ``epoch``: int64 ``(N,)`` each, seeds by image index."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, EPOCH_PLAN_SALT))
        permutation = torch.randperm(self.num_samples, generator=generator)
        aug_seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        return permutation, aug_seeds

    def epoch(self, epoch: int, start: int = 0) -> _EpochBatches:
        if not 0 <= start <= self.batches_per_epoch:
            raise ValueError(f"start must be in [0, {self.batches_per_epoch}], got {start}")
        return _EpochBatches(self, epoch, start)


class _EpochBatches:
    def __init__(self, sampler: TrainBatchSampler, epoch: int, start: int):
        self.sampler = sampler
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.sampler
        permutation, aug_seeds = s.plan(self.epoch)
        global_batch = s.batch_size * s.world_size
        for b in range(self.start, s.batches_per_epoch):
            lo = b * global_batch + s.rank * s.batch_size
            indices = permutation[lo:lo + s.batch_size].tolist()
            yield [(i, int(aug_seeds[i])) for i in indices]
