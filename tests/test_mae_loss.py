import math

import pytest
import torch

from wildssl.errors import ConfigError
from wildssl.losses.mae_loss import mae_loss, normalized_pixel_targets, patchify, unpatchify


def test_patchify_rows_are_patches_in_grid_order_with_row_col_channel_inside():
    images = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    patches = patchify(images, 4)  # grid 2 x 3
    assert patches.shape == (2, 6, 48)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                expected = [float(images[b, c, 4 * i + r, 4 * j + q]) for r in range(4) for q in range(4)
                            for c in range(3)]
                assert patches[b, i * 3 + j].tolist() == expected
    torch.testing.assert_close(unpatchify(patches, 4, (2, 3)), images, rtol=0, atol=0)


def test_norm_pix_targets_match_a_float64_formula():
    torch.manual_seed(0)
    patches = torch.randn(3, 5, 12, dtype=torch.float64) * 3 + 1
    targets = normalized_pixel_targets(patches)
    for b in range(3):
        for n in range(5):
            values = patches[b, n].tolist()
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # unbiased, as released
            expected = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
            torch.testing.assert_close(targets[b, n], torch.tensor(expected, dtype=torch.float64))


def test_mae_loss_is_the_mean_error_over_masked_patches_only():
    torch.manual_seed(1)
    predictions = torch.randn(2, 6, 12, dtype=torch.float64, requires_grad=True)
    patches = torch.randn(2, 6, 12, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, False, False, True], [False, True, False, False, False, False]])
    loss = mae_loss(predictions, patches, mask)
    targets = normalized_pixel_targets(patches)
    errors = [((predictions[b, n] - targets[b, n]) ** 2).mean() for b in range(2) for n in range(6) if mask[b, n]]
    torch.testing.assert_close(loss, torch.stack(errors).mean())
    loss.backward()
    assert (predictions.grad[~mask] == 0).all()  # a visible patch's prediction is not trained
    assert (predictions.grad[mask].abs().sum(dim=-1) > 0).all()
    # Raw pixels when norm_pix is off.
    raw = mae_loss(predictions.detach(), patches, mask, norm_pix=False)
    expected = torch.stack([((predictions[b, n] - patches[b, n]) ** 2).mean() for b in range(2) for n in range(6)
                            if mask[b, n]]).mean()
    torch.testing.assert_close(raw, expected)


def test_mae_loss_rejects_shapes_that_disagree():
    with pytest.raises(ConfigError, match="mae_loss"):
        mae_loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.bool))
