from __future__ import annotations

import math

import pytest
import torch

from wildssl.errors import ConfigError
from wildssl.losses.dino_loss import (
    DINOCenter,
    dino_cross_entropy,
    entropy,
    sinkhorn_knopp_probabilities,
    teacher_probabilities,
    teacher_temperature_schedule,
)


def reference_dino_loss(student, teacher_probs, student_temp, skip_same_view):
    """Eq. 2-3 element by element in float64."""
    total, pairs = 0.0, 0
    for i, p_t in enumerate(teacher_probs):
        for j, s in enumerate(student):
            if skip_same_view and i == j:
                continue
            for b in range(s.shape[0]):
                logits = [float(v) / student_temp for v in s[b]]
                top = max(logits)
                log_z = top + math.log(sum(math.exp(v - top) for v in logits))
                total += -sum(float(p) * (v - log_z) for p, v in zip(p_t[b], logits)) / s.shape[0]
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("skip_same_view", [True, False])
def test_cross_entropy_equals_elementwise_formula(skip_same_view):
    torch.manual_seed(0)
    student = [torch.randn(3, 6) for _ in range(4)]  # 2 global + 2 local crops
    teacher = [torch.softmax(torch.randn(3, 6) / 0.5, dim=-1) for _ in range(2)]
    loss = dino_cross_entropy(student, teacher, student_temp=0.1, skip_same_view=skip_same_view)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(reference_dino_loss(student, teacher, 0.1, skip_same_view), rel=1e-5)


def test_gradient_flows_to_student_only():
    torch.manual_seed(2)
    student = [torch.randn(2, 5, requires_grad=True) for _ in range(3)]
    teacher_logits = torch.randn(2, 5, requires_grad=True)
    probs = teacher_probabilities(teacher_logits, torch.zeros(1, 5), 0.04)
    dino_cross_entropy(student, [probs, probs]).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert teacher_logits.grad is None


def test_no_pair_left_raises():
    with pytest.raises(ValueError, match="pair"):
        dino_cross_entropy([torch.randn(2, 3)], [torch.softmax(torch.randn(2, 3), dim=-1)])


def test_teacher_probabilities_center_then_sharpen():
    torch.manual_seed(3)
    logits = torch.randn(4, 5, dtype=torch.float64)
    center = torch.randn(1, 5, dtype=torch.float64)
    probs = teacher_probabilities(logits, center, teacher_temp=0.07)
    shifted = (logits - center) / 0.07
    expected = shifted.exp() / shifted.exp().sum(dim=1, keepdim=True)
    torch.testing.assert_close(probs, expected.float())
    # A lower temperature sharpens: lower entropy.
    assert (entropy(probs) < entropy(teacher_probabilities(logits, center, teacher_temp=1.0))).all()


def test_center_update_is_exponential_moving_average_of_batch_mean():
    torch.manual_seed(4)
    module = DINOCenter(num_prototypes=6, momentum=0.9)
    assert module.center.shape == (1, 6) and "center" in module.state_dict()
    first, second = torch.randn(8, 6), torch.randn(8, 6)
    for logits in (first, second):
        module.observe(logits)
        module.commit_step()
    expected = 0.9 * (0.1 * first.double().mean(0)) + 0.1 * second.double().mean(0)
    torch.testing.assert_close(module.center.double(), expected[None], rtol=1e-6, atol=1e-7)


def test_center_moves_only_when_the_step_is_committed():
    module = DINOCenter(num_prototypes=6, momentum=0.5)
    module.observe(torch.full((4, 6), float("nan")))
    assert torch.equal(module.center, torch.zeros(1, 6))  # observing alone moves nothing
    module.discard_step()  # a skipped step
    module.commit_step()  # nothing pending: nothing moves
    assert torch.equal(module.center, torch.zeros(1, 6))
    module.observe(torch.ones(4, 6))
    module.observe(3 * torch.ones(2, 6))  # two calls in one step: their means are averaged
    module.commit_step()
    torch.testing.assert_close(module.center, torch.ones(1, 6))


