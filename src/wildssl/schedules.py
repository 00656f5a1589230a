"""Per-iteration schedules shared by the training shell (lr, weight decay, EMA momentum: ``train/optim.py``) and
the methods (e.g. DINO's KoLeo weight), which may not import ``train/``."""

from __future__ import annotations

import numpy as np


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
