"""MAE (methods/mae.py): the encoder sees the visible patches only, the decoder puts them back in place,
and a short CPU run lowers the loss and beats its own random initialization on k-NN."""

import pytest
import torch

from conftest import tiny_overrides, train_and_compare_knn, xfail_under_goal
from wildssl.errors import ConfigError
from wildssl.losses.mae_loss import mae_loss, patchify
from wildssl.methods import build_method
from wildssl.methods.base import StepContext
from wildssl.models.position import sincos_position_embedding
from wildssl.train.config import build_config


def _tiny_mae(*extra):
    torch.manual_seed(0)
    return build_method(build_config("mae_quick", tiny_overrides("mae", *extra)))


def test_mae_encoder_sees_only_visible_patches_so_hidden_pixels_change_nothing():
    method = _tiny_mae().eval()
    images = torch.randn(4, 3, 16, 16)
    keep, mask = method.draw_masks(4, torch.Generator().manual_seed(1), images.device)
    assert keep.shape == (4, 4) and (mask.sum(dim=1) == 12).all()  # 16 patches, 75% hidden, per image
    entering = []
    method.student["backbone"].blocks[0].register_forward_pre_hook(lambda m, args: entering.append(args[0]))
    predictions = method.predict_pixels(images, keep)
    assert entering[0].shape == (4, 1 + 4, 32)  # cls + the 4 visible patches: no padding, no mask tokens
    # Scramble every hidden patch's pixels: what the encoder sees, and so every prediction, is unchanged.
    hidden = mask.view(4, 1, 4, 1, 4, 1).expand(4, 3, 4, 4, 4, 4).reshape(4, 3, 16, 16)
    scrambled = torch.where(hidden, torch.randn_like(images) * 5, images)
    torch.testing.assert_close(method.predict_pixels(scrambled, keep), predictions, rtol=0, atol=0)
    assert not torch.equal(method.predict_pixels(images + 0.5 * ~hidden, keep), predictions)


def test_mae_decoder_puts_visible_tokens_at_their_positions_and_mask_tokens_elsewhere():
    method = _tiny_mae().eval()
    decoder = method.student["decoder"]
    images = torch.randn(2, 3, 16, 16)
    keep, mask = method.draw_masks(2, torch.Generator().manual_seed(2), images.device)
    entering = []
    decoder.blocks[0].register_forward_pre_hook(lambda m, args: entering.append(args[0]))
    method.predict_pixels(images, keep)
    tokens = decoder.embed(method.student["backbone"].forward_features(images, keep_indices=keep))
    positions = sincos_position_embedding((4, 4), 32)[0]
    x = entering[0]
    assert x.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(x[:, 0], tokens[:, 0])  # cls: no position embedding
    for b in range(2):
        for slot, patch in enumerate(keep[b].tolist()):
            torch.testing.assert_close(x[b, 1 + patch], tokens[b, 1 + slot] + positions[patch])
        for patch in mask[b].nonzero().flatten().tolist():
            torch.testing.assert_close(x[b, 1 + patch], decoder.mask_token[0, 0] + positions[patch])


def test_mae_step_is_the_masked_loss_of_its_view_and_positions_are_frozen():
    method = _tiny_mae()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = method({"train": {"image": images, "aspect": torch.ones(4)}},
                 StepContext(0, 10, torch.Generator().manual_seed(3)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert not method.student["backbone"].pos_embed.requires_grad  # fixed sine-cosine, as the paper
    assert method.student["decoder"].mask_token.grad.abs().sum() > 0
    no_decay = {id(p) for g in method.parameter_groups() if g["wd_scale"] == 0 for p in g["params"]}
    assert id(method.student["decoder"].mask_token) in no_decay
    # The loss of an all-zero prediction is the mean squared norm-pix target over hidden patches: 1 - 1/P.
    patches = patchify(torch.randn(2, 3, 16, 16), 4)
    mask = torch.rand(2, 16) < 0.75
    zero = mae_loss(torch.zeros_like(patches), patches, mask)
    torch.testing.assert_close(zero, torch.tensor((48 - 1) / 48), rtol=1e-4, atol=1e-4)


def test_mae_rejects_a_mask_ratio_outside_zero_one():
    with pytest.raises(ConfigError, match="mask_ratio"):
        _tiny_mae("method.mask_ratio=1.0")


# A 2 x 64 encoder is cheap enough for 200 steps (seed 0: 27.2% vs 19.0% at random init). Two settings
# make the shapes learnable in a short run, both measured on the two-colour scenes:
# - patch 4 (the recipe's 8 x 8 grid) instead of E2E's 8: on a 4 x 4 grid a quarter of the patches
#   says almost nothing about the main object's outline (60 steps: +1.4 points at patch 8, +3.4 at 4);
# - mask_ratio 0.5: with half the 64 patches visible the outline can be inferred, so the encoder learns
#   it (patch 4, 60 steps: +5.2 points at 0.5, +3.4 at 0.75). Longer runs help at 0.5 (+8.2 at 200 steps);
#   at 0.75 they do not (norm_pix_loss off, 200 steps: +0.8), the task stays unsolvable.
# Measured spread: seed 1 of this setting gives +4.0, so the margin at seed 0 is not large.
MAE_E2E = ["model.depth=2", "model.embed_dim=64", "model.patch_size=4", "train.batch_size=32", "train.steps=200",
           "optim.lr=0.003", "method.mask_ratio=0.5", "method.decoder_dim=64", "method.decoder_depth=1",
           "method.decoder_heads=4", "method.crop_scale=[0.35, 1.0]"]


@pytest.mark.slow
def test_mae_training_lowers_the_loss_and_beats_its_random_init_on_knn(tmp_path):
    losses, trained, initial = train_and_compare_knn("mae", tmp_path, *MAE_E2E)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert trained > initial, (trained, initial)  # it learned something the k-NN can use
    xfail_under_goal("MAE", trained, initial)  # +5 holds at seed 0, not at seed 1 (+4.0)
