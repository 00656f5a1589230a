import logging

import numpy as np
import pytest
import torch
from torch import nn

from wildssl.data.sample import Source, make_sample
from wildssl.errors import ConfigError
from wildssl.eval import discovery
from wildssl.eval.discovery import (attention_mass_mask, corloc_hit, discover, jaccard, largest_component,
                                    mask_box)
from wildssl.models.vit import VisionTransformer


def test_attention_mass_mask_keeps_the_fewest_top_patches_holding_the_mass():
    attention = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    # sorted: 0.4, 0.3 (0.7 >= 0.6: stop) -> patches 1 and 3
    assert attention_mass_mask(attention, 0.6).tolist() == [[False, True, False, True, False]]
    # 0.4 alone is below 0.75, 0.4 + 0.3 = 0.7 too, + 0.15 = 0.85 crosses: three patches
    assert attention_mass_mask(attention * 7.0, 0.75).tolist() == [[False, True, False, True, True]]
    assert attention_mass_mask(attention, 1.0).all()
    with pytest.raises(ConfigError):
        attention_mass_mask(attention, 0.0)


def test_largest_component_is_four_connected_and_its_box_is_normalized():
    mask = np.array([[1, 1, 0, 0],
                     [0, 1, 0, 1],
                     [0, 0, 1, 1],
                     [0, 0, 0, 1]], dtype=bool)
    component = largest_component(mask)
    # (1,3),(2,2),(2,3),(3,3) is 4 cells; the diagonal (1,1)-(2,2) does not join the first one (3 cells)
    assert component.sum() == 4 and component[2, 2] and not component[1, 1]
    torch.testing.assert_close(mask_box(component), torch.tensor([0.5, 0.25, 1.0, 1.0]))
    assert not largest_component(np.zeros((3, 3), dtype=bool)).any()


def test_jaccard_and_corloc_match_hand_computed_values():
    predicted = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    truth = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert jaccard(predicted, truth) == pytest.approx(2 / 5)  # intersection 2, union 5
    valid = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert jaccard(predicted, truth, valid) == pytest.approx(2 / 4)
    box = torch.tensor([0.0, 0.0, 0.5, 0.5])
    assert corloc_hit(box, torch.tensor([[0.0, 0.0, 0.5, 0.6], [0.6, 0.6, 1.0, 1.0]]))  # IoU 0.25/0.30 = 0.83
    assert corloc_hit(box, torch.tensor([[0.0, 0.0, 1.0, 0.5]]))  # IoU exactly 0.25 / 0.5 = 0.5 counts
    assert not corloc_hit(box, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))  # IoU 0.25
    assert not corloc_hit(box, torch.zeros(0, 4))


GRID = 4


class _Scenes(Source):
    """Two 16-px images: image 0 (black) with a box and a mask, image 1 (white) with a box only."""

    classes = None
    load_size = 16

    def __len__(self):
        return 2

    def __getitem__(self, index):
        boxes = [[0.0, 0.0, 0.5, 0.6]] if index == 0 else [[0.75, 0.75, 1.0, 1.0]]
        return make_sample(torch.full((3, 16, 16), 255 * index, dtype=torch.uint8), 1.0, index, boxes=boxes,
                           box_labels=[0])

    def mask(self, index):
        if index == 1:
            return None
        mask = torch.zeros(16, 16, dtype=torch.long)
        mask[:10, :8] = 1  # foreground: rows 0-9, columns 0-7 ...
        mask[9, :8] = 255  # ... whose last row is ignored
        return mask

    def describe(self):
        return "two constructed images"


class _AttentionStub(nn.Module):
    """An encoder whose last-block cls attention is given (the same in both heads). Image 0: 0.22 on each
    of the top-left 2x2 patches. Image 1: 0.4 on the bottom-right patch, 0.2 on its left neighbour and
    0.3 on the top-left patch (a one-cell component that is found first but is not the largest)."""

    class_token, num_prefix_tokens, patch_size = True, 1, 16 // GRID

    def last_block_attention(self, images):
        rows = []
        for image in images:
            if image.mean() < 0:  # black: image 0
                cls_row = torch.full((GRID * GRID,), 0.12 / 12)
                cls_row[[0, 1, 4, 5]] = 0.22
            else:
                cls_row = torch.full((GRID * GRID,), 0.1 / 13)
                cls_row[[15, 14, 0]] = torch.tensor([0.4, 0.2, 0.3])
            rows.append(torch.cat([torch.zeros(1), cls_row]))
        attention = torch.zeros(len(images), 2, 1 + GRID * GRID, 1 + GRID * GRID)
        attention[:, :, 0] = torch.stack(rows)[:, None]
        return attention


def test_discovery_scores_constructed_attention_as_computed_by_hand(tmp_path):
    result = discover(_AttentionStub(), _Scenes(), image_size=16, mass=0.85, background=0, ignore_index=255,
                      pictures=2, out_dir=tmp_path)
    # image 0: the four 0.22 patches (0.66 before the fourth < 0.85, 0.88 before the fifth): the top-left
    # quadrant, box (0, 0, .5, .5) vs (0, 0, .5, .6): IoU 0.83, a hit; Jaccard: its 8x8 pixels inside the
    # 9x8 valid foreground pixels = 64 / 72.
    # image 1: 0.4, 0.3, 0.2 are kept (0.7 before the third); the largest component is the two bottom-right
    # cells, box (.5, .75, 1, 1) vs (.75, .75, 1, 1): IoU 0.5, a hit (the top-left cell would miss).
    assert result["corloc"] == pytest.approx(1.0) and result["num_corloc_images"] == 2
    assert result["jaccard"] == pytest.approx(64 / 72) and result["num_jaccard_images"] == 1
    assert result["background"] == 0  # what the Jaccard's foreground excludes, recorded with the figure
    assert (tmp_path / result["pictures"][0]).is_file()


def test_a_background_value_no_mask_holds_is_a_warning_and_scores_against_the_whole_image(tmp_path, caplog):
    # background=300 is a valid integer but no mask value: every valid pixel is then foreground. The figure is what
    # the option asks for (image 0's 4 attention patches = 64 of the 240 valid pixels), with one warning that says so.
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        result = discover(_AttentionStub(), _Scenes(), image_size=16, mass=0.85, background=300, pictures=0)
    assert result["jaccard"] == pytest.approx(64 / (256 - 8))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no mask of two constructed images holds the background value 300" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        discover(_AttentionStub(), _Scenes(), image_size=16, mass=0.85, background=0, pictures=0)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_discovery_needs_a_class_token():
    encoder = VisionTransformer(img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2, class_token=False)
    with pytest.raises(ConfigError, match="no class token"):
        discovery.cls_attention(encoder, torch.zeros(1, 3, 16, 16))
