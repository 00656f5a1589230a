"""The training loop: one engine for every method.

Batches are a pure function of ``(train.seed, step)`` (:class:`StepBatchSampler`) and views are drawn
from a generator seeded by ``(train.seed, step, rank)``, so the data position of a run is its step
count and resuming from a checkpoint reproduces an unbroken run bit for bit on the CPU.

Definitions used everywhere:
- ``train.batch_size`` is the **global** batch (all ranks together); each rank gets ``batch / world``.
- An **epoch** is one pass over the data source: ``len(source) // train.batch_size`` steps (drop-last).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from wildssl.data.sources import collate, open_source
from wildssl.errors import CheckpointError, ConfigError, WildsslError
from wildssl.methods import build_method
from wildssl.methods.base import StepContext
from wildssl.train import distributed as dist
from wildssl.train.checkpoint import (CHECKPOINT_NAME, load_training_checkpoint, read_checkpoint_config,
                                      save_training_checkpoint)
from wildssl.train.config import _flatten, dump_config
from wildssl.train.logging import CollapseMonitor, MetricLogger, format_duration
from wildssl.train.optim import apply_schedules, build_optimizer, build_schedules, steps_from_epochs

log = logging.getLogger("wildssl")

# Keys that may differ between a checkpoint's config and the config of the run that resumes it.
RESUMABLE_CHANGES = ("train.steps", "train.epochs", "train.log_every", "train.checkpoint_every",
                     "train.keep_every", "train.progress", "train.tensorboard", "data.num_workers",
                     "train.compile", "train.max_nonfinite")


class TrainingStopped(WildsslError):
    """Training stopped on purpose (non-finite losses); the last good checkpoint is kept."""


class StepBatchSampler(Sampler):
    """Yields this rank's indices for steps ``start_step .. total_steps - 1``.

    Step s of epoch e = s // steps_per_epoch takes the slice ``[pos * B, (pos + 1) * B)`` of a
    permutation seeded by ``(seed, e)``; rank r keeps its contiguous share of that global batch.
    """

    def __init__(self, dataset_size: int, global_batch: int, total_steps: int, start_step: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ConfigError(f"train.batch_size={global_batch} is not divisible by the world size "
                              f"{world_size}")
        self.steps_per_epoch = dataset_size // global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size={global_batch} is larger than the data source "
                              f"({dataset_size} images); lower the batch size or add data")
        self.dataset_size, self.global_batch = dataset_size, global_batch
        self.total_steps, self.start_step = total_steps, start_step
        self.seed, self.rank, self.local_batch = seed, rank, global_batch // world_size

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self):
        epoch, order = -1, None
        for step in range(self.start_step, self.total_steps):
            step_epoch, position = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch, order = step_epoch, self.permutation(step_epoch)
            start = position * self.global_batch + self.rank * self.local_batch
            yield order[start: start + self.local_batch].tolist()

    def __len__(self) -> int:
        return self.total_steps - self.start_step


def view_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_context(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def check_resume_config(saved: dict, current: dict, where: str) -> None:
    """A resumed run must train the same thing: only :data:`RESUMABLE_CHANGES` may differ."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    differing = sorted(k for k in set(saved_flat) | set(current_flat)
                       if saved_flat.get(k) != current_flat.get(k) and k not in RESUMABLE_CHANGES
                       and not k.startswith("eval."))
    if differing:
        shown = ", ".join(f"{k}: {saved_flat.get(k)!r} -> {current_flat.get(k)!r}" for k in differing[:4])
        raise ConfigError(f"cannot resume {where}: the config differs from the checkpoint's ({shown}); "
                          "use the same recipe and --set values, or a new --out directory")


