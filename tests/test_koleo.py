"""KoLeo (DINOv2's spreading term) against a float64 formula, and its place in DINO's loss."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_DISTILLATION, TINY_METHOD, TINY_MODEL, schedule_values, tiny_batch, tiny_config
from wildssl.errors import ConfigError
from wildssl.losses.koleo_loss import koleo_loss
from wildssl.methods import build_method
from wildssl.methods.base import StepContext
from wildssl.methods.dino import DINO
from wildssl.train.config import build_config


def reference_koleo(rows: list[list[float]], eps: float = 1e-8) -> float:
    """-mean_i log(min_{j != i} ||u_i - u_j|| + eps), u = x / ||x||, element by element in float64."""
    units = []
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        units.append([v / norm for v in row])
    total = 0.0
    for i, u in enumerate(units):
        nearest = min(math.sqrt(sum((a - b) ** 2 for a, b in zip(u, w))) for j, w in enumerate(units) if j != i)
        total += math.log(nearest + eps)
    return -total / len(units)


@pytest.mark.parametrize("shape", [(2, 3), (7, 5), (16, 4)])
def test_koleo_matches_the_float64_formula(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]), dtype=torch.float64)
    assert koleo_loss(x).item() == pytest.approx(reference_koleo(x.tolist()), rel=1e-5)


def test_koleo_is_scale_invariant_and_falls_as_the_batch_spreads():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(32, 8, generator=g)
    bunched = torch.ones(32, 8) + 0.05 * torch.randn(32, 8, generator=g)
    assert koleo_loss(3.0 * spread).item() == pytest.approx(koleo_loss(spread).item(), rel=1e-5)
    assert koleo_loss(spread) < koleo_loss(bunched) - 2.0
    # its gradient pushes each sample away from its nearest neighbour
    x = bunched.clone().requires_grad_(True)
    koleo_loss(x).backward()
    stepped = (x - 0.1 * x.grad).detach()
    assert koleo_loss(stepped) < koleo_loss(bunched)


def test_koleo_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        koleo_loss(torch.randn(1, 4))


def _dino_loss(weight: float, values: dict | None = None) -> tuple[float, dict]:
    config = tiny_config("dino", f"method.koleo_weight={weight}", "model.drop_path_rate=0.0")
    torch.manual_seed(0)
    method = build_method(config)
    step = StepContext(0, 10, torch.Generator().manual_seed(1), {**schedule_values(method), **(values or {})}, log=True)
    loss, metrics, _ = method.loss_and_latents(tiny_batch(8), step)
    return loss.item(), metrics


def test_dino_adds_the_weighted_koleo_of_its_student_global_crops():
    plain, plain_metrics = _dino_loss(0.0)
    with_koleo, metrics = _dino_loss(0.5)
    assert "koleo" not in plain_metrics
    # the same weights and crops: the two losses differ by exactly 0.5 x the sum over the two global crops
    assert metrics["koleo"].item() > 0
    assert with_koleo == pytest.approx(plain + 0.5 * metrics["koleo"].item(), rel=1e-5)


@pytest.mark.parametrize("value", ["-0.1", "true", "lots"])
def test_koleo_weight_must_be_a_non_negative_number(value):
    with pytest.raises(ConfigError, match="method.koleo_weight=.* is invalid.*: method.koleo_weight must be"):
        build_method(tiny_config("dino", f"method.koleo_weight={value}"))


def test_koleo_with_one_image_per_batch_is_a_config_error_naming_both_keys():
    # KoLeo needs a neighbour in the batch: batch 1 must fail when the method is built, in one line, not at
    # the first step with a traceback; without KoLeo the same batch builds.
    with pytest.raises(ConfigError, match=r"method.koleo_weight=0.5 .* train.batch_size=1: raise the batch"):
        build_method(tiny_config("dino", "method.koleo_weight=0.5", "train.batch_size=1"))
    build_method(tiny_config("dino", "method.koleo_weight=0", "train.batch_size=1"))


def test_koleo_weight_follows_a_half_cosine_to_its_end_value_and_the_loss_uses_this_steps_weight():
    total = 50
    method = build_method(tiny_config("dino", "method.koleo_weight=0.5", "method.koleo_weight_end=0.1",
                                      "method.koleo_decay_fraction=1"))
    weights = method.schedules(total, steps_per_epoch=10)["koleo_weight"]
    expected = [0.1 + 0.4 * (1 + math.cos(math.pi * t / total)) / 2 for t in range(total)]
    assert weights.tolist() == pytest.approx(expected, abs=1e-12)
    assert weights[0] == 0.5 and weights[-1] == pytest.approx(0.1, abs=1e-3)
    # null end value: constant, as DINOv2
    constant = build_method(tiny_config("dino", "method.koleo_weight=0.5", "method.koleo_weight_end=null"))
    constant = constant.schedules(total, 10)["koleo_weight"]
    assert constant.tolist() == [0.5] * total
    # the loss adds this step's weight (the schedule's value), not the configured start value
    plain, _ = _dino_loss(0.0)
    scheduled, metrics = _dino_loss(0.5, {"koleo_weight": 0.2})
    assert scheduled == pytest.approx(plain + 0.2 * metrics["koleo"].item(), rel=1e-5)


def test_koleo_weight_falls_over_the_given_share_of_the_run_and_then_holds_its_end_value():
    total, share = 60, 0.25
    method = build_method(tiny_config("dino", "method.koleo_weight=0.5", "method.koleo_weight_end=0.1",
                                      f"method.koleo_decay_fraction={share}"))
    weights = method.schedules(total, steps_per_epoch=10)["koleo_weight"]
    falling = 15  # a quarter of 60 steps
    expected = [0.1 + 0.4 * (1 + math.cos(math.pi * t / falling)) / 2 if t < falling else 0.1 for t in range(total)]
    assert weights.tolist() == pytest.approx(expected, abs=1e-12)
    # DINO's default is the whole run (the schedule of the test above); dino_quick's recipe sets a third
    assert DINO.defaults["koleo_decay_fraction"] == 1.0
    whole = build_method(tiny_config("dino", "method.koleo_weight=0.5", "method.koleo_weight_end=0.1",
                                     "method.koleo_decay_fraction=1"))
    assert whole.schedules(total, 10)["koleo_weight"][falling:].min() > 0.1 + 1e-6


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "most"])
def test_koleo_decay_fraction_must_be_a_share_of_the_run(value):
    with pytest.raises(ConfigError, match=r"method.koleo_decay_fraction=.* is invalid.*: "
                                          r"method.koleo_decay_fraction must be"):
        build_method(tiny_config("dino", "method.koleo_weight=0.5", f"method.koleo_decay_fraction={value}"))


def _simsiam_loss(weight: float, values: dict | None = None):
    config = tiny_config("simsiam", f"method.koleo_weight={weight}", "method.pool=avg")
    torch.manual_seed(0)
    method = build_method(config)
    step = StepContext(0, 10, torch.Generator().manual_seed(1), {**schedule_values(method), **(values or {})}, log=True)
    loss, metrics, _ = method.loss_and_latents(tiny_batch(8), step)
    return method, loss.item(), metrics


def test_simsiam_adds_this_steps_weight_times_the_koleo_of_each_views_pooled_backbone_features():
    from wildssl.methods.base import pooled

    _, plain, plain_metrics = _simsiam_loss(0.0)
    method, with_koleo, metrics = _simsiam_loss(0.5, {"koleo_weight": 0.2})
    assert "koleo" not in plain_metrics
    # the same views, drawn again from the same generator, through the same backbone: the float64 formula per view
    views = method.step_views(tiny_batch(8), torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = [pooled(method.student["backbone"](view.images), "avg").double().tolist() for view in views]
    expected = reference_koleo(features[0]) + reference_koleo(features[1])
    assert expected > 0
    assert metrics["koleo"].item() == pytest.approx(expected, rel=1e-4)
    assert with_koleo == pytest.approx(plain + 0.2 * expected, rel=1e-4)


def _ibot_step(weight: float, values: dict, pool: str):
    config = build_config("ibot_quick", TINY_MODEL + TINY_DISTILLATION + [
        "method.patch_out_dim=64", f"method.koleo_weight={weight}", "method.mask_probability=1.0",
        f"method.pool={pool}", "model.drop_path_rate=0.0"])
    torch.manual_seed(0)
    method = build_method(config)
    head_inputs = []  # the image tokens the student's head receives with the patch tokens
    forward_tokens = method.student["head"].forward_tokens
    method.student["head"].forward_tokens = lambda image, patch: (head_inputs.append(image.detach()),
                                                                  forward_tokens(image, patch))[1]
    output = method({"train": tiny_batch(8)}, StepContext(0, 10, torch.Generator().manual_seed(1),
                                                          {**schedule_values(method), **values}, log=True))
    return method, output["loss"].item(), output["metrics"], head_inputs


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_ibot_adds_this_steps_weight_times_the_koleo_of_the_students_image_token_of_each_masked_global_crop(pool):
    from wildssl.data.views import make_views
    from wildssl.methods.base import pooled
    from wildssl.methods.ibot import ibot_masks

    _, plain, plain_metrics, _ = _ibot_step(0.0, {}, pool)
    method, with_koleo, metrics, head_inputs = _ibot_step(0.5, {"koleo_weight": 0.2}, pool)
    assert "koleo" not in plain_metrics
    # the step's draws again from the same generator (views, then masks), through the same student: the float64
    # formula on the image token (method.pool) of each masked global crop (DINOv2's place for it)
    generator = torch.Generator().manual_seed(1)
    views = make_views(tiny_batch(8)["image"], method.specs, generator)
    images = torch.cat([view.images for view in views[:2]])
    masks = ibot_masks(16, method.student["backbone"].patch_grid(16, 16), method.mask_ratio, generator, 1.0)
    assert masks.any(dim=1).all()
    with torch.no_grad():
        output = method.student["backbone"](images, mask=masks)
        tokens = {"cls": output["cls"], "avg": output["patch"].mean(dim=1)}
    image = tokens[pool].double()
    expected = reference_koleo(image[:8].tolist()) + reference_koleo(image[8:].tolist())
    other = tokens["avg" if pool == "cls" else "cls"].double()
    assert abs(reference_koleo(other[:8].tolist()) + reference_koleo(other[8:].tolist()) - expected) > 1e-3
    unmasked = pooled(method.student["backbone"](images), pool).detach().double()
    assert abs(reference_koleo(unmasked[:8].tolist()) + reference_koleo(unmasked[8:].tolist()) - expected) > 1e-3
    assert metrics["koleo"].item() == pytest.approx(expected, rel=1e-4)
    assert with_koleo == pytest.approx(plain + 0.2 * expected, rel=1e-4)
    # the cls loss reads the same image token: the head gets it with the patch tokens
    torch.testing.assert_close(head_inputs[0].double(), image, rtol=1e-5, atol=1e-6)


def test_koleo_is_one_option_set_for_dino_simsiam_and_ibot():
    from wildssl.methods.ibot import IBOT
    from wildssl.methods.koleo import KOLEO_DEFAULTS
    from wildssl.methods.simsiam import SimSiam

    for method in (DINO, SimSiam, IBOT):
        assert {key: method.defaults[key] for key in KOLEO_DEFAULTS} == KOLEO_DEFAULTS
    # SimSiam needs 2 images per rank whatever its KoLeo weight (its BatchNorm, Method.min_batch), which is refused
    # first, with the same remedy
    for name, expected in (("simsiam", r"method simsiam normalizes .* raise train.batch_size to 2"),
                           ("ibot", r"method.koleo_weight=0.5 .* train.batch_size=1: raise the batch")):
        extra = TINY_DISTILLATION + ["method.patch_out_dim=64"] if name == "ibot" else TINY_METHOD[name]
        with pytest.raises(ConfigError, match=expected):
            build_method(build_config(f"{name}_quick", TINY_MODEL + extra + ["method.koleo_weight=0.5",
                                                                             "train.batch_size=1"]))
