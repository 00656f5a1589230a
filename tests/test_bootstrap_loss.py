from __future__ import annotations

import math

import pytest
import torch

from wildssl.losses.bootstrap_loss import bootstrap_agreement, bootstrap_loss


def _logits(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def _reference_loss(student, teacher, temp, valid=None) -> float:
    total, count = 0.0, 0
    batch, pairs, classes = student.shape
    for b in range(batch):
        for p in range(pairs):
            if valid is not None and not valid[b, p]:
                continue
            t = [teacher[b, p, k].item() / temp for k in range(classes)]
            s = [student[b, p, k].item() for k in range(classes)]
            t_norm = sum(math.exp(v) for v in t)
            s_log_norm = math.log(sum(math.exp(v) for v in s))
            total -= sum(math.exp(t[k]) / t_norm * (s[k] - s_log_norm) for k in range(classes))
            count += 1
    return total / count


@pytest.mark.parametrize("temp", [1.0, 0.4])
def test_bootstrap_loss_matches_an_explicit_float64_cross_entropy(temp):
    student, teacher = _logits(2, 6, 5, seed=0), _logits(2, 6, 5, seed=1)
    loss = bootstrap_loss(student, teacher, teacher_temp=temp)
    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert loss.item() == pytest.approx(_reference_loss(student, teacher, temp), rel=1e-12)


def test_bootstrap_loss_is_kl_plus_teacher_entropy():
    student, teacher = _logits(3, 4, 7, seed=2), _logits(3, 4, 7, seed=3)
    target = teacher.softmax(-1)
    kl = (target * (target.log() - student.log_softmax(-1))).sum(-1).mean()
    entropy = -(target * target.log()).sum(-1).mean()
    torch.testing.assert_close(bootstrap_loss(student, teacher), kl + entropy)


def test_bootstrap_loss_gradient_flows_to_the_student_only():
    student = _logits(2, 3, 4, seed=4).requires_grad_()
    teacher = _logits(2, 3, 4, seed=5).requires_grad_()
    bootstrap_loss(student, teacher, teacher_temp=0.5).backward()
    assert teacher.grad is None
    # d/ds of mean cross-entropy: (softmax(s) - softmax(t / temp)) / number of pairs.
    expected = (student.detach().softmax(-1) - (teacher.detach() / 0.5).softmax(-1)) / 6
    torch.testing.assert_close(student.grad, expected)


def test_bootstrap_loss_averages_over_valid_pairs_only():
    student, teacher = _logits(2, 5, 4, seed=6), _logits(2, 5, 4, seed=7)
    valid = torch.tensor([[True, False, True, True, False], [False, False, True, False, True]])
    loss = bootstrap_loss(student, teacher, valid=valid)
    assert loss.item() == pytest.approx(_reference_loss(student, teacher, 1.0, valid), rel=1e-12)
    scrambled = student.clone()
    scrambled[~valid] = 100.0 * torch.randn_like(scrambled[~valid])
    assert bootstrap_loss(scrambled, teacher, valid=valid).item() == pytest.approx(loss.item(), rel=1e-12)


def test_bootstrap_loss_without_valid_pairs_is_zero_and_differentiable():
    student = _logits(1, 3, 4, seed=8).requires_grad_()
    loss = bootstrap_loss(student, _logits(1, 3, 4, seed=9), valid=torch.zeros(1, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_bootstrap_loss_computes_in_float32_for_bfloat16_logits():
    student, teacher = _logits(2, 3, 50, seed=10), _logits(2, 3, 50, seed=11)
    loss = bootstrap_loss(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    reference = bootstrap_loss(student.bfloat16().double(), teacher.bfloat16().double())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_bootstrap_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        bootstrap_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))


def test_bootstrap_agreement_matches_a_brute_force_count_per_bucket():
    student, teacher = _logits(4, 6, 3, seed=12), _logits(4, 6, 3, seed=13)
    # IoUs avoid the 0.3-0.5 bucket and include an exact 1.0 and an exact edge value.
    iou = torch.rand(4, 6, generator=torch.Generator().manual_seed(14), dtype=torch.float64) * 0.3
    iou[0, :3] = torch.tensor([1.0, 0.7, 0.55], dtype=torch.float64)
    iou[1, :2] = torch.tensor([0.1, 0.9], dtype=torch.float64)
    buckets = (0.0, 0.1, 0.3, 0.5, 0.7, 1.0001)
    result = bootstrap_agreement(student, teacher, iou, buckets)

    names = ["agreement_iou_0-0.1", "agreement_iou_0.1-0.3", "agreement_iou_0.3-0.5",
             "agreement_iou_0.5-0.7", "agreement_iou_0.7-1"]
    hits = {name: [0, 0] for name in names}
    total = [0, 0]
    for b in range(4):
        for p in range(6):
            s = student[b, p].tolist()
            t = teacher[b, p].tolist()
            agree = int(s.index(max(s)) == t.index(max(t)))
            total[0] += agree
            total[1] += 1
            k = next(k for k in range(5) if buckets[k] <= iou[b, p].item() < buckets[k + 1])
            hits[names[k]][0] += agree
            hits[names[k]][1] += 1
    expected = {"agreement": total[0] / total[1]}
    expected.update({name: h / n for name, (h, n) in hits.items() if n})
    assert "agreement_iou_0.3-0.5" not in expected  # the empty bucket is omitted, not NaN
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        assert result[name] == pytest.approx(value)
        assert isinstance(result[name], float)


def test_bootstrap_agreement_is_one_when_student_equals_teacher():
    logits = _logits(2, 6, 5, seed=15)
    iou = torch.linspace(0, 1, 12, dtype=torch.float64).reshape(2, 6)
    result = bootstrap_agreement(logits, logits, iou)
    assert len(result) == 6
    assert all(value == 1.0 for value in result.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_in_a_left_out_pair_reach_neither_the_loss_nor_the_gradient(bad):
    student, teacher = _logits(2, 5, 4, seed=16), _logits(2, 5, 4, seed=17)
    valid = torch.tensor([[True, False, True, True, True], [True, True, True, False, True]])
    student[0, 1, 2] = bad  # in pairs that do not count
    teacher[1, 3] = bad
    student.requires_grad_()
    loss = bootstrap_loss(student, teacher, valid=valid)
    assert loss.item() == pytest.approx(_reference_loss(student.detach(), teacher, 1.0, valid), rel=1e-12)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[~valid] == 0).all() and (student.grad[valid] != 0).any()
