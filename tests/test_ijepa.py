"""I-JEPA (methods/ijepa.py): contexts never hold a target patch and reach every position (padded, not
truncated), the predictor ignores padding, targets are layer-normalized EMA-encoder tokens, and a short
CPU run lowers the loss and beats its own random initialization on k-NN."""

import math

import pytest
import torch

from conftest import tiny_overrides, train_and_compare_knn, xfail_under_goal
from wildssl.errors import ConfigError
from wildssl.losses.ijepa_loss import ijepa_loss, layer_normalized_targets
from wildssl.methods import build_method
from wildssl.methods.base import StepContext
from wildssl.train.config import build_config


def _tiny_ijepa(*extra):
    torch.manual_seed(0)
    return build_method(build_config("ijepa_quick", tiny_overrides("ijepa", *extra)))


def _batch(count, size=16):
    return {"train": {"image": torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8),
                      "aspect": torch.ones(count)}}


def test_ijepa_context_never_holds_a_target_and_every_position_can_be_context():
    # An 8 x 8 grid (32 px, patch 4) so the blocks have room; the method's own options and mask draws.
    method = _tiny_ijepa("model.img_size=32", "method.crop_size=32", "method.min_context=4")
    seen_by_encoder, seen_by_predictor = [], []
    method.student["backbone"].register_forward_hook(
        lambda m, args, kwargs, out: seen_by_encoder.append((kwargs["keep_indices"], kwargs["keep_valid"])),
        with_kwargs=True)
    method.student["predictor"].register_forward_hook(lambda m, args, out: seen_by_predictor.append(args[3]))
    for seed in range(2):
        method(_batch(16, 32), StepContext(seed, 10, torch.Generator().manual_seed(seed)))
    for (context, valid), targets in zip(seen_by_encoder, seen_by_predictor):
        lengths = valid.sum(dim=1)
        assert lengths.min() < context.shape[1]  # contexts differ in size: padded, not truncated
        for row in range(16):
            kept = context[row][valid[row]]
            assert len(set(kept.tolist())) == len(kept) >= 4
            assert not set(kept.tolist()) & set(targets[row].flatten().tolist())
    # Over many steps every one of the 64 positions is in some context, the corners and the centre included.
    covered = torch.zeros(64, dtype=torch.bool)
    for seed in range(40):
        masks = method.draw_masks(16, torch.Generator().manual_seed(100 + seed))
        covered[masks.context[masks.context_valid]] = True
    assert covered.all(), (~covered).nonzero().flatten().tolist()


def test_ijepa_predictor_gives_a_padded_context_its_unpadded_predictions():
    method = _tiny_ijepa().eval()
    predictor = method.student["predictor"]
    context = torch.randn(2, 5, 32)
    index = torch.tensor([[0, 5, 6, 9, 15], [1, 2, 3, 0, 0]])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    targets = torch.tensor([[[10, 11], [12, 13]], [[4, 8], [12, 13]]])
    padded = predictor(context, index, valid, targets)
    alone = predictor(context[1:, :3], index[1:, :3], valid[1:, :3], targets[1:])
    torch.testing.assert_close(padded[1], alone[0], rtol=1e-5, atol=1e-5)
    assert padded.shape == (2, 2, 2, 32)
    unmasked = predictor(context, index, torch.ones_like(valid), targets)  # padding would leak without the mask
    assert (unmasked[1] - alone[0]).abs().max() > 1e-4
    # Each block is predicted on its own: changing block 1's positions leaves block 0's predictions alone.
    moved = predictor(context, index, valid, torch.tensor([[[10, 11], [1, 2]], [[4, 8], [14, 15]]]))
    torch.testing.assert_close(moved[:, 0], padded[:, 0], rtol=1e-5, atol=1e-5)


