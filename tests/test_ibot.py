"""iBOT: masking, heads, which network sees what, and end-to-end training on synthetic scenes."""

import pytest
import torch

from conftest import (DISTILL, TINY_MODEL, TWO_BLOCKS, assert_no_collapse, schedule_values, train_and_compare_knn,
                      xfail_under_goal)
from wildssl.data import collate, open_source
from wildssl.errors import ConfigError
from wildssl.methods import build_method
from wildssl.methods.base import StepContext
from wildssl.methods.ibot import ibot_masks
from wildssl.train.config import build_config

TINY_IBOT = ["method.global_size=16", "method.local_size=8", "method.n_local=2", "method.out_dim=32",
             "method.patch_out_dim=32", "method.hidden_dim=32", "method.bottleneck_dim=16",
             "method.teacher_temp_warmup_epochs=1"]


def _method(*extra: str):
    return build_method(build_config("ibot_quick", TINY_MODEL + TINY_IBOT + list(extra)))


def _step(method, seed: int = 0) -> dict:
    source = open_source("synthetic:scenes?n=8&size=16&split=train", load_size=16)
    batch = collate([source[i] for i in range(8)])
    values = schedule_values(method, step=0, total_steps=10, steps_per_epoch=10)
    return method({"train": batch}, StepContext(0, 10, torch.Generator().manual_seed(seed), values))


def test_ibot_masks_leave_the_requested_share_of_crops_whole():
    generator = torch.Generator().manual_seed(0)
    masks = ibot_masks(300, (4, 4), (0.25, 0.25), generator, probability=0.5)
    masked = masks.any(dim=1).float().mean()
    assert abs(float(masked) - 0.5) < 0.09  # 3 standard deviations of a fair coin over 300 crops
    assert ibot_masks(50, (4, 4), (0.25, 0.25), generator, probability=1.0).any(dim=1).all()


def test_student_sees_the_masked_global_crops_and_the_teacher_the_whole_ones():
    method = _method("method.mask_probability=1.0")
    calls = {"student": [], "teacher": []}
    for name, networks in (("student", method.student), ("teacher", method.teacher)):
        networks["backbone"].register_forward_pre_hook(
            lambda module, args, kwargs, name=name: calls[name].append((args[0].shape, kwargs.get("mask"))),
            with_kwargs=True)
    _step(method)
    (teacher_shape, teacher_mask), = calls["teacher"]
    assert teacher_shape == (16, 3, 16, 16) and teacher_mask is None  # 2 global crops of 8 images, whole
    (global_shape, student_mask), (local_shape, local_mask) = calls["student"]
    assert global_shape == (16, 3, 16, 16) and student_mask.shape == (16, 16) and student_mask.any(dim=1).all()
    assert local_shape == (16, 3, 8, 8) and local_mask is None


def test_without_masked_patches_the_patch_loss_is_zero_and_the_loss_is_dinos():
    # without the recipe's KoLeo term (tests/test_koleo.py checks its share of the loss)
    output = _step(_method("method.mask_probability=0.0", "method.koleo_weight=0"))
    metrics = output["metrics"]
    assert float(metrics["masked_fraction"]) == 0.0 and float(metrics["patch_loss"]) == 0.0
    assert torch.isclose(output["loss"], metrics["cls_loss"])
    weighted = _step(_method("method.mask_probability=1.0", "method.patch_loss_weight=0.3", "method.koleo_weight=0"))
    parts = weighted["metrics"]
    assert float(parts["patch_loss"]) > 0
    assert torch.isclose(weighted["loss"].detach(), parts["cls_loss"] + 0.3 * parts["patch_loss"])


