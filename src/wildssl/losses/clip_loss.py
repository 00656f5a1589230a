"""CLIP contrastive loss (Radford et al. 2021, Fig. 3 pseudocode) with a cross-rank gather.

Each rank scores its own ``B`` images against the ``world_size * B`` texts of all ranks (and its own
texts against all images); the positive of local row ``i`` is global column ``rank * B + i``. The
gather carries gradient, so after DDP averages parameter gradients the result equals the single-process
loss on the global batch (see ``wildssl.distributed.gather_with_grad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wildssl.distributed import gather_with_grad, get_rank

def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE between paired image and text embeddings.

    ``image_emb``, ``text_emb``: ``(B, D)``, row ``i`` of each from the same pair, unnormalized (they are
    l2-normalized here). ``logit_scale``: scalar tensor, the multiplier ``exp(t)`` of the cosine logits
    (what :class:`wildssl.models.logit_scale.LogitScale` returns), not its log. With ``gather`` the negatives come from every rank
    (every rank must pass the same ``B``). Returns the scalar
    ``(CE(s * I T_all^T, labels) + CE(s * T I_all^T, labels)) / 2`` with ``labels = rank * B + arange(B)``.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(
            f"clip_loss needs two (B, D) tensors of one shape, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    # Cosines times a scale near 100 lose ~0.4 logit units of resolution in bf16; keep the logits in fp32.
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        image = F.normalize(image_emb.float(), dim=-1)
        text = F.normalize(text_emb.float(), dim=-1)
        scale = logit_scale.float()
        if gather:
            all_image, all_text = gather_with_grad(image), gather_with_grad(text)
            offset = get_rank() * image.shape[0]
        else:
            all_image, all_text, offset = image, text, 0
        labels = offset + torch.arange(image.shape[0], device=image.device)
        image_to_text = F.cross_entropy(scale * image @ all_text.T, labels)
        text_to_image = F.cross_entropy(scale * text @ all_image.T, labels)
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def clip_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Fraction of images whose most similar text in the local batch is their own: ``(B, D), (B, D) -> ()``."""
    if image_emb.shape != text_emb.shape:  # 4 images against 5 texts read as an accuracy
        raise ValueError(f"clip_accuracy needs image and text embeddings of one shape (B, D), got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    similarity = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T
    target = torch.arange(similarity.shape[0], device=similarity.device)
    return (similarity.argmax(dim=1) == target).float().mean()
