import math

import pytest
import torch

from wildssl.errors import ConfigError
from wildssl.models.position import freeze_sincos_positions, sincos_position_embedding
from wildssl.models.vit import VisionTransformer


def test_sincos_table_matches_the_formula_column_half_then_row_half():
    height, width, dim = 3, 5, 8
    table = sincos_position_embedding((height, width), dim)
    assert table.shape == (1, height * width, dim) and table.dtype == torch.float32
    quarter = dim // 4
    for row in range(height):
        for col in range(width):
            expected = []
            for position in (col, row):
                omegas = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
                expected += [math.sin(position * w) for w in omegas] + [math.cos(position * w) for w in omegas]
            torch.testing.assert_close(table[0, row * width + col], torch.tensor(expected, dtype=torch.float32))


def test_sincos_table_gives_distinct_positions_and_needs_a_width_divisible_by_four():
    table = sincos_position_embedding((6, 6), 16)[0]
    distances = torch.cdist(table, table) + torch.eye(36) * 10
    assert distances.min() > 0.1
    with pytest.raises(ConfigError, match="divisible by 4"):
        sincos_position_embedding((2, 2), 6)


def test_freeze_sincos_positions_writes_the_table_and_stops_its_gradient():
    encoder = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    freeze_sincos_positions(encoder)
    assert not encoder.pos_embed.requires_grad
    torch.testing.assert_close(encoder.pos_embed.detach(), sincos_position_embedding((4, 4), 16))