def test_the_students_head_reads_only_the_masked_patches_and_the_loss_is_the_head_on_every_patch():
    """The student's head runs on the masked patches alone (the cheaper step); the patch loss and its gradient
    on the head equal iBOT's formula with the head on every patch (float64, here), the unmasked ones masked out."""
    import copy

    method = _method("method.cls_loss_weight=0", "method.koleo_weight=0", "method.n_local=0",
                     "method.mask_probability=1.0")
    head = method.student["head"]
    reference_head = copy.deepcopy(head).double()  # the weights before the step, in float64
    seen = {}
    method.student["backbone"].register_forward_hook(
        lambda module, args, kwargs, output: seen.update(patch=output["patch"].detach(), mask=kwargs["mask"]),
        with_kwargs=True)
    head_rows = []
    head.mlp.register_forward_pre_hook(lambda module, args: head_rows.append(args[0].shape[0]))
    targets = method.patch_distillation.targets
    method.patch_distillation.targets = lambda *args: seen.update(probs=targets(*args)) or seen["probs"]
    loss = _step(method)["loss"]
    loss.backward()

    mask, patch = seen["mask"], seen["patch"]
    probs = seen["probs"].view(*mask.shape, -1).double()
    assert head_rows == [16 + int(mask.sum())]  # 2 global crops of 8 images: their image tokens, the masked patches
    assert int(mask.sum()) < mask.numel()  # some patches were left out
    bottleneck = torch.nn.functional.normalize(reference_head.mlp(patch.double()), dim=-1)
    logits = bottleneck @ torch.nn.functional.normalize(reference_head.last_layer.weight, dim=-1).T
    per_patch = -(probs * torch.log_softmax(logits / method.options["student_temp"], dim=-1)).sum(-1)
    per_image = (per_patch * mask).sum(1) / mask.sum(1).clamp(min=1)
    expected = per_image.mean()  # both crops hold 8 images, so this is the mean of the two crops' losses
    expected.backward()
    assert torch.isclose(loss.double(), expected, rtol=1e-5)
    for (name, ours), theirs in zip(head.named_parameters(), reference_head.parameters()):
        if ours.grad is not None or theirs.grad is not None:
            error = (ours.grad.double() - theirs.grad).norm() / theirs.grad.norm()
            assert error < 1e-4, (name, float(error))  # the step computes in float32


def test_separate_patch_prototypes_train_and_freeze_with_the_cls_prototypes():
    method = _method("method.shared_head=false", "method.patch_out_dim=24")
    head = method.student["head"]
    assert head.patch_last_layer is not None
    last_layer = {id(p) for group in method.parameter_groups() if group["is_last_layer"] for p in group["params"]}
    assert {id(p) for p in head.patch_last_layer.parameters() if p.requires_grad} <= last_layer
    trained = {id(p) for group in method.parameter_groups() for p in group["params"]}
    assert id(method.student["backbone"].mask_token) in trained  # iBOT trains the mask token
    assert _step(method)["metrics"]["patch_loss"] > 0
    with pytest.raises(ConfigError, match="patch_out_dim == out_dim"):
        _method("method.patch_out_dim=24")  # shared prototypes need one prototype set


def test_bad_mask_options_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="method.mask_ratio"):
        _method("method.mask_ratio=[0.5, 0.1]")
    with pytest.raises(ConfigError, match="method.mask_probability"):
        _method("method.mask_probability=1.5")


# The end-to-end test's settings: DINO's (conftest.DISTILL: two global crops of 128 images, no local crops, the mean
# patch token, 256 prototypes, teacher temperature 0.04, the paper's colours, a fast EMA teacher) plus iBOT's patch
# distillation at weight 0.3, on two blocks since 2026-12-02. With four blocks, gain at seeds 0 / 1 / 2 / 3 on this
# k-NN set: +7.0 / +4.8 / +8.4 / +6.4; on a 4x larger one +5.3 / +7.3 / +6.9 / +0.3 (benchmarks/masked.md,
# 2026-12-02). The former settings (the class token, 2 local crops, batch 64, temperatures 0.02) moved from +5.4 /
# +6.2 / +3.0 to +1.8 / +1.0 / +1.6 with float-level changes (4x set: at random init's level or below): noise around
# +3. At patch weight 1 these settings gave +0.4 / +5.6 at seeds 0 / 1. With two blocks (conftest.TWO_BLOCKS, an Intel
# Xeon, 2026-12-02): +7.4 / +2.8 / +11.2 at seeds 0 / 1 / 2, on the 4x set +9.5 / +8.5 / +6.2
# (benchmarks/e2e_seeds.md), in about 0.6x the time; seed 1 is under the goal at either depth.
IBOT_E2E = DISTILL + TWO_BLOCKS + ["method.patch_out_dim=256", "method.patch_loss_weight=0.3"]


@pytest.mark.slow
def test_ibot_training_beats_its_random_init_on_knn_without_collapse(tmp_path):
    entropies, trained, initial = train_and_compare_knn("ibot", tmp_path, *IBOT_E2E, metric="teacher_entropy")
    assert_no_collapse(entropies, prototypes=256)
    assert trained > initial, (trained, initial)  # it learned something the k-NN can use
    xfail_under_goal("iBOT", trained, initial)  # +4.8 at seed 1 (see above)
