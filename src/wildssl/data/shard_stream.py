"""Tar shards streamed for web-scale training: split over ranks and workers, shuffled, resumable mid-epoch.

The map-style :class:`~wildssl.data.shards.TarShards` indexes every member of every shard when it is
built and keeps that index in every process; fine for a few hundred thousand images, not for billions.
:class:`ShardStream` indexes a shard only when a rank is about to read it, and holds the index of one
group of shards at a time.

Order of one rank's samples (a pure function of the seed, the rank and the world size):

1. **Epoch e**: the shards are permuted with a generator seeded by ``(seed, e)``; rank r takes every
   world-th shard of that permutation, ``perm[r::world]``. The ranks' shard sets are disjoint and cover
   every shard: each sample is read by exactly one rank per epoch.
2. **Shuffle buffer**: the rank's shards are taken in groups of ``shuffle_shards``; the samples of a group
   are permuted together (generator seeded by ``(seed, e, r, group)``), so the buffer holds the index of
   ``shuffle_shards`` shards (tens of bytes per sample), never their images. Samples are then read by
   seeking to their members, as the map-style source does.
3. The rank's stream is its epochs one after another: a step's batch may start in one group (or epoch)
   and end in the next, and ranks with fewer samples start their next epoch a little earlier.

**Workers**: the rank's stream is the same whatever the number of DataLoader workers. Batch b of the
stream is decoded by worker ``b % num_workers`` (the order in which a DataLoader collects batches from
its workers); every worker walks the group indexes, but reads and decodes only its own batches' images.

**Position**: every batch carries ``position = [epoch, group, offset]``, where the rank's next sample
lies. The engine keeps the position of the last batch a step consumed and saves every rank's in the
checkpoint; a resumed run starts each rank there, so a run killed mid-epoch continues at the next unseen
sample, with the same order and bit-identical weights on the CPU. Starting at a position costs the index
of one group, not a replay of the epoch. Resuming needs the same world size (the split depends on it);
the number of workers may change.

An unreadable image is replaced by the next readable sample of its group and recorded in ``corrupt``, as
the map-style sources do. ``index`` of a streamed sample is ``shard * 2**32 + ordinal`` (its position
among its shard's samples).

Why not the ``webdataset`` package: its shuffle buffer and its split over nodes and workers do not give a
position to resume from (a restarted pipeline begins its shards again), it cannot tell that two ranks
read disjoint samples once an epoch's shard count does not divide evenly, and its decoders would bypass
the decoding that bounds memory on hostile files (:mod:`wildssl.data.decode`). The layout it reads
(img2dataset's ``key.jpg`` + ``key.txt`` + ``key.json`` + optional ``key.cls``) is read here the same way.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from wildssl.data.decode import DECODE_ERRORS, DEFAULT_MAX_PIXELS, check_load_size, check_max_pixels, decode_image, \
    warn_unreadable
from wildssl.data.sample import DEFAULT_LOAD_SIZE, collate, make_sample
from wildssl.data.sampler import epoch_seed, shard_group_seed
from wildssl.data.shards import ShardFiles, TarSample, index_shard, sample_annotations, shard_paths
from wildssl.errors import ConfigError, DataError

STREAM_PREFIX = "stream:"
# Tar shard patterns naming more shards than this are streamed in training even without ``stream:``: at
# img2dataset's 10,000 images per shard the map-style index of 64 shards is already ~100 MB per process.
MAP_STYLE_MAX_SHARDS = 64
DEFAULT_SHUFFLE_SHARDS = 8  # data.shuffle_shards
SHARD_ID_STRIDE = 2**32  # index = shard * SHARD_ID_STRIDE + ordinal


class StreamPosition(NamedTuple):
    """Where a rank's next sample lies: ``offset`` into the shuffled ``group`` of ``epoch``."""

    epoch: int
    group: int
    offset: int


START = StreamPosition(0, 0, 0)


class _Reference(NamedTuple):
    sample: TarSample
    ordinal: int  # position among its shard's samples

    @property
    def index(self) -> int:
        return self.sample.shard * SHARD_ID_STRIDE + self.ordinal


