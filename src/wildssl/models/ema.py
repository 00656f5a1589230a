"""Exponential moving average of the student's weights into the teacher (BYOL, DINO)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every teacher parameter and
    floating-point buffer, in place; other buffers (BatchNorm's batch counter) are copied.

    Entries are paired by name, so the student may hold more modules than the teacher (e.g. the
    annotation-bootstrapping decoder, which has no EMA copy); every teacher entry must exist in the
    student with the same shape. ``lerp`` with weight ``1 - momentum`` is exactly a no-op at momentum 1
    (the teacher never moves).

    Buffers follow the student like the weights do: a teacher runs in eval mode, so its BatchNorm layers
    normalize with these running statistics (the EMA of the student's), never with the batch's. State a
    method keeps outside its networks (DINO's center) is not touched.
    """
    if not 0.0 <= momentum <= 1.0:  # also NaN: -1 moved the teacher past the student, NaN filled it with NaN
        raise ValueError(f"EMA momentum={momentum!r} must be in [0, 1] (1: the teacher never moves)")
    student_params = dict(student.named_parameters())
    student_buffers = dict(student.named_buffers())
    targets, sources = [], []
    for name, param in teacher.named_parameters():
        source = student_params.get(name)
        if source is None or source.shape != param.shape:
            raise ValueError(f"teacher parameter {name} has no matching student parameter")
        targets.append(param)
        sources.append(source.detach())
    copies = []
    for name, buffer in teacher.named_buffers():
        source = student_buffers.get(name)
        if source is None or source.shape != buffer.shape:
            raise ValueError(f"teacher buffer {name} has no matching student buffer")
        if buffer.is_floating_point():
            targets.append(buffer)
            sources.append(source)
        else:
            copies.append((buffer, source))
    if momentum >= 1.0:
        return
    if targets:
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)
    for buffer, source in copies:
        buffer.copy_(source)
