"""Which patches a masked-image-modeling step hides: random (MAE), blockwise (BEiT / iBOT / SlotMIM)
and multi-block (I-JEPA).

Every function draws from the ``torch.Generator`` it is given, so masks are reproducible per step like
the views are. Patch ``(row, col)`` of an ``(h, w)`` grid has index ``row * w + col``, the order of the
encoder's patch tokens. Masks are built on the CPU (they are small) and moved by the caller; the block masks'
loops read Python floats drawn from the generator in chunks (:class:`_Uniforms`), not a torch call per number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from wildssl.errors import ConfigError


def cpu_generator(generator: torch.Generator) -> torch.Generator:
    """A CPU generator derived from ``generator`` (a step's view generator may live on the GPU), so that
    the masks of a step are the same on every device."""
    if generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed() ^ 0x3A5C)


class _Uniforms:
    """Uniform numbers in [0, 1) from a torch generator, drawn in chunks and handed out one at a time as Python
    floats. A block mask reads a few numbers per block, and a torch call per number cost more than the rest of
    the mask: iBOT's masks of the 1,024 global crops of 512 images at 224 px took 0.40-0.58 s a step on the CPU,
    now 0.03 s (benchmarks/masked.md, "Mask draws")."""

    CHUNK = 1024

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.values: list[float] = []
        self.next = 0

    def __call__(self) -> float:
        if self.next == len(self.values):
            self.values = torch.rand(self.CHUNK, generator=self.generator, dtype=torch.float64).tolist()
            self.next = 0
        self.next += 1
        return self.values[self.next - 1]


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

# BEiT's block shape: a log-uniform aspect ratio in this range, and this many draws per block before giving up.
BLOCK_ASPECT = (0.3, 1 / 0.3)
BLOCK_ATTEMPTS = 10


def _blockwise_mask(grid: tuple[int, int], mask_ratio: float, uniform: _Uniforms, min_block: int,
                    aspect: tuple[float, float], attempts: int) -> np.ndarray:
    height, width = grid
    target = int(round(mask_ratio * height * width))
    mask = np.zeros((height, width), dtype=bool)
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while count < target:
        remaining = target - count
        added = 0
        for _ in range(attempts):
            area = min_block + (remaining - min_block) * uniform()
            ratio = math.exp(log_low + (log_high - log_low) * uniform())
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if not (1 <= h <= height and 1 <= w <= width):
                continue
            top = int(uniform() * (height - h + 1))  # uniform over the height - h + 1 positions
            left = int(uniform() * (width - w + 1))
            block = mask[top: top + h, left: left + w]
            added = h * w - int(np.count_nonzero(block))
            if 0 < added <= remaining:
                block[...] = True
                break
            added = 0
        if added == 0:
            break
        count += added
    return mask


def blockwise_mask(grid: tuple[int, int], mask_ratio: float, generator: torch.Generator, min_block: int = 4,
                   aspect: tuple[float, float] = BLOCK_ASPECT, attempts: int = BLOCK_ATTEMPTS) -> torch.Tensor:
    """One image's blockwise mask (BEiT, Bao et al. 2022, Alg. 1; iBOT's ``MaskingGenerator``): ``(h, w)`` bool.

    Rectangular blocks are added until ``round(mask_ratio * h * w)`` patches are masked: each block has
    an area uniform in ``[min_block, patches still to mask]`` and a log-uniform aspect ratio in
    ``aspect``, at a uniform position; a block that would mask nothing new is redrawn (up to
    ``attempts`` times), and so is one that would mask more than the patches still to mask. The count
    therefore never exceeds the target; it can stop short of it when no block fits, as in BEiT.
    """
    return torch.from_numpy(_blockwise_mask(grid, mask_ratio, _Uniforms(generator), min_block, aspect, attempts))


def blockwise_masks(batch: int, grid: tuple[int, int], ratio_range: tuple[float, float],
                    generator: torch.Generator, min_block: int = 4) -> torch.Tensor:
    """``(B, h * w)`` bool: a :func:`blockwise_mask` per image, each with its own ratio drawn uniformly from
    ``ratio_range`` (iBOT's prediction ratio, e.g. (0.1, 0.5); a range (r, r) fixes it)."""
    low, high = ratio_range
    if not 0.0 <= low <= high < 1.0:
        raise ConfigError(f"mask ratio range {ratio_range} must satisfy 0 <= low <= high < 1")
    uniform = _Uniforms(generator)
    ratios = [low + (high - low) * uniform() for _ in range(batch)]
    masks = np.zeros((batch, grid[0] * grid[1]), dtype=bool)
    for row, ratio in enumerate(ratios):
        masks[row] = _blockwise_mask(grid, ratio, uniform, min_block, BLOCK_ASPECT, BLOCK_ATTEMPTS).reshape(-1)
    return torch.from_numpy(masks)


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
                uniform: _Uniforms) -> tuple[int, int]:
    height, width = grid
    area = (scale[0] + (scale[1] - scale[0]) * uniform()) * height * width
    ratio = aspect[0] + (aspect[1] - aspect[0]) * uniform()
    h = max(1, min(height, int(round(math.sqrt(area * ratio)))))
    w = max(1, min(width, int(round(math.sqrt(area / ratio)))))
    return h, w


def _place_block(grid: tuple[int, int], size: tuple[int, int], uniform: _Uniforms) -> np.ndarray:
    """``(h, w)`` bool: a block of ``size`` at a uniform position."""
    height, width = grid
    h, w = size
    top = int(uniform() * (height - h + 1))
    left = int(uniform() * (width - w + 1))
    block = np.zeros(grid, dtype=bool)
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
    uniform = _Uniforms(generator)
    target_size = _block_size(grid, target_scale, target_aspect, uniform)
    context_size = _block_size(grid, context_scale, (1.0, 1.0), uniform)
    targets, contexts = [], []
    for _ in range(batch):
        for attempt in range(attempts):
            blocks = [_place_block(grid, target_size, uniform) for _ in range(num_targets)]
            covered = np.logical_or.reduce(blocks)
            context = _place_block(grid, context_size, uniform) & ~covered
            if np.count_nonzero(context) >= min_context or attempt == attempts - 1:
                break
        context = context.reshape(-1)
        if not context.any():  # the targets cover the context block: keep one uncovered patch, if any
            free = np.flatnonzero(~covered)
            context[free[0] if len(free) else 0] = True
        targets.append(np.stack([np.flatnonzero(b) for b in blocks]))
        contexts.append(np.flatnonzero(context))
    longest = max(len(c) for c in contexts)
    context_index = np.zeros((batch, longest), dtype=np.int64)
    valid = np.zeros((batch, longest), dtype=bool)
    for row, indices in enumerate(contexts):
        context_index[row, : len(indices)] = indices
        valid[row, : len(indices)] = True
    return MultiBlockMasks(torch.from_numpy(context_index), torch.from_numpy(valid),
                           torch.from_numpy(np.stack(targets)))
