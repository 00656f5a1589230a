"""One optimization step, guarded: a step whose loss or gradient norm is not finite changes nothing.

Nothing moves on such a step: not the weights, not the optimizer's moments, not the method's state
(its pending updates are discarded, see :mod:`wildssl.methods.base`). Every rank takes the same branch:
the flags are reduced over ranks, and the gradient norm is computed after DDP has averaged the
gradients, so it is the same number on every rank.

The host reads one thing from the device per step: the three flags (loss not finite, gradient norm not
finite, some rank asked to stop), stacked into one tensor, reduced over ranks in one call and read in one
transfer. The backward pass therefore runs before the loss is known to be finite (a non-finite loss gives
non-finite gradients, which are then dropped), so that no sync sits between the forward and the backward
pass. The loss, the gradient norm and the method's metrics stay on the device; the loop reads them only
on the steps it logs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from wildssl import distributed as dist
from wildssl.data.sampler import view_seed
from wildssl.methods.base import StepContext
from wildssl.train.optim import apply_schedules
from wildssl.train.run import Run


@dataclass
class StepResult:
    loss: torch.Tensor  # detached, on the device
    metrics: dict  # the method's metrics (device tensors or floats)
    grad_norm: torch.Tensor  # on the device; not finite when the step was skipped
    finite: bool  # False: the step was skipped
    interrupted: bool  # some rank asked to stop (Ctrl-C) during this step


def autocast_context(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def device_batches(run: Run, stream_batches) -> dict[str, dict]:
    """The loaders' batches of one step (one per stream, in ``run.streams`` order) on the run's device; the
    JPEGs the workers left undecoded (``data.decode: gpu``) are decoded there first."""
    batches = {}
    for name, batch in zip(run.streams, stream_batches):
        if name in run.decoders:
            batch = run.decoders[name](batch)
        batches[name] = to_device(batch, run.device)
    return batches


def step_context(run: Run, step: int) -> StepContext:
    generator = torch.Generator(device=run.device).manual_seed(view_seed(run.config["train"]["seed"], step, run.rank))
    log_every = run.config["train"]["log_every"]
    return StepContext(step, run.total_steps, generator,
                       {k: float(v[step]) for k, v in run.method_schedules.items()},
                       log=(step + 1) % log_every == 0 or step + 1 == run.total_steps)


def training_step(run: Run, batches: dict[str, dict], step: int,
                  interrupt_requested: Callable[[], bool] = lambda: False) -> StepResult:
    """Forward, backward, clip and step, or skip when the loss or the gradient norm is not finite.

    ``interrupt_requested()`` is asked after the forward pass, and the answer reduced over ranks with the
    finiteness flags, so that every rank stops at the same step boundary."""
    config = run.config
    apply_schedules(run.optimizer, float(run.schedules["lr"][step]), float(run.schedules["weight_decay"][step]),
                    freeze_last_layer=step < run.freeze_steps)
    run.method.begin_step()
    with autocast_context(config["train"]["precision"], run.device):
        output = run.model(batches, step_context(run, step))
    loss = output["loss"]
    interrupt = float(interrupt_requested())
    loss.backward()
    clip = config["optim"]["clip_grad"]
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"), foreach=True).detach()
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 (train.sharding=fsdp): the norm of sharded gradients is a DTensor
        grad_norm = grad_norm.full_tensor()
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(), (~torch.isfinite(grad_norm)).float().to(loss.device),
                         torch.full((), interrupt, device=loss.device)])
    if dist.is_distributed():  # every rank takes the same branch
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    loss_nonfinite, norm_nonfinite, interrupted = flags.tolist()  # the step's one device-to-host read
    finite = not (loss_nonfinite or norm_nonfinite)
    if finite:
        run.optimizer.step()
        run.method.commit_step()
        run.method.update_teacher(float(run.schedules["momentum"][step]))
    else:
        run.method.discard_step()
        run.counters["nonfinite_steps"] += 1
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss.detach(), output.get("metrics", {}), grad_norm, finite, interrupted > 0)
