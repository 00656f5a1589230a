import torch

from wildssl.models.ema import ema_update_


def _pair():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3).double(), torch.nn.Linear(4, 3).double()
    return student, teacher


def test_ema_with_momentum_one_never_moves():
    student, teacher = _pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        ema_update_(teacher, student, 1.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])


def test_ema_matches_formula():
    student, teacher = _pair()
    expected = {k: 0.9 * teacher.state_dict()[k] + 0.1 * v for k, v in student.state_dict().items()}
    ema_update_(teacher, student, 0.9)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-12, atol=1e-12)


def test_ema_with_momentum_zero_copies_the_student():
    student, teacher = _pair()
    ema_update_(teacher, student, 0.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, student.state_dict()[k])


def test_ema_pairs_parameters_by_name_when_the_student_has_extra_modules():
    student = torch.nn.ModuleDict({"backbone": torch.nn.Linear(4, 3), "extra": torch.nn.Linear(2, 2)})
    teacher = torch.nn.ModuleDict({"backbone": torch.nn.Linear(4, 3)})
    expected = 0.5 * teacher["backbone"].weight + 0.5 * student["backbone"].weight
    ema_update_(teacher, student, 0.5)
    torch.testing.assert_close(teacher["backbone"].weight, expected)
    import pytest

    with pytest.raises(ValueError, match="no matching student parameter"):
        ema_update_(student, teacher, 0.5)
