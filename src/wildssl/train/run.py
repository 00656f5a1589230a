"""Building a training run: sources, method, optimizer, schedules, resume state, loaders, checkpoints.

:func:`build_run` turns a resolved config into a :class:`Run`, everything the loop in
:mod:`wildssl.train.engine` needs; :func:`make_loaders` gives the data of a span of steps;
:func:`save_checkpoint` writes the run's state (never a non-finite tensor).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from wildssl import distributed as dist
from wildssl.data import collate, open_source
from wildssl.data.gpu_decode import DeviceDecoder, JpegBytes, resolve_decode, supports
from wildssl.data.sampler import StepBatchSampler, check_batch_fits, stream_seed
from wildssl.data.shard_stream import START, ShardStream, StreamBatches
from wildssl.data.workers import resolve_num_workers, resolve_prefetch
from wildssl.errors import CheckpointError, ConfigError, WildsslError
from wildssl.io import atomic_write_text
from wildssl.methods import build_initial_method
from wildssl.methods.base import Method
from wildssl.models.loading import CHECKPOINT_NAME, read_checkpoint_config
from wildssl.schema import MAX_STEPS
from wildssl.train.checkpoint import load_training_checkpoint, nonfinite_tensors, save_training_checkpoint
from wildssl.train import fsdp
from wildssl.train.config import build_config, dump_config, flatten
from wildssl.train.optim import FUSED_DEVICES, build_optimizer, build_schedules, peak_lr, warmup_steps

log = logging.getLogger("wildssl")

# Keys that may differ between a checkpoint's config and the config of the run that resumes it.
RESUMABLE_CHANGES = ("train.steps", "train.epochs", "train.images", "train.log_every", "train.checkpoint_every", "train.keep_every", "train.progress",
                     "train.tensorboard", "data.num_workers", "data.prefetch", "train.compile", "train.max_nonfinite")
# The run directory's list of the unreadable files met (Run.write_unreadable_list).
UNREADABLE_LIST = "unreadable_files.txt"
# Counters that survive a resume (stored in the checkpoint).
COUNTERS = ("nonfinite_steps", "corrupt_images")


class TrainingStopped(WildsslError):
    """Training stopped on purpose (non-finite steps); the last good checkpoint is kept."""


@dataclass
class Run:
    """Everything one training run holds. ``model`` is the method, or its DDP wrapper."""

    config: dict
    out_dir: Path
    device: torch.device
    rank: int
    world: int
    method: Method
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sources: dict
    batch_sizes: dict[str, int]
    total_steps: int
    steps_per_epoch: int
    schedules: dict[str, np.ndarray]
    method_schedules: dict[str, np.ndarray]
    freeze_steps: int
    start_step: int
    counters: dict = field(default_factory=lambda: {name: 0 for name in COUNTERS})
    last_good_checkpoint: Path | None = None
    # the checkpoint's config when the run resumed one (its eval.* may differ from ``config``'s), else None
    saved_config: dict | None = None
    # the open lock file of the run directory (main process; lock_run_dir), closed by release_lock
    lock: Any = None
    # stream -> indices of the unreadable images met so far; ``corrupt_images`` counts them (distinct
    # files, not skip events: a corrupt file is met again every epoch, and by its neighbours' requests)
    corrupt_files: dict[str, set[int]] = field(default_factory=dict)
    # streamed sources (ShardStream): stream -> this rank's position [epoch, group, offset] after the last
    # batch a finished step consumed; saved for every rank in the checkpoint
    stream_positions: dict[str, list[int]] = field(default_factory=dict)
    # data.decode=gpu: stream -> the decoder that finishes its batches on the device (streams whose
    # workers leave JPEGs undecoded); empty when the CPU decodes everything
    decoders: dict[str, DeviceDecoder] = field(default_factory=dict)

    def release_lock(self) -> None:
        """Let another process train this run directory (the end of :func:`wildssl.train.engine.train`)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def streams(self) -> tuple[str, ...]:
        return type(self.method).streams

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    @property
    def images_per_step(self) -> int:
        return sum(self.batch_sizes.values())

    def record_corrupt(self, batches: dict[str, dict]) -> None:
        """Add the unreadable images this rank's step skipped (each batch's ``corrupt`` indices)."""
        for name, batch in batches.items():
            self.corrupt_files.setdefault(name, set()).update(batch.get("corrupt", ()))
        self.counters["corrupt_images"] = self._distinct_corrupt()

    def _distinct_corrupt(self) -> int:
        """Distinct unreadable files: streams that read the same data SPEC (an AB run bootstrapping on its own
        images) index the same files, so they are counted once. Files a source left out when it was opened (a video
        that cannot be opened) count too."""
        files_of_data: dict[str, set[int]] = {}
        for name, indices in self.corrupt_files.items():
            files_of_data.setdefault(str(self.config["data"].get(name)), set()).update(indices)
        skipped_at_open = {str(self.config["data"].get(name)): getattr(source, "num_unreadable", 0)
                           for name, source in self.sources.items()}
        return sum(len(indices) for indices in files_of_data.values()) + sum(skipped_at_open.values())

    def write_unreadable_list(self) -> None:
        """``UNREADABLE_LIST`` in the run directory (main process): one line per unreadable file met so far,
        ``data.<stream>`` and the file's name, so that after a long job whose log is gone the files can still be found
        (the checkpoint keeps only their indices). Written with the checkpoints and at the end of the run."""
        if not self.main or not any(self.corrupt_files.values()):
            return
        lines = []
        for name, indices in sorted(self.corrupt_files.items()):
            source = self.sources.get(name)
            readable_name = getattr(source, "_name", None) if not isinstance(source, ShardStream) else None
            lines += [f"data.{name}\t{readable_name(i) if readable_name else f'item {i}'}" for i in sorted(indices)]
        try:
            atomic_write_text(self.out_dir / UNREADABLE_LIST, "".join(line + "\n" for line in lines))
        except OSError as error:  # the list is a convenience: the checkpoint and the log hold the facts
            log.warning("cannot write %s: %s", self.out_dir / UNREADABLE_LIST, error.strerror or error)

    def record_positions(self, batches: dict[str, dict]) -> None:
        """Remember where each streamed source's next batch starts (called after every step)."""
        for name in self.stream_positions:
            self.stream_positions[name] = list(batches[name]["position"])

    def gather_positions(self) -> dict:
        """Every rank's stream positions, ``{"world": W, stream: [position of rank 0, ...]}``; all ranks call it."""
        if not self.stream_positions:
            return {}
        everyone: list = [self.stream_positions]
        if dist.is_distributed():
            everyone = [None] * self.world
            torch.distributed.all_gather_object(everyone, self.stream_positions)
        return {"world": self.world, **{name: [ranks[name] for ranks in everyone] for name in self.stream_positions}}

    def gather_corrupt(self) -> None:
        """Merge every rank's unreadable images (each rank reads different batches); all ranks call it."""
        if dist.is_distributed():
            mine = {name: sorted(indices) for name, indices in self.corrupt_files.items()}
            everyone: list = [None] * self.world
            torch.distributed.all_gather_object(everyone, mine)
            for ranks_files in everyone:
                for name, indices in ranks_files.items():
                    self.corrupt_files.setdefault(name, set()).update(indices)
        self.counters["corrupt_images"] = self._distinct_corrupt()


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def stream_batch_sizes(config: dict, method: Method) -> dict[str, int]:
    """``{stream: global batch}``: ``train.batch_size`` for the first stream; for the others
    ``data.<stream>_batch_size``, else what the method derives from the first (AB: a share of it)."""
    global_batch = config["train"]["batch_size"]
    streams = type(method).streams
    return {name: (global_batch if index == 0 else
                   config["data"][f"{name}_batch_size"] or method.stream_batch_size(name, global_batch))
            for index, name in enumerate(streams)}


