"""DINOv2's KoLeo term as a method option (:func:`wildssl.losses.koleo_loss.koleo_loss`), for any method that
pools one feature per image and view: its keys, their checks, the weight's schedule and the weighted term.

- ``koleo_weight``: the term's weight (0 = off);
- ``koleo_weight_end``: its weight at the end, reached by a half-cosine (null: constant, as DINOv2);
- ``koleo_decay_fraction``: the share of the run that half-cosine takes; the weight stays at ``koleo_weight_end``
  after it.
"""

from __future__ import annotations

import numpy as np
import torch

from wildssl.distributed import get_world_size
from wildssl.errors import ConfigError
from wildssl.losses.koleo_loss import koleo_loss
from wildssl.schedules import cosine_schedule

KOLEO_DEFAULTS = {"koleo_weight": 0.0, "koleo_weight_end": None, "koleo_decay_fraction": 1.0}


class KoLeoTerm:
    """The weighted KoLeo term of a method whose ``options`` hold :data:`KOLEO_DEFAULTS`'s keys."""

    def __init__(self, options: dict, config: dict):
        self.options = options
        self.enabled = max(options["koleo_weight"], options["koleo_weight_end"] or 0.0) > 0
        per_rank = config["train"]["batch_size"] // get_world_size()
        if self.enabled and per_rank < 2:
            raise ConfigError(f"method.koleo_weight={options['koleo_weight']} pairs each image with its nearest "
                              f"neighbour in the batch, and a rank gets {per_rank} image(s) of train.batch_size="
                              f"{config['train']['batch_size']}: raise the batch to 2 per rank or set "
                              "method.koleo_weight=0")

    def schedules(self, total_steps: int) -> dict[str, np.ndarray]:
        """``{"koleo_weight": per-step weights}`` when the term is on, else nothing."""
        if not self.enabled:
            return {}
        start, end = self.options["koleo_weight"], self.options["koleo_weight_end"]
        end = start if end is None else end
        falling = max(1, min(total_steps, round(self.options["koleo_decay_fraction"] * total_steps)))
        return {"koleo_weight": np.concatenate([cosine_schedule(start, end, falling),
                                                np.full(total_steps - falling, end, dtype=np.float64)])}

    def add(self, loss: torch.Tensor, metrics: dict, features: list[torch.Tensor], values: dict) -> torch.Tensor:
        """``loss`` plus this step's weight times the KoLeo of each ``(B, D)`` view batch in ``features``, summed
        (DINOv2: one term per global crop); the unweighted sum goes to ``metrics["koleo"]``."""
        if not self.enabled:
            return loss
        koleo = sum(koleo_loss(f) for f in features)
        metrics["koleo"] = koleo.detach()
        return loss + values["koleo_weight"] * koleo  # method.schedules() gives the weight every step
