"""A learned logit scale (CLIP's temperature), shared by CLIP and annotation bootstrapping's t_AB."""

from __future__ import annotations

import math

import torch
from torch import nn

MAX_LOGIT_SCALE = 100.0


class LogitScale(nn.Module):
    """The learned temperature of CLIP, stored as ``log_scale = log(1/T)`` (init ``T = 0.07``).

    ``forward()`` returns ``exp(log_scale)``. The *parameter* is clamped to ``[0, ln 100]`` after every
    optimizer step (:meth:`commit_step`, called by the engine), as open_clip and SLIP do (Radford et al.
    2021, Sec. 2.5: it keeps training stable). Clamping the output instead would zero the gradient once
    the scale passed 100, and the parameter could then never come back down. The parameter is
    0-dimensional, so the usual ``ndim < 2`` rule keeps it out of weight decay.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = MAX_LOGIT_SCALE):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def commit_step(self) -> None:
        self.log_scale.clamp_(0.0, self.max_log_scale)
