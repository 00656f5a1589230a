"""WSP loss: softmax cross-entropy against the normalized multi-hot target (SWAG).

Mahajan et al., "Exploring the Limits of Weakly Supervised Pretraining" (ECCV 2018, Sec. 2) and SWAG
(Singh et al., CVPR 2022, Sec. 3.2) train on an image's K hashtags with a softmax over the label
vocabulary and the target ``y / sum(y)`` (each of the image's labels gets ``1 / |labels|``), which they
found better than per-label sigmoids. For logits ``z`` ``(B, K)`` and multi-hot ``y`` ``(B, K)``::

    loss_b = - sum_k  y_bk / sum_j y_bj  *  log_softmax(z_b)_k

averaged over the images that have at least one label; images without one (a caption with no vocabulary
word) carry no target, as SWAG leaves images without hashtags out of its data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def wsp_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over labelled rows of the cross-entropy above: ``(B, K), (B, K) -> ()``, in fp32.

    ``targets``: multi-hot (0/1, any float or bool dtype). A batch without any labelled row gives a zero
    that still depends on ``logits`` (so every rank's backward runs the same graph)."""
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"wsp_loss needs logits and targets of one (B, K) shape, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    # A softmax over thousands of labels in bf16 loses the small probabilities; compute in fp32.
    with torch.autocast(device_type=logits.device.type, enabled=False):
        targets = targets.float()
        counts = targets.sum(dim=1)
        labelled = counts > 0
        if not bool(labelled.any()):
            return logits.float().sum() * 0.0
        distribution = targets[labelled] / counts[labelled, None]
        return -(distribution * F.log_softmax(logits[labelled].float(), dim=1)).sum(dim=1).mean()
