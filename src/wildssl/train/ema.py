"""Exponential moving average of the student's weights into the teacher (BYOL, DINO)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every teacher parameter, in place.

    Parameters are paired by name, so the student may hold more modules than the teacher (e.g. the
    annotation-bootstrapping decoder, which has no EMA copy); every teacher parameter must exist in the
    student with the same shape. ``lerp`` with weight ``1 - momentum`` is exactly a no-op at momentum 1
    (the teacher never moves). Buffers are not averaged: methods own their buffers (e.g. DINO's center).
    """
    student_params = dict(student.named_parameters())
    teacher_params, sources = [], []
    for name, param in teacher.named_parameters():
        if name not in student_params or student_params[name].shape != param.shape:
            raise ValueError(f"teacher parameter {name} has no matching student parameter")
        teacher_params.append(param)
        sources.append(student_params[name].detach())
    if momentum >= 1.0 or not teacher_params:
        return
    torch._foreach_lerp_(teacher_params, sources, 1.0 - momentum)