def test_ijepa_targets_are_layer_normalized_tokens_gathered_per_block_float64():
    tokens = torch.randn(2, 6, 5, dtype=torch.float64) * 4 + 2
    index = torch.tensor([[[0, 1], [5, 2]], [[3, 3], [4, 0]]])
    targets = layer_normalized_targets(tokens, index)
    for b in range(2):
        for m in range(2):
            for t in range(2):
                values = tokens[b, index[b, m, t]].tolist()
                mean = sum(values) / 5
                var = sum((v - mean) ** 2 for v in values) / 5  # biased, as LayerNorm
                expected = torch.tensor([(v - mean) / math.sqrt(var + 1e-5) for v in values], dtype=torch.float64)
                torch.testing.assert_close(targets[b, m, t], expected)


def test_ijepa_loss_is_smooth_l1_as_released_or_mean_squared_error():
    predictions = torch.tensor([[0.0, 3.0], [0.5, -2.0]], dtype=torch.float64)
    targets = torch.zeros(2, 2, dtype=torch.float64)
    # Huber with beta 1: 0.5 x^2 inside |x| < 1, |x| - 0.5 outside; mean over elements.
    torch.testing.assert_close(ijepa_loss(predictions, targets), torch.tensor((0 + 2.5 + 0.125 + 1.5) / 4,
                                                                             dtype=torch.float64))
    torch.testing.assert_close(ijepa_loss(predictions, targets, "l2"), torch.tensor((9 + 0.25 + 4) / 4,
                                                                                  dtype=torch.float64))
    with pytest.raises(ConfigError, match="method.loss"):
        ijepa_loss(predictions, targets, "cosine")


def test_ijepa_teacher_is_an_ema_of_the_backbone_only_and_is_what_evaluation_reads():
    method = _tiny_ijepa()
    assert list(method.teacher) == ["backbone"] and method.eval_network == "teacher"
    assert method.encoder() is method.teacher["backbone"]
    out = method(_batch(8), StepContext(0, 10, torch.Generator().manual_seed(0)))
    out["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())  # targets carry no gradient
    assert method.student["backbone"].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for param in method.student.parameters():
            param.add_(1.0)
    before = method.teacher["backbone"].blocks[0].mlp.fc1.weight.clone()
    method.update_teacher(0.75)
    after = method.teacher["backbone"].blocks[0].mlp.fc1.weight
    student = method.student["backbone"].blocks[0].mlp.fc1.weight
    torch.testing.assert_close(after, 0.75 * before + 0.25 * student)
    assert out["metrics"]["embedding_std"] > 0.5  # per-token targets spread (no collapse at init)


def test_ijepa_rejects_an_unknown_loss():
    with pytest.raises(ConfigError, match="method.loss"):
        _tiny_ijepa("method.loss=cosine")


# E2E's 4 x 128 encoder at patch 8 learns nothing useful in 100 steps (teacher 23.2%, student 22.4% vs
# 23.6% at init): on a 4 x 4 grid the target blocks are 2-3 patches and the context a handful, so
# there is little to predict. Measured instead (seed 0, the recipe's EMA 0.99 -> 1):
# - patch 4: the recipe's 8 x 8 grid, where its target blocks (15-20% of the patches) are shapes' parts;
# - a 2 x 64 encoder and predictor, batch 32: cheap enough for 200 steps at lr 0.003;
# - the EMA teacher stays slow: a fast one (0.9, on E2E's encoder) let the loss fall to 0.05 with no
#   gain (21.4% vs 23.6%): the targets follow the student too closely to teach it anything.
# Result: the teacher (what evaluation reads) 24.6% vs 19.0% at init; the student alone 21.2%.
# Measured spread: seed 1 of this setting gives 21.4% vs 19.2% (+2.2).
IJEPA_E2E = ["model.depth=2", "model.embed_dim=64", "model.patch_size=4", "train.batch_size=32", "train.steps=200",
             "optim.lr=0.003", "method.predictor_dim=64", "method.predictor_depth=2", "method.predictor_heads=4"]


@pytest.mark.slow
def test_ijepa_training_lowers_the_loss_and_beats_its_random_init_on_knn(tmp_path):
    losses, trained, initial = train_and_compare_knn("ijepa", tmp_path, *IJEPA_E2E)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert trained > initial, (trained, initial)  # it learned something the k-NN can use
    xfail_under_goal("I-JEPA", trained, initial)  # seed 0: +5 on an Intel Xeon, +3.6 on an AMD EPYC; seed 1 +2.2