def total_steps_of(config: dict, first_source_size: int, images_per_step: int) -> int:
    """The run's length in steps from ``train.images`` (images seen, all streams together), else
    ``train.epochs`` (passes over the first stream), else ``train.steps``; converted once, here, and at most
    :data:`wildssl.schema.MAX_STEPS` (the schedules hold one value per step)."""
    tcfg = config["train"]
    first_batch = tcfg["batch_size"]
    if tcfg["images"] is not None:
        steps, key = max(1, math.ceil(tcfg["images"] / images_per_step)), "train.images"
    elif tcfg["epochs"] is not None:
        steps, key = max(1, math.ceil(tcfg["epochs"] * (first_source_size // first_batch))), "train.epochs"
    else:
        return tcfg["steps"]
    if steps > MAX_STEPS:
        raise ConfigError(f"{key}={tcfg[key.split('.')[1]]} is {steps} steps of {images_per_step} images; at most "
                          f"{MAX_STEPS} steps are supported: lower {key} or raise train.batch_size")
    return steps


def _same_path_spec(saved, current) -> bool:
    """Whether two data SPECs name the same files though spelt differently: ``current`` exists, and ``saved`` is the
    same path, or a relative one that ``current`` ends with (the run was started from another working directory:
    ``cifar10/train`` then, ``/data/cifar10/train`` or ``../data/cifar10/train`` now). Prefixes (``stream:``,
    ``video:``) and ``?`` parameters must be equal; patterns (``{0..9}``) and ``synthetic:`` never match."""
    if not isinstance(saved, str) or not isinstance(current, str):
        return False

    def split(spec: str) -> tuple[str, str, str]:
        prefix = next((p for p in ("stream:", "video:") if spec.startswith(p)), "")
        body, _, query = spec[len(prefix):].partition("?")
        return prefix, body, query

    (prefix, before, query), (prefix_now, now, query_now) = split(saved), split(current)
    if prefix != prefix_now or query != query_now or not before or not now or before.startswith("synthetic:"):
        return False
    here = Path(os.path.expanduser(now))
    if not here.exists():
        return False
    then = Path(os.path.normpath(os.path.expanduser(before)))
    if then.is_absolute():
        return then.exists() and then.resolve() == here.resolve()
    return here.resolve().parts[-len(then.parts):] == then.parts


def check_resume_config(saved: dict, current: dict, where: str) -> None:
    """A resumed run must train the same thing: only :data:`RESUMABLE_CHANGES` and ``eval.*`` may differ, and a data
    path may be spelt otherwise when it names the same files (:func:`_same_path_spec`)."""
    saved_flat, current_flat = flatten(saved), flatten(current)
    moved = [k for k in set(saved_flat) & set(current_flat) if k.startswith("data.")
             and saved_flat[k] != current_flat[k] and _same_path_spec(saved_flat[k], current_flat[k])]
    for key in sorted(moved):
        log.info("%s: %r and %r name the same data (the run started in another working directory); it goes on "
                 "with %r", key, saved_flat[key], current_flat[key], current_flat[key])
    differing = sorted(k for k in set(saved_flat) | set(current_flat)
                       if saved_flat.get(k) != current_flat.get(k) and k not in RESUMABLE_CHANGES
                       and not k.startswith("eval.") and k not in moved)
    if differing:
        if "method.name" in differing:  # another method: its other keys differ too, and say less than this one
            differing = ["method.name"] + [k for k in differing if k != "method.name"]
        shown = ", ".join(f"{k}: {saved_flat.get(k)!r} -> {current_flat.get(k)!r}" for k in differing[:4])
        more = f" and {len(differing) - 4} more keys" if len(differing) > 4 else ""
        raise ConfigError(f"cannot resume {where}: the config differs from the checkpoint's ({shown}{more}); "
                          "use the same recipe and --set values, or a new --out directory")


# What a write killed half-way leaves in a run directory: wildssl.io.atomic_save's "<name>.safetensors.tmp",
# and the temporary file the safetensors writer itself fills before renaming it to that name (".tmp" and
# six letters or digits, the Rust tempfile crate's naming).
STALE_WRITES = re.compile(r"^(?:.+\.safetensors\.tmp|\.tmp[A-Za-z0-9]{6})$")


# Held (flock) by the process that trains a run directory, for as long as it trains: a second process (the same
# command started twice, a requeued job while the first still runs) is refused instead of interleaving its
# checkpoints and metrics rows with the first's. The kernel lets go when the process ends, however it ends.
RUN_LOCK = ".wildssl.lock"


def lock_run_dir(out_dir: Path):
    """The open lock file of ``out_dir`` (keep it open while training; close it to let go), or a ConfigError naming
    the process that holds it. None where the platform has no ``flock``."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: runs are not locked
        return None
    handle = open(out_dir / RUN_LOCK, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"run directory {out_dir} is being trained by {holder} now; wait for it to end (then "
                          "--resume continues it) or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def prepare_out_dir(out_dir: Path, resume: bool):
    """Create the run directory (one-line errors), lock it (:func:`lock_run_dir`; returns the lock) and remove what a
    killed run can leave behind (after the lock: a live run's temporary files are its own)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory; choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write the run directory {out_dir}: {error.strerror or error}; "
                          "choose a writable --out") from None
    lock = lock_run_dir(out_dir)
    for stale in out_dir.iterdir():
        if STALE_WRITES.match(stale.name) and not stale.is_dir():
            stale.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted checkpoint write", stale)
    return lock


def _buffer_sync(method: Method) -> dict:
    """DDP's keyword that stops the per-forward buffer copy for a method that asks (the buffers are still
    copied from rank 0 once, at construction): ``forward_sync_buffers`` from torch 2.13, before it
    ``broadcast_buffers``, which also skips that first copy."""
    if method.broadcast_buffers:
        return {}
    parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers": False}


def compile_networks(method: Method, backend: str = "inductor") -> None:
    """``torch.compile`` the student's and the teacher's backbones (``train.compile``).

    Static shapes (``dynamic=False``): each input shape a step uses (DINO's global and local crop batches,
    the teacher's globals, a bootstrap stream's crops) is compiled once into its own graph, and every
    later step reuses those graphs; with automatic dynamic shapes, the second crop size would instead
    recompile everything symbolically. The cache limit is raised to hold them all (training and
    evaluation mode of both networks at every crop size)."""
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 32))
    for networks in (method.student, method.teacher):
        if networks is not None:
            networks["backbone"].compile(dynamic=False, backend=backend)


def checkpoint_location(sharding: str, out_dir: str | Path) -> Path:
    """What a user names as the checkpoint of a run of ``train.sharding`` in ``out_dir``: its file, or the
    ``checkpoint.dcp/`` folder of a sharded run."""
    return Path(out_dir) / (fsdp.SHARDED_CHECKPOINT if sharding == "fsdp" else CHECKPOINT_NAME)


def _checkpoint_file(sharding: str, out_dir: str | Path) -> Path:
    """The file whose presence says that a run of ``train.sharding`` in ``out_dir`` has saved a checkpoint (FSDP:
    the file a sharded checkpoint writes last)."""
    location = checkpoint_location(sharding, out_dir)
    return location / fsdp.RUN_STATE if sharding == "fsdp" else location


def run_checkpoint_path(config: dict, out_dir: str | Path) -> Path:
    """Where a run in ``out_dir`` keeps its checkpoint (FSDP: the file a sharded checkpoint writes last)."""
    return _checkpoint_file(config["train"]["sharding"], out_dir)


def check_out_dir(config: dict, out_dir: str | Path, resume: bool) -> None:
    """A CheckpointError when ``out_dir`` already holds a run and ``resume`` was not asked for (``wildssl train``
    asks first, before it opens any data)."""
    if run_checkpoint_path(config, out_dir).is_file() and not resume:
        raise CheckpointError(f"run directory {out_dir} already holds a checkpoint; pass --resume to "
                              "continue it or choose another --out")
    other = "ddp" if config["train"]["sharding"] == "fsdp" else "fsdp"
    if _checkpoint_file(other, out_dir).is_file():  # else trained over from step 0
        written = checkpoint_location(other, out_dir).name + ("/" if other == "fsdp" else "")
        raise CheckpointError(f"run directory {out_dir} holds a run written as {written} (train.sharding={other}); "
                              f"this config would start another beside it: resume it with --set "
                              f"train.sharding={other}, or choose another --out")


RUN_MARKERS = ("config.yaml", "metrics.jsonl")  # what a run writes first, before its first checkpoint


def check_out_is_new_or_a_run(config: dict, out_dir: str | Path) -> None:
    """A ConfigError when ``--out`` is a folder of other files that holds no run (an image folder, a project
    folder): a run would write its checkpoint, ``config.yaml``, ``metrics.jsonl`` and ``tensorboard/`` among them,
    over files of those names. A run's own folder (even one killed before its first checkpoint) may be given."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or run_checkpoint_path(config, out_dir).is_file():
        return
    if any((out_dir / name).is_file() for name in RUN_MARKERS):
        return
    others = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    if others:
        shown = ", ".join(repr(name) for name in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3
                                                                 else "")
        raise ConfigError(f"--out {out_dir} is a folder of other files ({shown}) that holds no run; a run writes "
                          "its checkpoint, config.yaml, metrics.jsonl and tensorboard/ there: give a new or empty "
                          "folder")


def _say_how_a_new_length_resumes(run: Run, saved: dict, first_source_size: int, images_per_step: int) -> None:
    """A resume whose budget (``train.steps``/``epochs``/``images``) differs from the checkpoint's recomputes every
    schedule over the new length: say so with the learning rate before and after at the resumed step, or that the
    run is already past its new end."""
    before = total_steps_of(saved, first_source_size, images_per_step)
    if before == run.total_steps:
        return
    step = run.start_step
    if step >= run.total_steps:
        log.warning("the run is at step %d, already past its new length of %d steps: nothing is trained (give a "
                    "longer train.steps, epochs or images to go on)", step, run.total_steps)
        return
    old_lr = float(build_schedules(saved, before, saved["train"]["batch_size"], run.steps_per_epoch)["lr"]
                   [min(step, before - 1)])
    new_lr = float(run.schedules["lr"][step])
    change = (f"goes from {old_lr:.3g} to {new_lr:.3g}" if f"{old_lr:.3g}" != f"{new_lr:.3g}" else
              f"stays {new_lr:.3g} at that step")
    log.warning("the run's length changed from %d to %d steps: its schedules (learning rate, weight decay, momentum, "
                "...) are recomputed over %d steps, so at step %d the learning rate %s", before, run.total_steps,
                run.total_steps, step, change)


def warn_about_the_schedule(run: Run) -> None:
    """Warnings (rank 0) for a learning-rate schedule that cannot do what its keys say: a warm-up longer than the run,
    a min_lr above the peak. The engine calls it for a training run; ``wildssl bench``, whose few timed steps are no
    training, does not."""
    if not run.main:
        return
    config = run.config
    warmup, peak = warmup_steps(config, run.steps_per_epoch), peak_lr(config, config["train"]["batch_size"])
    if warmup >= run.total_steps and config["optim"]["lr"] > 0:
        log.warning("optim.warmup_epochs=%g is %d steps and the run %d: the learning rate never reaches its peak "
                    "(%.3g at most, against %.3g); shorten the warm-up or lengthen the run",
                    config["optim"]["warmup_epochs"], warmup, run.total_steps, float(run.schedules["lr"].max()), peak)
    if config["optim"]["min_lr"] > peak:  # the "cosine decay" then climbs to min_lr
        log.warning("optim.min_lr=%g is above the peak learning rate %.3g (optim.lr at this batch), so the rate "
                    "rises over the run instead of decaying to it; give a min_lr below the peak",
                    config["optim"]["min_lr"], peak)
    for line in run.method.schedule_warnings(run.total_steps, run.steps_per_epoch):
        log.warning("%s", line)


def build_run(config: dict, out_dir: str | Path, resume: bool = False) -> Run:
    """Everything a run needs, restored from ``out_dir``'s checkpoint when ``resume`` finds one. ``config`` is
    resolved again (:func:`wildssl.train.config.build_config`): a dict built by hand gets the checks a recipe gets
    (an unknown key, a value out of range or of the wrong type is a one-line ConfigError; a missing section takes
    the defaults); one that ``build_config`` made comes back the same."""
    config = build_config(config)
    out_dir = Path(out_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = pick_device()
    tcfg = config["train"]
    checkpoint_path = run_checkpoint_path(config, out_dir)
    sharded = tcfg["sharding"] == "fsdp"
    if tcfg["batch_size"] % world:  # before the run directory and the online k-NN (the samplers check it again)
        raise ConfigError(f"train.batch_size={tcfg['batch_size']} is not divisible by the world size {world}: each "
                          f"process takes an equal share; give a multiple of {world}")
    check_out_dir(config, out_dir, resume)
    # Seeded with train.seed: the same weights on every rank. Built before the run directory is made, so that a
    # model.init_from that cannot be read leaves no empty folder; not read when the run resumes from its own
    # checkpoint, which holds those weights (the file may be gone by then).
    method = build_initial_method(config, load_init_from=not checkpoint_path.is_file()).to(device)
    if config["eval"]["encoder"] == "teacher" and method.teacher is None:  # else a ValueError at the first k-NN
        raise ConfigError(f"eval.encoder=teacher, but method {method.name} has no teacher encoder: give "
                          "eval.encoder=student or auto")
    if tcfg["activation_checkpointing"] and not sharded and rank == 0:
        log.warning("train.activation_checkpointing=true recomputes activations under train.sharding=fsdp only; "
                    "this run (train.sharding=ddp) keeps them as usual")
    lock = prepare_out_dir(out_dir, resume) if rank == 0 else None
    try:
        return _build_the_rest(config, out_dir, resume, method, device, lock)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def _build_the_rest(config: dict, out_dir: Path, resume: bool, method: Method, device: torch.device, lock) -> Run:
    """:func:`build_run` once the method is built and the run directory made and locked (``lock``: the main
    process's; closed by the caller if this fails): sources, optimizer, the checkpoint's state."""
    tcfg = config["train"]
    rank, world = dist.get_rank(), dist.get_world_size()
    checkpoint_path, sharded = run_checkpoint_path(config, out_dir), tcfg["sharding"] == "fsdp"
    dist.barrier()

    streams = type(method).streams
    sources = {}
    for name in streams:
        spec = config["data"][name]
        if not spec:
            raise ConfigError(f"no data for stream {name!r}: set data.{name} to a data SPEC (a folder, a .jsonl "
                              "manifest, tar shards or synthetic:scenes)")
        sources[name] = open_source(spec, load_size=config["data"]["load_size"],
                                    max_pixels=config["data"]["max_pixels"], stream=True,
                                    shuffle_shards=config["data"]["shuffle_shards"])
        if isinstance(sources[name], ShardStream) and method.index_hook(name) is not None:
            raise ConfigError(f"method {method.name} chooses which images stream {name!r} reads, which a streamed "
                              f"source cannot do; give data.{name} map-style data (drop the stream: prefix)")
    decoders = {}
    if resolve_decode(config["data"]["decode"], device) == "gpu":
        for name, source in sources.items():
            if supports(source):
                decoders[name] = DeviceDecoder(source, device)
            else:
                log.info("data.decode=gpu: data.%s (%s) is decoded on the CPU: only image files (a folder, a "
                         ".jsonl manifest, map-style tar shards) are decoded on the device", name, source.describe())
    global_batch = tcfg["batch_size"]
    batch_sizes = stream_batch_sizes(config, method)
    for index, name in enumerate(streams):  # before any evaluation or state: a batch the data cannot fill
        if not isinstance(sources[name], ShardStream):
            check_batch_fits(len(sources[name]), batch_sizes[name],
                             "train.batch_size" if index == 0 else f"data.{name}_batch_size")
    # Before the checkpoint load and the DDP wrapper: a method may add state sized by its data here.
    method.prepare(sources, out_dir)
    first = sources[streams[0]]
    steps_per_epoch = max(len(first) // global_batch, 1)
    total_steps = total_steps_of(config, len(first), sum(batch_sizes.values()))
    if tcfg["compile"]:
        compile_networks(method)
    model: nn.Module = method
    if sharded:
        model = fsdp.shard_for_training(method, config, device)
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.may_leave_parameters_unused, **_buffer_sync(method))
    optimizer = build_optimizer(method.parameter_groups(), config["optim"]["betas"],
                                fused=device.type in FUSED_DEVICES)
    run = Run(config=config, out_dir=out_dir, device=device, rank=rank, world=world, method=method, model=model,
              optimizer=optimizer, sources=sources, batch_sizes=batch_sizes, total_steps=total_steps,
              steps_per_epoch=steps_per_epoch,
              schedules=build_schedules(config, total_steps, global_batch, steps_per_epoch),
              method_schedules=method.schedules(total_steps, steps_per_epoch),
              freeze_steps=int(round(config["optim"]["freeze_last_layer_epochs"] * steps_per_epoch)),
              start_step=0,
              stream_positions={name: list(START) for name, source in sources.items() if isinstance(source, ShardStream)},
              decoders=decoders, lock=lock)

    if checkpoint_path.is_file():
        if sharded:
            state = fsdp.read_run_state(checkpoint_path.parent)
            saved = state["config"]
            check_resume_config(saved, config, str(checkpoint_path.parent))
            fsdp.load_sharded(checkpoint_path.parent, method, optimizer)
        else:
            saved = read_checkpoint_config(checkpoint_path)
            check_resume_config(saved, config, str(checkpoint_path))
            state = load_training_checkpoint(checkpoint_path, method, optimizer)
        run.start_step, run.saved_config = state["step"], saved
        _say_how_a_new_length_resumes(run, saved, len(first), sum(batch_sizes.values()))
        run.counters.update({k: int(state["extra"].get(k, 0)) for k in COUNTERS})
        run.corrupt_files = {name: set(indices) for name, indices in state["extra"].get("corrupt_files", {}).items()}
        restore_positions(run, state["extra"].get("stream_positions", {}), str(checkpoint_path))
        run.last_good_checkpoint = checkpoint_path
        log.info("resumed %s at step %d", checkpoint_path, run.start_step)
    elif resume:
        # a warning, not an error: a preemptible job's script passes --resume on its first start too
        log.warning("--resume: no checkpoint in %s yet, so this run starts at step 0 (is that the run directory "
                    "you meant?)", out_dir)
    # not when a resume has nothing to train (a length at or below the checkpoint's step): config.yaml keeps the
    # length the run was trained to, not one it never ran
    if run.main and not (run.start_step and run.start_step >= run.total_steps):
        try:
            (out_dir / "config.yaml").write_text(dump_config(config))
        except OSError as error:  # a full disk: the probe in prepare_out_dir wrote no bytes
            raise ConfigError(f"cannot write the run directory {out_dir}: {error.strerror or error}; "
                              "free some space or choose another --out") from None
    return run


def restore_positions(run: Run, saved: dict, where: str) -> None:
    """This rank's stream positions from a checkpoint's ``stream_positions`` (see :meth:`Run.gather_positions`)."""
    for name in run.stream_positions:
        if name not in saved:
            raise CheckpointError(f"{where} holds no position for the streamed data.{name}: it was written by a run "
                                  "that read it map-style; resume with the same data SPEC")
        if saved["world"] != run.world:
            raise CheckpointError(f"{where} was written by {saved['world']} ranks and this run has {run.world}: a "
                                  f"streamed source (data.{name}) resumes exactly only on as many ranks")
        run.stream_positions[name] = list(saved[name][run.rank])


def make_loaders(run: Run, start: int, stop: int) -> dict[str, DataLoader]:
    """One DataLoader per stream yielding this rank's batches of steps ``start .. stop - 1``.

    A map-style source reads the indices of :class:`StepBatchSampler` (a pure function of the step); a
    streamed one continues from its recorded position (``run.stream_positions``)."""
    tcfg, dcfg = run.config["train"], run.config["data"]
    workers = resolve_num_workers(dcfg["num_workers"])
    common = dict(num_workers=workers, prefetch_factor=resolve_prefetch(dcfg["prefetch"], workers),
                  pin_memory=run.device.type == "cuda",
                  generator=torch.Generator().manual_seed(tcfg["seed"]))  # the global RNG stays untouched
    loaders = {}
    for index, name in enumerate(run.streams):
        source, seed = run.sources[name], stream_seed(tcfg["seed"], index)
        if isinstance(source, ShardStream):
            if run.batch_sizes[name] % run.world:
                raise ConfigError(f"the batch of data.{name} ({run.batch_sizes[name]}) is not divisible by the world "
                                  f"size {run.world}")
            batches = StreamBatches(source, seed, run.rank, run.world, run.batch_sizes[name] // run.world,
                                    stop - start, run.stream_positions[name])
            loaders[name] = DataLoader(batches, batch_size=None, **common)
            continue
        sampler = StepBatchSampler(len(source), run.batch_sizes[name], run.total_steps, start, seed, run.rank,
                                   run.world, stop_step=stop, index_hook=run.method.index_hook(name))
        dataset = JpegBytes(source) if name in run.decoders else source  # workers read the JPEGs' bytes only
        loaders[name] = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **common)
    return loaders


def loader_spans(run: Run) -> list[tuple[int, int]]:
    """Spans of steps that share one set of loaders: the whole run, or one span per epoch when a
    stream has an index hook (so the hook sees the state of its own epoch, whatever the prefetch)."""
    if not any(run.method.index_hook(name) for name in run.streams):
        return [(run.start_step, run.total_steps)]
    spans, start = [], run.start_step
    while start < run.total_steps:
        stop = min((start // run.steps_per_epoch + 1) * run.steps_per_epoch, run.total_steps)
        spans.append((start, stop))
        start = stop
    return spans


def save_checkpoint(run: Run, step: int) -> None:
    """Write the run's checkpoint at ``step`` (and a kept copy every ``train.keep_every`` steps).

    A state holding a non-finite tensor is never written, and a write that fails (a full disk) leaves the
    previous checkpoint as it was: either way the run stops with one line naming the step and the last
    good checkpoint, on every rank (the failure is shared, so that no rank waits for rank 0 forever)."""
    if run.config["train"]["sharding"] == "fsdp":
        _save_sharded_checkpoint(run, step)
        return
    bad = nonfinite_tensors(run.method, run.optimizer)
    if bad:
        kept = run.last_good_checkpoint or "none yet"
        raise TrainingStopped(f"training stopped at step {step}: the weights hold non-finite values "
                              f"({len(bad)} tensors, e.g. {bad[0]}); nothing was written, the last good "
                              f"checkpoint is {kept}")
    run.gather_corrupt()
    run.write_unreadable_list()
    failure = None
    positions = run.gather_positions()
    if run.main:
        extra = {**run.counters, "corrupt_files": {name: sorted(v) for name, v in run.corrupt_files.items()}}
        if positions:
            extra["stream_positions"] = positions
        try:
            save_training_checkpoint(run.checkpoint_path, run.method, run.optimizer, step, run.config, extra)
            run.last_good_checkpoint = run.checkpoint_path
            keep = run.config["train"]["keep_every"]
            if keep and step % keep == 0:
                save_training_checkpoint(run.out_dir / f"checkpoint_{step:07d}.safetensors", run.method,
                                         run.optimizer, step, run.config, extra)
        except CheckpointError as error:
            failure = error
    failed = torch.tensor(float(failure is not None), device=run.device)
    if dist.is_distributed():
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if failed.item():
        reason = failure or "the main process could not write the checkpoint"
        raise TrainingStopped(f"training stopped at step {step}: {reason}; the last good checkpoint is "
                              f"{run.last_good_checkpoint or 'none yet'}")
    run.last_good_checkpoint = run.checkpoint_path


def _save_sharded_checkpoint(run: Run, step: int) -> None:
    """``train.sharding: fsdp``: the run's checkpoint as a DCP directory (:mod:`wildssl.train.fsdp`)."""
    if fsdp.nonfinite_shards(run.method):
        raise TrainingStopped(f"training stopped at step {step}: the weights hold non-finite values; nothing was "
                              f"written, the last good checkpoint is {run.last_good_checkpoint or 'none yet'}")
    run.gather_corrupt()
    run.write_unreadable_list()
    positions = run.gather_positions()
    extra = {**run.counters, "corrupt_files": {name: sorted(v) for name, v in run.corrupt_files.items()}}
    if positions:
        extra["stream_positions"] = positions
    keep = run.config["train"]["keep_every"]
    run.last_good_checkpoint = fsdp.save_run_checkpoint(
        run.out_dir, run.method, run.optimizer, step, run.config, extra,
        keep_as=f"checkpoint_{step:07d}.dcp" if keep and step % keep == 0 else None)
