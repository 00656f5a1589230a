"""I-JEPA's prediction loss (Assran et al. 2023, Sec. 3, Eq. 1): the distance between the predictor's
outputs and the target encoder's tokens of the target blocks, after a layer norm without parameters
over the feature axis (the released code's ``F.layer_norm(h, (h.size(-1),))``).

Eq. 1 of the paper writes the squared L2 distance, averaged over the ``M`` blocks; the released code
trains with ``F.smooth_l1_loss`` (Huber, beta 1) averaged over every element. Both are here:
``"smooth_l1"`` (the default, as released) and ``"l2"`` (Eq. 1 divided by the constant ``T * D``: the
mean squared error per element).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wildssl.errors import ConfigError

LOSSES = ("smooth_l1", "l2")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def layer_normalized_targets(tokens: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """Target encoder patch tokens ``(B, N, D)`` -> the layer-normalized tokens of the target blocks
    ``(B, M, T, D)`` at ``target_index`` ``(B, M, T)``: per token, minus its mean over ``D``, divided
    by ``sqrt(biased variance + 1e-5)``; computed in float32 (float64 inputs stay float64)."""
    batch, blocks, size = target_index.shape
    normalized = F.layer_norm(_at_least_fp32(tokens), (tokens.shape[-1],))
    index = target_index.reshape(batch, blocks * size, 1).expand(-1, -1, tokens.shape[-1])
    return normalized.gather(1, index).reshape(batch, blocks, size, tokens.shape[-1])


def ijepa_loss(predictions: torch.Tensor, targets: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """Mean over every element of ``predictions`` and ``targets`` ``(B, M, T, D)`` of the smooth L1
    (beta 1) or squared difference; fp32 at least. ``targets`` carry no gradient (the EMA target encoder)."""
    if predictions.shape != targets.shape:
        raise ConfigError(f"ijepa_loss: predictions {tuple(predictions.shape)} and targets "
                          f"{tuple(targets.shape)} must have the same shape")
    if kind == "smooth_l1":
        return F.smooth_l1_loss(_at_least_fp32(predictions), _at_least_fp32(targets), beta=1.0)
    if kind == "l2":
        return F.mse_loss(_at_least_fp32(predictions), _at_least_fp32(targets))
    raise ConfigError(f"method.loss={kind!r} is not one of {', '.join(LOSSES)}")
