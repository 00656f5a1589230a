"""Process-group helpers: rank and world size, collectives that are identities in a single process.

Everything here works unchanged when ``torch.distributed`` is not initialized (one process, world size
1), so losses and evaluation code can call the collectives unconditionally.
"""

from __future__ import annotations

import os
import time
import warnings

import torch
import torch.distributed as dist

from wildssl.errors import ConfigError


def is_distributed() -> bool:
    """True when a default process group is initialized (even one with a single rank)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on global rank 0, the process that writes logs, checkpoints and exports."""
    return get_rank() == 0


def broadcast_flag(flag: bool) -> bool:
    """``flag`` as the main process has it, on every rank (itself in a single process)."""
    if not is_distributed():
        return bool(flag)
    box = [bool(flag)]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def barrier() -> None:
    """Wait for every rank; no-op when not distributed."""
    if is_distributed():
        dist.barrier()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, letting gradients flow back to every rank.

    ``x``: ``(B, ...)``, the same shape on every rank. Returns ``(world_size * B, ...)`` ordered by rank,
    so this rank's rows are ``[rank * B, (rank + 1) * B)``. Identity when not distributed.

    Why the gradient matters: with a plain ``dist.all_gather`` the other ranks' rows are constants, so a
    rank's input receives only the gradient of its *own* loss. Contrastive losses also use this rank's
    embeddings as negatives in every other rank's loss; those terms are lost, and after DDP averages the
    parameter gradients over ranks the result is off (for the shared terms, by a factor 1/world_size)
    without any error. ``torch.distributed.nn.functional.all_gather`` is differentiable: its backward
    sums, over ranks, the gradients of every rank's loss with respect to this rank's slice (a
    reduce-scatter), which is exactly the gradient of the sum of all ranks' losses.
    """
    if get_world_size() == 1:
        return x
    # Imported here: builds of torch without distributed support cannot import it at all.
    import torch.distributed.nn.functional as dist_nn

    with warnings.catch_warnings():
        # Recent torch (2.13 here) marks the autograd collectives deprecated in favour of a private module
        # (torch.distributed._functional_collectives); they still work and keep the gloo path.
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
        parts = dist_nn.all_gather(x)
    return torch.cat(parts, dim=0)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new, detached floating-point tensor; ``t`` is not modified).

    Identity (detached copy) when not distributed. For metrics and statistics, not for gradients.
    """
    out = t.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    world_size = get_world_size()
    if world_size == 1:
        return out
    # SUM then divide: gloo has no ReduceOp.AVG.
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``t`` over ranks (a new, detached tensor); a detached copy when not distributed."""
    out = t.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 without autograd, for evaluation features.

    ``x``: ``(B, ...)``. Returns ``(world_size * B, ...)`` ordered by rank. Every rank must pass the
    same shape: the collective cannot gather unequal sizes, so shards of an evaluation set must be
    padded to equal length (e.g. by repeating samples) before calling this, and the padding removed
    afterwards. Unequal shapes raise ``ValueError`` on every rank instead of hanging or corrupting data.
    """
    world_size = get_world_size()
    if world_size == 1:
        return x.detach()
    x = x.detach().contiguous()
    # The shape check is itself a collective, so every rank learns about a mismatch and raises.
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(
            f"all_gather_no_grad needs equal shapes on every rank, got {[tuple(s.tolist()) for s in shapes]}; "
            "pad every shard to the same length first"
        )
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r} is not an integer; torchrun sets it to a whole number"
        ) from None


def setup_distributed(backend: str | None = None) -> tuple[int, int, int, torch.device]:
    """Join the process group described by torchrun's environment and pick this process's device.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``, read by
    ``torch.distributed`` itself). Without them (a plain ``python`` launch) or with ``WORLD_SIZE=1`` no
    process group is created. ``backend`` defaults to ``"nccl"`` when CUDA is available, else
    ``"gloo"``. The device is ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    Returns ``(rank, world_size, local_rank, device)``. Calling it again once the group exists returns
    the same values without re-initializing.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"environment has RANK={rank} and WORLD_SIZE={world_size}; need WORLD_SIZE >= 1 and "
            "0 <= RANK < WORLD_SIZE (launch with torchrun)"
        )

    if torch.cuda.is_available():
        if not 0 <= local_rank < torch.cuda.device_count():
            raise ConfigError(
                f"environment has LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} "
                "CUDA devices; launch at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if world_size > 1 and not is_distributed():
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        # Binding the group to the device lets NCCL barriers know which GPU to use.
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            device_id=device if device.type == "cuda" else None,
        )
    return rank, world_size, local_rank, device


# How long cleanup_distributed leaves gloo's worker threads, without the GIL held, to let go of finished
# collectives before the group is destroyed (see there).
GLOO_DRAIN_SECONDS = 0.1


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists; safe to call in a single process.

    Gloo's worker threads let go of a finished collective a moment after its caller has the result. If Python has
    freed the collective's tensors by then, letting go needs the GIL, and the group's destructor joins those threads
    while holding the GIL: a thread still holding such a collective deadlocks the process at exit (seen on a loaded
    2-core machine: the main thread in ``~ProcessGroupGloo`` -> ``std::thread::join``, a ``pt_gloo_runloop`` thread
    waiting for the GIL in ``~AsyncAllgatherWork``). A short sleep first, with the GIL free, lets them finish. It is
    no collective, so it is safe on the error path, where the other ranks may be gone."""
    if is_distributed():
        if dist.get_backend() == "gloo":
            time.sleep(GLOO_DRAIN_SECONDS)
        dist.destroy_process_group()
