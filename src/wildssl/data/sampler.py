"""Which dataset images each training step reads: a pure function of ``(seed, step)``.

Because a step's batch depends on nothing but the seed and the step number, the data position of a run
is its step count, and resuming from a checkpoint reproduces an unbroken run exactly.

Seeds of different purposes (epoch permutations, views, streams) are mixed with the primes below, so
that two purposes never draw from the same generator state. They are named once, here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler

from wildssl.errors import ConfigError

# Distinct primes: seed * SEED_STRIDE + epoch (permutations); + step * STEP_STRIDE + rank * RANK_STRIDE
# (views; shard groups of a streamed source use the group in place of the step); seed + STREAM_STRIDE *
# stream (one sampler per data stream); seed + PARTNER_OFFSET (partners).
SEED_STRIDE = 1_000_003
STEP_STRIDE = 7919
RANK_STRIDE = 104_729
STREAM_STRIDE = 7919
# Offset of the seed of the draws that choose positive-pair partners (AdaSim), a purpose of its own.
PARTNER_OFFSET = 15_485_863
_SEED_MODULUS = 2**63 - 1

# A hook through which a method chooses what a step reads (AdaSim adds each image's sampled neighbour):
# (step, this rank's dataset indices) -> the indices to load. It must be a pure function of the step and
# the method's state as of the start of the step's epoch.
IndexHook = Callable[[int, list[int]], list[int]]


def view_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the generator that draws a step's views on one rank."""
    return (seed * SEED_STRIDE + step * STEP_STRIDE + rank * RANK_STRIDE) % _SEED_MODULUS


def partner_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the generator that draws a step's positive-pair partners on one rank (an index hook)."""
    return view_seed(seed + PARTNER_OFFSET, step, rank)
def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of an epoch's permutation (of dataset indices, or of a streamed source's shards)."""
    return seed * SEED_STRIDE + epoch


def shard_group_seed(seed: int, epoch: int, rank: int, group: int) -> int:
    """Seed of the shuffle of one group of shards that one rank streams in an epoch."""
    return (epoch_seed(seed, epoch) + group * STEP_STRIDE + rank * RANK_STRIDE) % _SEED_MODULUS


def stream_seed(seed: int, stream_index: int) -> int:
    """Seed of the batch sampler of a method's ``stream_index``-th data stream."""
    return seed + STREAM_STRIDE * stream_index


def check_batch_fits(dataset_size: int, global_batch: int, key: str = "train.batch_size") -> None:
    """A one-line ConfigError naming ``key`` when one step's batch holds more images than the data source."""
    if dataset_size < global_batch:
        raise ConfigError(f"{key}={global_batch} is larger than the data source ({dataset_size} images); lower the "
                          "batch size or add data")


class StepBatchSampler(Sampler):
    """Yields this rank's dataset indices for steps ``start_step .. stop_step - 1``.

    Step s of epoch e = s // steps_per_epoch takes the slice ``[pos * B, (pos + 1) * B)`` of a
    permutation seeded by ``(seed, e)``; rank r keeps its contiguous share of that global batch, so the
    indices are global dataset indices, the same on every rank. ``index_hook`` (optional) may replace a
    step's indices (see :data:`IndexHook`).
    """

    def __init__(self, dataset_size: int, global_batch: int, total_steps: int, start_step: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, stop_step: int | None = None,
                 index_hook: IndexHook | None = None):
        if global_batch % world_size:
            raise ConfigError(f"train.batch_size={global_batch} is not divisible by the world size "
                              f"{world_size}")
        check_batch_fits(dataset_size, global_batch)
        self.steps_per_epoch = dataset_size // global_batch
        self.dataset_size, self.global_batch = dataset_size, global_batch
        self.total_steps, self.start_step = total_steps, start_step
        self.stop_step = total_steps if stop_step is None else min(stop_step, total_steps)
        self.seed, self.rank, self.local_batch = seed, rank, global_batch // world_size
        self.index_hook = index_hook

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def indices(self, step: int, order: torch.Tensor) -> list[int]:
        position = step % self.steps_per_epoch
        start = position * self.global_batch + self.rank * self.local_batch
        return order[start: start + self.local_batch].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = -1, None
        for step in range(self.start_step, self.stop_step):
            step_epoch = step // self.steps_per_epoch
            if step_epoch != epoch:
                epoch, order = step_epoch, self.permutation(step_epoch)
            indices = self.indices(step, order)
            yield indices if self.index_hook is None else self.index_hook(step, indices)

    def __len__(self) -> int:
        return self.stop_step - self.start_step
