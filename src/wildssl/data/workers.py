"""How many DataLoader worker processes decode images, and how many batches each prepares ahead.

``data.num_workers: auto`` uses the cores this process may run on (its CPU affinity, which a batch scheduler
restricts), shared by the ranks of the node (``LOCAL_WORLD_SIZE``, set by torchrun): one core is left to
the training process itself, which feeds the accelerator, and at most :data:`MAX_AUTO_WORKERS` are
started, beyond which a worker mostly adds memory. ``data.prefetch: auto`` keeps at least
:data:`MIN_BATCHES_IN_FLIGHT` batches in flight across the workers (PyTorch's default is 2 per worker),
so that one slow image does not stall a step when there are few workers. Integers override both.
"""

from __future__ import annotations

import math
import os

from wildssl.errors import ConfigError

MAX_AUTO_WORKERS = 8
MIN_BATCHES_IN_FLIGHT = 4


def cores_per_rank() -> int:
    """CPU cores available to each training process of this node (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(local_ranks, 1))


def resolve_num_workers(value: int | str, cores: int | None = None) -> int:
    """``data.num_workers``: ``"auto"`` -> ``min(cores - 1, MAX_AUTO_WORKERS)`` (0 on one core: the training
    process decodes); a non-negative integer as given."""
    if value == "auto":
        cores = cores_per_rank() if cores is None else cores
        return max(0, min(cores - 1, MAX_AUTO_WORKERS))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.num_workers={value!r} must be auto or a number of worker processes >= 0")
    return value


def resolve_prefetch(value: int | str, num_workers: int) -> int | None:
    """``data.prefetch``: batches each worker prepares ahead (DataLoader's ``prefetch_factor``); None when
    there are no workers. ``"auto"`` -> ``max(2, ceil(MIN_BATCHES_IN_FLIGHT / num_workers))``."""
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"data.prefetch={value!r} must be auto or a number of batches per worker >= 1")
    if num_workers == 0:
        return None
    if value == "auto":
        return max(2, math.ceil(MIN_BATCHES_IN_FLIGHT / num_workers))
    return value