def _stats_count(path: Path) -> int | None:
    """The sample count img2dataset wrote beside a shard (``<name>_stats.json``: ``successes``), or None."""
    stats = path.with_name(path.name[: -len(".tar")] + "_stats.json") if path.name.endswith(".tar") else None
    if stats is None or not stats.is_file():
        return None
    try:
        count = json.loads(stats.read_text()).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


class ShardStream:
    """Tar shards in WebDataset layout, streamed (see the module docstring).

    ``pattern``: a tar file, a folder of ``*.tar``, a glob or a brace pattern (as
    :class:`~wildssl.data.shards.TarShards`). ``shuffle_shards``: shards per shuffle group
    (``data.shuffle_shards``). ``len()`` is the number of samples, from img2dataset's ``_stats.json`` files
    where every shard has one, otherwise from reading every shard's tar headers once (here, at
    construction); it sets the length of an epoch in steps.
    """

    streaming = True
    classes = None

    def __init__(self, pattern: str | os.PathLike, load_size: int = DEFAULT_LOAD_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS, shuffle_shards: int = DEFAULT_SHUFFLE_SHARDS) -> None:
        if isinstance(shuffle_shards, bool) or not isinstance(shuffle_shards, int) or shuffle_shards < 1:
            raise ConfigError(f"data.shuffle_shards={shuffle_shards!r} must be a positive number of shards")
        self.load_size = check_load_size(load_size)
        self.max_pixels = check_max_pixels(max_pixels)
        self.pattern = os.fspath(pattern)
        self.shards = shard_paths(pattern)
        self.shuffle_shards = shuffle_shards
        counts = [_stats_count(path) for path in self.shards]
        self.counted_from = "img2dataset stats" if all(c is not None for c in counts) else "tar headers"
        if self.counted_from == "tar headers":
            counts = [len(index_shard(path, shard).samples) for shard, path in enumerate(self.shards)]
        self.counts = counts
        if not sum(counts):
            raise DataError(f"no images in tar shards {self.pattern} ({len(self.shards)} shards, no key with an image)")
        self.files = ShardFiles(self.shards)
        self._permutation: tuple[int, int, list[int]] | None = None  # (seed, epoch, shard order), cached

    def __len__(self) -> int:
        return sum(self.counts)

    def class_labels(self) -> list[int] | None:
        return None  # unknown without reading every shard: evaluation opens the map-style source instead

    def describe(self) -> str:
        return (f"streamed tar shards {self.pattern}: {len(self)} samples ({self.counted_from}) in "
                f"{len(self.shards)} shards, shuffled {self.shuffle_shards} shards at a time")

    # -- order --------------------------------------------------------------------------------------
    def rank_shards(self, seed: int, epoch: int, rank: int, world: int) -> list[int]:
        """The shards rank ``rank`` of ``world`` reads in ``epoch``, in reading order."""
        if self._permutation is None or self._permutation[:2] != (seed, epoch):
            generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            self._permutation = (seed, epoch, torch.randperm(len(self.shards), generator=generator).tolist())
        return self._permutation[2][rank::world]

    def group(self, seed: int, epoch: int, rank: int, world: int, group: int) -> list[_Reference] | None:
        """The shuffled samples of one group of the rank's shards in ``epoch``; None past its last group."""
        shards = self.rank_shards(seed, epoch, rank, world)[group * self.shuffle_shards: (group + 1) * self.shuffle_shards]
        if not shards:
            return None
        references = [_Reference(sample, ordinal) for shard in shards
                      for ordinal, sample in enumerate(index_shard(self.shards[shard], shard).samples)]
        generator = torch.Generator().manual_seed(shard_group_seed(seed, epoch, rank, group))
        return [references[i] for i in torch.randperm(len(references), generator=generator).tolist()]

    def references(self, seed: int, rank: int, world: int,
                   start: StreamPosition = START) -> Iterator[tuple[StreamPosition, list[_Reference], int]]:
        """The rank's endless stream from ``start``: ``(position after the sample, its group, its offset)``."""
        if len(self.shards) < world:
            raise DataError(f"{len(self.shards)} tar shards cannot be split over {world} ranks (each rank streams "
                            f"whole shards): write more, smaller shards, or drop the {STREAM_PREFIX} prefix to read "
                            "them map-style")
        epoch, group_index, offset = start
        found_in_epoch = offset > 0 or group_index > 0
        while True:
            references = self.group(seed, epoch, rank, world, group_index)
            if references is None:
                if not found_in_epoch:
                    raise DataError(f"rank {rank} of {world} found no image in its shards of epoch {epoch} of "
                                    f"{self.pattern}; use fewer ranks or more shards with images")
                epoch, group_index, offset, found_in_epoch = epoch + 1, 0, 0, False
                continue
            for position in range(offset, len(references)):
                found_in_epoch = True
                yield StreamPosition(epoch, group_index, position + 1), references, position
            group_index, offset = group_index + 1, 0

    # -- reading ----------------------------------------------------------------------------------------
    def _name(self, reference: _Reference) -> str:
        return f"{self.shards[reference.sample.shard]}:{reference.sample.key}"

    def read(self, references: list[_Reference], position: int) -> dict[str, Any]:
        """The sample at ``position`` of a group; an unreadable image is replaced by the group's next readable."""
        unreadable: list[int] = []
        for skipped in range(len(references)):
            reference = references[(position + skipped) % len(references)]
            sample = reference.sample
            try:
                data = self.files.read(sample.shard, sample.image_offset, sample.image_size)
                image, width, height = decode_image(io.BytesIO(data), self.load_size, self.max_pixels)
                annotations = sample_annotations(sample, self.files)
            except DECODE_ERRORS as error:
                warn_unreadable(self._name(reference), error)
                unreadable.append(reference.index)
                continue
            return make_sample(image, width / height, reference.index, corrupt=unreadable, **annotations)
        raise DataError(f"no readable image in a group of {self.shuffle_shards} shards of {self.pattern} "
                        f"(all {len(references)} failed to decode)")

    def batches(self, seed: int, rank: int, world: int, batch_size: int, num_batches: int,
                start: StreamPosition = START, worker: int = 0, num_workers: int = 1) -> Iterator[dict[str, Any]]:
        """The collated batches ``b < num_batches`` of the rank's stream from ``start`` with
        ``b % num_workers == worker``. Besides :func:`~wildssl.data.sample.collate`'s keys, a batch has
        ``position`` (list ``[epoch, group, offset]``: where the rank's next sample lies), ``batch_number``
        (``b``) and ``epoch`` ``(B,)`` long, each sample's epoch."""
        pending: list[tuple[list[_Reference], int, int]] = []
        count = 0
        for after, references, position in self.references(seed, rank, world, start):
            number = count // batch_size
            if number >= num_batches:
                return
            mine = number % num_workers == worker
            if mine:
                pending.append((references, position, after.epoch))
            count += 1
            if mine and count % batch_size == 0:
                batch = collate([self.read(refs, pos) for refs, pos, _ in pending])
                batch["epoch"] = torch.tensor([epoch for _, _, epoch in pending], dtype=torch.long)
                batch["position"] = list(after)
                batch["batch_number"] = number
                pending = []
                yield batch

    def captions(self, max_images: int) -> Iterator[str]:
        """Captions of up to ``max_images`` samples from shards evenly spread over the set (for a caption
        tokenizer); only ``.txt`` members are read, no image."""
        taken = 0
        spread = np.unique(np.linspace(0, len(self.shards) - 1, len(self.shards)).round().astype(np.int64))
        for shard in spread.tolist():
            for sample in index_shard(self.shards[shard], shard).samples:
                if taken >= max_images:
                    return
                taken += 1
                yield from sample_annotations(sample, self.files)["captions"]


class StreamBatches(IterableDataset):
    """One rank's batches of a :class:`ShardStream` for a DataLoader (``batch_size=None``): each worker
    yields its share (see :meth:`ShardStream.batches`), and the DataLoader's round-robin over workers
    puts them back in stream order."""

    def __init__(self, stream: ShardStream, seed: int, rank: int, world: int, batch_size: int, num_batches: int,
                 start: StreamPosition = START) -> None:
        super().__init__()
        self.stream, self.seed, self.rank, self.world = stream, seed, rank, world
        self.batch_size, self.num_batches, self.start = batch_size, num_batches, StreamPosition(*start)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.stream.batches(self.seed, self.rank, self.world, self.batch_size, self.num_batches,
                                   self.start, worker, workers)

    def __len__(self) -> int:
        return self.num_batches
