"""AdamW parameter groups and per-iteration schedules.

Every schedule is an array indexed by iteration (as DINOv2's ``build_schedulers``): the engine reads
``schedule[step]`` each step, so resuming at step s gives exactly the values an unbroken run had.
Freezing the prototype layer for the first steps is a zero-lr span on its parameter group (DINO's
"freeze last layer"), which needs no special code path in the loop. The groups themselves are declared
by the method (:meth:`wildssl.methods.base.Method.parameter_groups`).
"""

from __future__ import annotations

import numpy as np
import torch

from wildssl.schedules import cosine_schedule


FUSED_DEVICES = ("cuda", "cpu")  # where PyTorch has a fused AdamW kernel (the CPU one since torch 2.4)


def build_optimizer(parameter_groups: list[dict], betas=(0.9, 0.999), fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the groups a method declares (:meth:`wildssl.methods.base.Method.parameter_groups`);
    lr and weight decay are set every step by :func:`apply_schedules`. ``fused``: one kernel for the
    whole update (the engine sets it on the devices of ``FUSED_DEVICES``), else PyTorch's foreach default.
    The two agree to float rounding; on the CPU the fused update of ``dino_quick``'s parameters takes 0.3x
    the foreach one's time (benchmarks/demo.md, twenty-ninth round)."""
    return torch.optim.AdamW(parameter_groups, lr=0.0, betas=tuple(betas), weight_decay=0.0,
                             fused=True if fused else None)


def peak_lr(config: dict, global_batch_size: int) -> float:
    """``optim.lr`` scaled to the global batch (see :func:`build_schedules`): the rate the warm-up climbs to."""
    optim = config["optim"]
    reference = optim["lr_batch_reference"]
    return optim["lr"] * (global_batch_size / reference if reference else 1.0)


def warmup_steps(config: dict, steps_per_epoch: int) -> int:
    """``optim.warmup_epochs`` in steps."""
    return int(round(config["optim"]["warmup_epochs"] * steps_per_epoch))


def build_schedules(config: dict, total_steps: int, global_batch_size: int,
                    steps_per_epoch: int) -> dict[str, np.ndarray]:
    """Per-iteration ``lr``, ``weight_decay`` and ``momentum`` (EMA teacher) arrays from the config.

    ``optim.lr`` is the rate for a global batch of ``optim.lr_batch_reference`` images and scales
    linearly with the batch (Goyal et al. 2017, as DINO/MAE); set the reference to null for an absolute lr.
    """
    optim = config["optim"]
    wd_end = optim["weight_decay"] if optim["weight_decay_end"] is None else optim["weight_decay_end"]
    ema = config["ema"]
    return {
        "lr": cosine_schedule(peak_lr(config, global_batch_size), optim["min_lr"], total_steps,
                              warmup_steps(config, steps_per_epoch)),
        "weight_decay": cosine_schedule(optim["weight_decay"], wd_end, total_steps),
        "momentum": cosine_schedule(ema["momentum"], ema["momentum_end"], total_steps),
    }


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                    freeze_last_layer: bool) -> None:
    """Write this step's lr (times the group's ``lr_scale``) and weight decay (times its ``wd_scale``)
    into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if (freeze_last_layer and group["is_last_layer"]) else lr * group["lr_scale"]
        group["weight_decay"] = weight_decay * group["wd_scale"]