def test_center_update_rejects_wrong_prototype_count():
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        DINOCenter(6).observe(torch.randn(2, 5))


def test_teacher_temperature_schedule_warms_up_linearly_then_stays():
    schedule = teacher_temperature_schedule(0.04, 0.07, warmup_steps=4, total_steps=10)
    assert schedule.shape == (10,)
    assert schedule[0].item() == pytest.approx(0.04)
    assert schedule[1].item() == pytest.approx(0.05)
    assert schedule[3].item() == pytest.approx(0.07)
    assert torch.all(schedule[3:] == 0.07)
    no_warmup = teacher_temperature_schedule(0.04, 0.07, warmup_steps=0, total_steps=3)
    assert torch.all(no_warmup == 0.07)


def test_teacher_temperature_schedule_rejects_warmup_longer_than_training():
    with pytest.raises(ConfigError, match="warm-up of 11 steps"):
        teacher_temperature_schedule(0.04, 0.07, warmup_steps=11, total_steps=10)


def test_entropy_bounds_and_formula():
    k = 8
    assert entropy(torch.full((2, k), 1.0 / k)).tolist() == pytest.approx([math.log(k)] * 2)
    assert entropy(torch.eye(k)[:3]).tolist() == [0.0, 0.0, 0.0]
    p = torch.softmax(torch.randn(5, k, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(entropy(p), -(p * p.log()).sum(dim=-1))


def reference_sinkhorn(logits: torch.Tensor, temperature: float, iterations: int) -> list[list[float]]:
    """DINOv2's Sinkhorn-Knopp centering element by element in float64: exp(t / T) normalized to total 1,
    then per iteration every prototype's column to 1/K and every crop's row to 1/N; the result times N."""
    rows, cols = logits.shape
    q = [[math.exp(float(logits[n, k]) / temperature) for k in range(cols)] for n in range(rows)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        column = [sum(q[n][k] for n in range(rows)) for k in range(cols)]
        q = [[q[n][k] / column[k] / cols for k in range(cols)] for n in range(rows)]
        q = [[v / sum(row) / rows for v in row] for row in q]
    return [[v * rows for v in row] for row in q]


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_knopp_matches_the_float64_formula(iterations):
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    probs = sinkhorn_knopp_probabilities(logits, 0.2, iterations)
    torch.testing.assert_close(probs.double(), torch.tensor(reference_sinkhorn(logits, 0.2, iterations),
                                                            dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert probs.dtype == torch.float32 and not probs.requires_grad
    # A common shift of every logit changes nothing (the exponent's overflow guard).
    torch.testing.assert_close(sinkhorn_knopp_probabilities(logits + 30.0, 0.2, iterations), probs)


def test_sinkhorn_knopp_spreads_a_collapsed_teacher_over_the_prototypes():
    # Every crop prefers prototype 0: softmax would put most mass there, Sinkhorn-Knopp spreads it evenly.
    logits = torch.randn(64, 4, generator=torch.Generator().manual_seed(4)) * 0.1
    logits[:, 0] += 1.0
    probs = sinkhorn_knopp_probabilities(logits, 0.1, iterations=30)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(64))
    torch.testing.assert_close(probs.sum(dim=0), torch.full((4,), 16.0), rtol=1e-3, atol=1e-3)
    assert teacher_probabilities(logits, torch.zeros(4), 0.1).sum(dim=0)[0] > 50


def test_centering_must_be_center_or_sinkhorn():
    from wildssl.methods import build_method
    from wildssl.train.config import build_config
    from conftest import TINY_MODEL
    with pytest.raises(ConfigError, match="method.centering='sinkhorn_knop' must be one of center, sinkhorn"):
        build_method(build_config("dino_quick", TINY_MODEL + ["method.centering=sinkhorn_knop"]))
