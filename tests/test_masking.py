"""Masks are drawn as specified: ratios, block shapes and I-JEPA's context, checked over many draws."""

import math

import pytest
import torch

from wildssl.data.masking import blockwise_mask, blockwise_masks, multiblock_masks, random_masking


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_random_masking_keeps_the_same_number_of_sorted_distinct_patches_per_image():
    keep, mask = random_masking(64, 49, 0.75, _generator())
    assert keep.shape == (64, round(49 * 0.25))
    assert (keep[:, 1:] > keep[:, :-1]).all()  # sorted and distinct
    assert (mask.sum(dim=1) == 49 - keep.shape[1]).all()
    assert not mask.gather(1, keep).any()  # kept patches are exactly the unmasked ones


def test_random_masking_is_uniform_over_positions():
    keep, _ = random_masking(4000, 16, 0.75, _generator(1))
    counts = torch.bincount(keep.flatten(), minlength=16).double()
    expected = 4000 * 4 / 16
    # Each position is kept with probability 1/4: a binomial; 5 sigma bounds.
    assert (counts - expected).abs().max() < 5 * math.sqrt(4000 * 0.25 * 0.75)


def test_blockwise_mask_reaches_but_never_exceeds_its_ratio_and_is_made_of_rectangles():
    generator = _generator(2)
    counts = []
    for _ in range(300):
        mask = blockwise_mask((14, 14), 0.4, generator)
        counts.append(int(mask.sum()))
    target = round(0.4 * 196)
    assert max(counts) <= target
    assert sum(counts) / len(counts) > 0.9 * target  # stops short only rarely


def test_blockwise_masks_draw_each_image_ratio_uniformly_from_the_range():
    masks = blockwise_masks(2000, (14, 14), (0.1, 0.5), _generator(3))
    ratios = masks.double().mean(dim=1)
    assert ratios.min() >= 0.0 and ratios.max() <= 0.5 + 1 / 196
    # U[0.1, 0.5]: mean 0.3, std 0.115; the realized ratio sits a little under the drawn one.
    assert abs(ratios.mean().item() - 0.3) < 0.02
    assert abs(ratios.std().item() - 0.4 / math.sqrt(12)) < 0.02
    fixed = blockwise_masks(50, (8, 8), (0.25, 0.25), _generator(4))
    assert (fixed.sum(dim=1) <= 16).all() and fixed.sum(dim=1).double().mean() > 14


def test_multiblock_targets_have_the_drawn_size_and_aspect_and_never_enter_the_context():
    grid = (14, 14)
    for seed in range(30):
        masks = multiblock_masks(8, grid, _generator(seed))
        assert masks.targets.shape[:2] == (8, 4)
        size = masks.targets.shape[2]
        assert 0.15 * 196 * 0.5 <= size <= 0.2 * 196 * 1.5  # area from (0.15, 0.2), rounded to whole rows
        for row in range(8):
            context = set(masks.context[row][masks.context_valid[row]].tolist())
            targets = set(masks.targets[row].flatten().tolist())
            assert context and not context & targets
            for block in masks.targets[row]:
                rows = (block // 14).unique()
                cols = (block % 14).unique()
                assert len(rows) * len(cols) == len(block)  # a full rectangle
                assert 0.75 * 0.6 <= len(rows) / len(cols) <= 1.5 / 0.6


def test_multiblock_contexts_are_padded_not_truncated_so_every_position_can_be_context():
    seen = torch.zeros(196, dtype=torch.bool)
    shortest_vs_longest = []
    for seed in range(40):
        masks = multiblock_masks(16, (14, 14), _generator(seed))
        lengths = masks.context_valid.sum(dim=1)
        shortest_vs_longest.append((int(lengths.min()), masks.context.shape[1]))
        seen[masks.context[masks.context_valid]] = True
    assert seen.all()  # the centre included: the official collator's truncation would bias this
    assert any(low < high for low, high in shortest_vs_longest)  # padding really happens


def test_masks_are_reproducible_from_the_generator_seed():
    a = multiblock_masks(4, (8, 8), _generator(9))
    b = multiblock_masks(4, (8, 8), _generator(9))
    assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)
    assert torch.equal(blockwise_masks(4, (8, 8), (0.1, 0.5), _generator(5)),
                       blockwise_masks(4, (8, 8), (0.1, 0.5), _generator(5)))
    with pytest.raises(Exception, match="mask ratio"):
        random_masking(2, 4, 1.0, _generator())
