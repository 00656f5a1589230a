"""Exponential moving average of the student's weights into the teacher (BYOL, DINO)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter, in place.

    ``lerp`` with weight ``1 - momentum`` is exactly a no-op at momentum 1 (the teacher never moves).
    Buffers are not averaged: methods own their buffers (e.g. DINO's center).
    """
    teacher_params = [p for p in teacher.parameters()]
    student_params = [p.detach() for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise ValueError("teacher and student have different parameter lists")
    if momentum >= 1.0:
        return
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
