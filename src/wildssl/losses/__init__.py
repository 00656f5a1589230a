"""Loss functions as pure functions of tensors; the methods in ``wildssl.methods`` compose them."""

from __future__ import annotations

from wildssl.losses.dino_loss import (
    DINOCenter,
    dino_cross_entropy,
    entropy,
    teacher_probabilities,
    teacher_temperature_schedule,
)
from wildssl.losses.nt_xent import nt_xent_loss

__all__ = [
    "DINOCenter",
    "dino_cross_entropy",
    "entropy",
    "nt_xent_loss",
    "teacher_probabilities",
    "teacher_temperature_schedule",
]
