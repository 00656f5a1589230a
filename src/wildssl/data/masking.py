"""Which patches a masked-image-modeling step hides: random (MAE), blockwise (BEiT / iBOT / SlotMIM)
and multi-block (I-JEPA).

Every function draws from the ``torch.Generator`` it is given, so masks are reproducible per step like
the views are. Patch ``(row, col)`` of an ``(h, w)`` grid has index ``row * w + col``, the order of the
encoder's patch tokens. Masks are built on the CPU (they are small) and moved by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from wildssl.errors import ConfigError


def cpu_generator(generator: torch.Generator) -> torch.Generator:
    """A CPU generator derived from ``generator`` (a step's view generator may live on the GPU), so that
    the masks of a step are the same on every device."""
    if generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed() ^ 0x3A5C)


def _uniform(low: float, high: float, generator: torch.Generator, shape=()) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------- MAE

def random_masking(batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-image random masking with the same number of visible patches in every image.

    Returns ``(keep, mask)``: ``keep`` ``(B, K)`` long, the visible patch indices of each image in
    increasing order, ``K = round(N * (1 - mask_ratio))`` (at least 1); ``mask`` ``(B, N)`` bool, True
    where a patch is hidden. Every image keeps exactly K patches, so the encoder runs on ``(B, K)``
    tokens with no padding (He et al. 2022, Sec. 3).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"mask ratio {mask_ratio} must be in [0, 1)")
    keep_count = max(1, int(round(num_patches * (1.0 - mask_ratio))))
    noise = torch.rand(batch, num_patches, generator=generator)
    keep = noise.argsort(dim=1)[:, :keep_count].sort(dim=1).values
    mask = torch.ones(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, keep, False)
    return keep, mask


# ------------------------------------------------------------------------------------ BEiT / iBOT blocks

def blockwise_mask(grid: tuple[int, int], mask_ratio: float, generator: torch.Generator, min_block: int = 4,
                   aspect: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10) -> torch.Tensor:
    """One image's blockwise mask (BEiT, Bao et al. 2022, Alg. 1; iBOT's ``MaskingGenerator``): ``(h, w)`` bool.

    Rectangular blocks are added until ``round(mask_ratio * h * w)`` patches are masked: each block has
    an area uniform in ``[min_block, patches still to mask]`` and a log-uniform aspect ratio in
    ``aspect``, at a uniform position; a block that would mask nothing new is redrawn (up to
    ``attempts`` times), and so is one that would mask more than the patches still to mask. The count
    therefore never exceeds the target; it can stop short of it when no block fits, as in BEiT.
    """
    height, width = grid
    target = int(round(mask_ratio * height * width))
    mask = torch.zeros(height, width, dtype=torch.bool)
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while count < target:
        remaining = target - count
        added = 0
        for _ in range(attempts):
            area = float(_uniform(min_block, remaining, generator))
            ratio = math.exp(float(_uniform(log_low, log_high, generator)))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if not (1 <= h <= height and 1 <= w <= width):
                continue
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            block = mask[top: top + h, left: left + w]
            added = int((~block).sum())
            if 0 < added <= remaining:
                block.fill_(True)
                break
            added = 0
        if added == 0:
            break
        count += added
    return mask


def blockwise_masks(batch: int, grid: tuple[int, int], ratio_range: tuple[float, float],
                    generator: torch.Generator, min_block: int = 4) -> torch.Tensor:
    """``(B, h * w)`` bool: a :func:`blockwise_mask` per image, each with its own ratio drawn uniformly from
    ``ratio_range`` (iBOT's prediction ratio, e.g. (0.1, 0.5); a range (r, r) fixes it)."""
    low, high = ratio_range
    if not 0.0 <= low <= high < 1.0:
        raise ConfigError(f"mask ratio range {ratio_range} must satisfy 0 <= low <= high < 1")
    ratios = _uniform(low, high, generator, (batch,))
    return torch.stack([blockwise_mask(grid, float(r), generator, min_block).flatten() for r in ratios])


# ------------------------------------------------------------------------------------ I-JEPA multi-block

@dataclass
class MultiBlockMasks:
    """I-JEPA's masks of a batch.

    ``context`` ``(B, C)`` long: the context patch indices of each image, padded to the longest context
    of the batch (``C``); ``context_valid`` ``(B, C)`` bool, False on padding (pass it as an attention
    mask; never truncate contexts to the shortest, which would bias them away from the centre).
    ``targets`` ``(B, M, T)`` long: ``M`` target blocks of ``T`` patches each (the block size is drawn
    once per batch, so all images have the same ``T``).
    """

    context: torch.Tensor
    context_valid: torch.Tensor
    targets: torch.Tensor


def _block_size(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float],
                generator: torch.Generator) -> tuple[int, int]:
    height, width = grid
    area = float(_uniform(*scale, generator)) * height * width
    ratio = float(_uniform(*aspect, generator))
    h = max(1, min(height, int(round(math.sqrt(area * ratio)))))
    w = max(1, min(width, int(round(math.sqrt(area / ratio)))))
    return h, w


def _place_block(grid: tuple[int, int], size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    height, width = grid
    h, w = size
    top = int(torch.randint(0, height - h + 1, (), generator=generator))
    left = int(torch.randint(0, width - w + 1, (), generator=generator))
    block = torch.zeros(height, width, dtype=torch.bool)
    block[top: top + h, left: left + w] = True
    return block


def multiblock_masks(batch: int, grid: tuple[int, int], generator: torch.Generator, num_targets: int = 4,
                     target_scale: tuple[float, float] = (0.15, 0.2), target_aspect: tuple[float, float] = (0.75, 1.5),
                     context_scale: tuple[float, float] = (0.85, 1.0), min_context: int = 4,
                     attempts: int = 20) -> MultiBlockMasks:
    """I-JEPA's multi-block masking (Assran et al. 2023, Sec. 3): per image, ``num_targets`` target blocks
    (area fraction in ``target_scale``, aspect ratio in ``target_aspect``) and one square-ish context
    block (area fraction in ``context_scale``) with every target patch removed from it.

    The target and context block sizes are drawn once per batch, their positions per image. A placement
    that leaves fewer than ``min_context`` context patches is redrawn (up to ``attempts`` times; then the
    targets are kept and the context is what remains, at least one patch)."""
    height, width = grid
    target_size = _block_size(grid, target_scale, target_aspect, generator)
    context_size = _block_size(grid, context_scale, (1.0, 1.0), generator)
    targets, contexts = [], []
    for _ in range(batch):
        for attempt in range(attempts):
            blocks = [_place_block(grid, target_size, generator) for _ in range(num_targets)]
            covered = torch.stack(blocks).any(dim=0)
            context = _place_block(grid, context_size, generator) & ~covered
            if int(context.sum()) >= min_context or attempt == attempts - 1:
                break
        if not context.any():  # the targets cover the context block: keep one uncovered patch, if any
            free = (~covered).flatten().nonzero().flatten()
            context = context.flatten()
            context[free[:1] if len(free) else torch.tensor([0])] = True
            context = context.view(height, width)
        targets.append(torch.stack([b.flatten().nonzero().flatten() for b in blocks]))
        contexts.append(context.flatten().nonzero().flatten())
    longest = max(len(c) for c in contexts)
    context_index = torch.zeros(batch, longest, dtype=torch.long)
    valid = torch.zeros(batch, longest, dtype=torch.bool)
    for row, indices in enumerate(contexts):
        context_index[row, : len(indices)] = indices
        valid[row, : len(indices)] = True
    return MultiBlockMasks(context_index, valid, torch.stack(targets))
