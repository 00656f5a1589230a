"""AdamW parameter groups and per-iteration schedules.

Every schedule is an array indexed by iteration (as DINOv2's ``build_schedulers``): the engine reads
``schedule[step]`` each step, so resuming at step s gives exactly the values an unbroken run had.
Freezing the prototype layer for the first steps is a zero-lr span on its parameter group (DINO's
"freeze last layer"), which needs no special code path in the loop.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

# Parameters that get no weight decay whatever their shape (besides biases and norm weights).
NO_WEIGHT_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "logit_scale")


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then a half-cosine from
    ``base`` to ``final`` over the remaining steps. Returns float64 values, shape ``(total_steps,)``."""
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    remaining = total_steps - warmup_steps
    progress = np.arange(remaining) / max(remaining, 1)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * progress))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def parameter_groups(model: nn.Module) -> list[dict]:
    """Split trainable parameters into four AdamW groups.

    Biases, norm weights (every parameter with ``ndim <= 1``) and position/cls/register/mask tokens get
    no weight decay (``wd_scale = 0``). Parameters whose name contains ``last_layer`` (DINO's prototype
    layer) form their own groups so the engine can give them zero learning rate while frozen.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and not any(token in name for token in NO_WEIGHT_DECAY_NAMES)
        last_layer = "last_layer" in name
        groups.setdefault((decay, last_layer), []).append(param)
    return [
        {"params": params, "wd_scale": 1.0 if decay else 0.0, "is_last_layer": last_layer,
         "weight_decay": 0.0}
        for (decay, last_layer), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; lr and weight decay are set by :func:`apply_schedules`."""
    return torch.optim.AdamW(parameter_groups(model), lr=0.0, betas=tuple(betas), weight_decay=0.0)


def build_schedules(config: dict, total_steps: int, global_batch_size: int,
                    steps_per_epoch: int) -> dict[str, np.ndarray]:
    """Per-iteration ``lr``, ``weight_decay`` and ``momentum`` (EMA teacher) arrays from the config.

    ``optim.lr`` is the rate for a global batch of ``optim.lr_batch_reference`` images and scales
    linearly with the batch (Goyal et al. 2017, as DINO/MAE); set the reference to null for an absolute lr.
    """
    optim = config["optim"]
    reference = optim["lr_batch_reference"]
    peak_lr = optim["lr"] * (global_batch_size / reference if reference else 1.0)
    warmup = int(round(optim["warmup_epochs"] * steps_per_epoch))
    wd_end = optim["weight_decay"] if optim["weight_decay_end"] is None else optim["weight_decay_end"]
    ema = config["ema"]
    return {
        "lr": cosine_schedule(peak_lr, optim["min_lr"], total_steps, warmup),
        "weight_decay": cosine_schedule(optim["weight_decay"], wd_end, total_steps),
        "momentum": cosine_schedule(ema["momentum"], ema["momentum_end"], total_steps),
    }


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                    freeze_last_layer: bool) -> None:
    """Write this step's lr and weight decay into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if (freeze_last_layer and group["is_last_layer"]) else lr
        group["weight_decay"] = weight_decay * group["wd_scale"]


def steps_from_epochs(epochs: float, dataset_size: int, global_batch_size: int) -> int:
    """Convert epochs (passes over the data source) to iterations, with drop-last batches."""
    per_epoch = dataset_size // global_batch_size
    return max(1, int(math.ceil(epochs * per_epoch)))
