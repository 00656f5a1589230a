import math

import pytest
import torch

from wildssl.losses.patch_loss import masked_patch_cross_entropy, masked_rows_cross_entropy, patch_cross_entropy


def _cross_entropy(student_row, teacher_row, temp):
    """-sum_k P_t[k] log softmax(s / temp)[k] for one patch, in float64 Python arithmetic."""
    scaled = [float(v) / temp for v in student_row]
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(v - top) for v in scaled))
    return -sum(float(p) * (v - log_norm) for p, v in zip(teacher_row, scaled))


def _random_case(batch=3, patches=5, prototypes=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, patches, prototypes, generator=generator, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(batch, patches, prototypes, generator=generator, dtype=torch.float64) / 0.3, -1)
    return student, teacher


def test_ibot_patch_loss_averages_masked_patches_per_image_then_images():
    student, teacher = _random_case()
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    per_image = []
    for b in range(3):
        masked = [n for n in range(5) if mask[b, n]]
        losses = [_cross_entropy(student[b, n], teacher[b, n], 0.1) for n in masked]
        per_image.append(sum(losses) / len(masked) if masked else 0.0)  # an unmasked image counts as 0
    expected = sum(per_image) / 3
    loss = masked_patch_cross_entropy(student, teacher, mask, student_temp=0.1)
    assert math.isclose(float(loss), expected, rel_tol=1e-5)


def test_ibot_patch_loss_ignores_unmasked_patches():
    student, teacher = _random_case(seed=1)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) < 0.5
    changed = torch.where(mask.unsqueeze(-1), student, torch.randn_like(student) * 10)
    changed_teacher = torch.where(mask.unsqueeze(-1), teacher, torch.softmax(torch.randn_like(teacher), -1))
    reference = masked_patch_cross_entropy(student, teacher, mask)
    assert torch.equal(masked_patch_cross_entropy(changed, changed_teacher, mask), reference)
    # ...while a masked patch does count.
    moved = student.clone()
    moved[mask] += 1.0 * torch.arange(7, dtype=torch.float64)
    assert not torch.isclose(masked_patch_cross_entropy(moved, teacher, mask), reference)


def test_the_masked_rows_alone_give_the_masked_patch_loss_and_a_non_finite_unmasked_patch_is_never_read():
    student, teacher = _random_case(seed=4)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    per_image = [sum(_cross_entropy(student[b, n], teacher[b, n], 0.1) for n in range(5) if mask[b, n])
                 / max(1, int(mask[b].sum())) for b in range(3)]
    rows = masked_rows_cross_entropy(student[mask], teacher[mask], mask, student_temp=0.1)
    assert math.isclose(float(rows), sum(per_image) / 3, rel_tol=1e-5)  # computed in fp32
    poisoned = student.clone()
    poisoned[0, 0] = float("nan")  # an unmasked patch
    assert torch.isfinite(masked_patch_cross_entropy(poisoned, teacher, mask, student_temp=0.1))
    with pytest.raises(ValueError, match="6 rows for a mask"):
        masked_rows_cross_entropy(student[mask][:6], teacher[mask][:6], mask)


def test_patch_cross_entropy_is_the_weighted_mean_over_patches():
    student, teacher = _random_case(batch=1, patches=6, seed=3)
    student, teacher = student[0], teacher[0]
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    kept = [n for n in range(6) if weights[n] > 0]
    expected = sum(_cross_entropy(student[n], teacher[n], 0.1) for n in kept) / len(kept)
    assert math.isclose(float(patch_cross_entropy(student, teacher, 0.1, weights)), expected, rel_tol=1e-5)
    everything = sum(_cross_entropy(student[n], teacher[n], 0.1) for n in range(6)) / 6
    assert math.isclose(float(patch_cross_entropy(student, teacher, 0.1)), everything, rel_tol=1e-5)
    assert float(patch_cross_entropy(student, teacher, 0.1, torch.zeros(6, dtype=torch.float64))) == 0.0