class _InterruptFlag:
    """SIGINT (Ctrl-C) asks the loop to save a checkpoint at the next step boundary and exit."""

    def __init__(self):
        self.raised = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook executor): Ctrl-C keeps its default
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.raised:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.raised = True
        log.warning("interrupt received: saving a checkpoint at the end of this step (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def train(config: dict, out_dir: str | Path, resume: bool = False,
          knn_evaluator=None) -> dict:
    """Train ``config`` into ``out_dir``; returns a summary dict (steps, final loss, k-NN, counters).

    ``knn_evaluator(encoder) -> dict`` is called every ``eval.knn_every`` steps on the main process
    (see :func:`wildssl.eval.online.make_online_knn`)."""
    out_dir = Path(out_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = pick_device()
    tcfg = config["train"]
    torch.manual_seed(tcfg["seed"])  # identical initial weights on every rank

    method = build_method(config).to(device)
    streams = type(method).streams
    sources = {}
    for name in streams:
        spec = config["data"][name]
        if not spec:
            raise ConfigError(f"no data for stream {name!r}: set data.{name} to a data SPEC (a folder, a .jsonl "
                              "manifest, tar shards or synthetic:scenes)")
        sources[name] = open_source(spec, load_size=config["data"]["load_size"])
    global_batch = tcfg["batch_size"]
    batch_sizes = {name: (global_batch if index == 0 else
                          config["data"][f"{name}_batch_size"] or method.stream_batch_size(name, global_batch))
                   for index, name in enumerate(streams)}
    first = sources[streams[0]]
    steps_per_epoch = len(first) // global_batch
    total_steps = (steps_from_epochs(tcfg["epochs"], len(first), global_batch)
                   if tcfg["epochs"] is not None else tcfg["steps"])
    if tcfg["compile"]:
        for networks in (method.student, method.teacher):
            if networks is not None:
                networks["backbone"].compile()
    model = method
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(method, config["optim"]["betas"])
    schedules = build_schedules(config, total_steps, global_batch, max(steps_per_epoch, 1))
    method_schedules = method.schedules(total_steps, max(steps_per_epoch, 1))
    freeze_steps = int(round(config["optim"]["freeze_last_layer_epochs"] * max(steps_per_epoch, 1)))

    start_step = 0
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if checkpoint_path.is_file():
        if not resume:
            raise CheckpointError(f"run directory {out_dir} already holds a checkpoint; pass --resume to "
                                  "continue it or choose another --out")
        check_resume_config(read_checkpoint_config(checkpoint_path), config, str(checkpoint_path))
        start_step = load_training_checkpoint(checkpoint_path, method, optimizer)["step"]
        log.info("resumed %s at step %d", checkpoint_path, start_step)
    elif resume:
        log.info("no checkpoint in %s yet; starting at step 0", out_dir)

    main = dist.is_main_process()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(config))
    method.prepare(sources, out_dir)
    loaders = {}
    for index, name in enumerate(streams):
        sampler = StepBatchSampler(len(sources[name]), batch_sizes[name], total_steps, start_step,
                                   tcfg["seed"] + 7919 * index, rank, world)
        loaders[name] = DataLoader(sources[name], batch_sampler=sampler, num_workers=config["data"]["num_workers"],
                                   collate_fn=collate, pin_memory=device.type == "cuda",
                                   generator=torch.Generator().manual_seed(tcfg["seed"]))  # global RNG untouched
    logger = MetricLogger(out_dir, tensorboard=tcfg["tensorboard"]) if main else None
    monitor = CollapseMonitor(after_step=max(1, total_steps // 10))
    params = [p for p in method.parameters() if p.requires_grad]
    summary = {"run_dir": str(out_dir), "start_step": start_step, "total_steps": total_steps,
               "nonfinite_steps": 0, "corrupt_images": 0, "alarms": []}

    def save(step: int) -> None:
        if main:
            extra = {k: summary[k] for k in ("nonfinite_steps", "corrupt_images")}
            save_training_checkpoint(checkpoint_path, method, optimizer, step, config, extra)
            if tcfg["keep_every"] and step % tcfg["keep_every"] == 0:
                save_training_checkpoint(out_dir / f"checkpoint_{step:07d}.safetensors", method, optimizer,
                                         step, config, extra)
        dist.barrier()

    progress = None
    if main and tcfg["progress"]:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc=config["method"]["name"],
                        unit="step", dynamic_ncols=True)
    window_start, window_steps, last_metrics = time.perf_counter(), 0, {}
    step = start_step
    with _InterruptFlag() as interrupt:
        for step, stream_batches in enumerate(zip(*loaders.values()), start=start_step):
            batches = {name: to_device(batch, device) for name, batch in zip(streams, stream_batches)}
            summary["corrupt_images"] += sum(int(b.get("num_corrupt", 0)) for b in batches.values())
            apply_schedules(optimizer, float(schedules["lr"][step]), float(schedules["weight_decay"][step]),
                            freeze_last_layer=step < freeze_steps)
            generator = torch.Generator(device=device).manual_seed(view_seed(tcfg["seed"], step, rank))
            context = StepContext(step, total_steps, generator,
                                  {k: float(v[step]) for k, v in method_schedules.items()},
                                  log=(step + 1) % tcfg["log_every"] == 0 or step + 1 == total_steps)
            with autocast_context(tcfg["precision"], device):
                output = model(batches, context)
            loss = output["loss"]
            flags = torch.tensor([float(not torch.isfinite(loss.detach()).item()), float(interrupt.raised)],
                                 device=device)
            if dist.is_distributed():  # every rank takes the same branch
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            if flags[0] > 0:
                summary["nonfinite_steps"] += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite loss at step %d (%d so far): step skipped", step,
                            summary["nonfinite_steps"])
                if tcfg["nonfinite"] == "stop" or summary["nonfinite_steps"] > tcfg["max_nonfinite"]:
                    raise TrainingStopped(
                        f"training stopped at step {step}: {summary['nonfinite_steps']} non-finite losses "
                        f"(train.nonfinite={tcfg['nonfinite']}, train.max_nonfinite={tcfg['max_nonfinite']}); "
                        f"the last good checkpoint is kept in {out_dir}")
            else:
                loss.backward()
                clip = config["optim"]["clip_grad"]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                method.update_teacher(float(schedules["momentum"][step]))
            done = step + 1
            window_steps += 1

            if done % tcfg["log_every"] == 0 or done == total_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {"loss": float(loss.detach()), "lr": float(schedules["lr"][step]),
                           "weight_decay": float(schedules["weight_decay"][step]),
                           "momentum": float(schedules["momentum"][step]),
                           "grad_norm": float(grad_norm) if flags[0] == 0 else float("nan"),
                           "images_per_s": window_steps * sum(batch_sizes.values()) / max(elapsed, 1e-9),
                           "epoch": done / max(steps_per_epoch, 1)}
                metrics.update({k: float(v) for k, v in output.get("metrics", {}).items()})
                alarms = monitor.check(done, metrics)
                for alarm in alarms:
                    if alarm not in summary["alarms"]:
                        summary["alarms"].append(alarm)
                        log.warning("step %d: %s", done, alarm)
                if logger is not None:
                    logger.log(done, metrics)
                if progress is not None:
                    remaining = (total_steps - done) * elapsed / max(window_steps, 1)
                    postfix = {"loss": f"{metrics['loss']:.4f}", "img/s": f"{metrics['images_per_s']:.0f}",
                               "eta": format_duration(remaining)}
                    if alarms:
                        postfix["ALARM"] = alarms[0].split(":")[1].split("(")[0].strip()
                    progress.set_postfix(postfix, refresh=False)
                last_metrics = metrics
                window_start, window_steps = time.perf_counter(), 0
            if progress is not None:
                progress.update(1)

            every = config["eval"]["knn_every"]
            if knn_evaluator is not None and every and (done % every == 0 or done == total_steps):
                if main:
                    result = knn_evaluator(method)
                    last_metrics.update(result)
                    if logger is not None:
                        logger.log(done, result)
                    log.info("step %d: %s", done, ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
                dist.barrier()

            if flags[1] > 0:
                save(done)
                if progress is not None:
                    progress.close()
                raise KeyboardInterrupt(f"interrupted at step {done}; checkpoint saved to {checkpoint_path} "
                                        "(continue with --resume)")
            if done == total_steps or (tcfg["checkpoint_every"] and done % tcfg["checkpoint_every"] == 0):
                save(done)
    if progress is not None:
        progress.close()
    if logger is not None:
        logger.close()
    summary.update({"steps": total_steps, "final_metrics": last_metrics})
    if math.isfinite(last_metrics.get("loss", float("nan"))):
        summary["final_loss"] = last_metrics["loss"]
    return summary

