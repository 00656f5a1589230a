"""What the engine guarantees every method: deterministic teachers in eval mode, state that moves only
after a finite step, method-chosen teacher keys, clear pool errors, and initialization from a checkpoint."""

import pytest
import torch

from conftest import schedule_values, tiny_overrides
from wildssl.data import collate, open_source
from wildssl.errors import ConfigError
from wildssl.methods import build_method
from wildssl.methods.base import StepContext, pooled
from wildssl.train.config import build_config


def _method(name, *extra):
    torch.manual_seed(0)
    config = build_config(f"{name}_quick", tiny_overrides(name, *extra))
    return build_method(config), config


def _batch(config, size=8):
    source = open_source(config["data"]["train"], load_size=16)
    return collate([source[i] for i in range(size)])


def _step(method, seed=3):
    return StepContext(0, 10, torch.Generator().manual_seed(seed), schedule_values(method), log=True)


def test_teacher_stays_in_eval_mode_and_is_deterministic_under_drop_path():
    method, _ = _method("dino", "model.drop_path_rate=0.5", "model.depth=2")
    method.train()
    assert method.student.training and method.student["backbone"].training
    assert all(not module.training for module in method.teacher.modules())
    images = torch.randn(4, 3, 16, 16)
    teacher = method.encoder(teacher=True)
    assert torch.equal(teacher(images)["cls"], teacher(images)["cls"])
    student = method.encoder(teacher=False)
    assert not torch.equal(student(images)["cls"], student(images)["cls"])  # drop path is really on


def test_simclr_teacher_targets_of_one_crop_do_not_depend_on_the_rest_of_the_batch():
    from wildssl.methods.ab import ABSimCLR  # noqa: F401  (AB_SimCLR has a teacher with a BatchNorm head)
    from conftest import tiny_ab_overrides

    torch.manual_seed(0)
    config = build_config(None, tiny_ab_overrides("simclr"))
    method = build_method(config).train()
    # The EMA teacher's BatchNorm must normalize with running statistics, not with the batch's.
    for module in method.teacher.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    crop = torch.randn(1, 3, 16, 16)
    batch_a = torch.cat([crop, torch.randn(5, 3, 16, 16)])
    batch_b = torch.cat([crop, 3 * torch.randn(5, 3, 16, 16) + 1])
    with torch.no_grad():
        z_a = method.embed(batch_a, method.teacher)[0]
        z_b = method.embed(batch_b, method.teacher)[0]
    torch.testing.assert_close(z_a, z_b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["dino", "simclr"])
def test_forward_alone_changes_no_state_and_a_discarded_step_leaves_it_unchanged(name):
    method, config = _method(name)
    batch = _batch(config)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.begin_step()  # as the engine does
    method({"train": batch}, _step(method))
    method.discard_step()
    method.commit_step()  # nothing pending any more
    after = method.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed


def test_dino_center_moves_after_a_committed_step():
    method, config = _method("dino")
    method({"train": _batch(config)}, _step(method))
    assert torch.count_nonzero(method.distillation.center.center) == 0
    method.commit_step()
    assert torch.count_nonzero(method.distillation.center.center) > 0


def test_make_teacher_copies_only_the_named_modules():
    method, _ = _method("dino")
    method.make_teacher(["backbone"])
    assert set(method.teacher) == {"backbone"}
    assert all(not p.requires_grad for p in method.teacher.parameters())
    with pytest.raises(ValueError, match="no module 'decoder'"):
        method.make_teacher(["decoder"])


@pytest.mark.parametrize("name", ["simclr", "dino"])
def test_a_misspelled_pool_is_a_config_error(name):
    with pytest.raises(ConfigError, match="method.pool='avgg'"):
        _method(name, "method.pool=avgg")


def test_pooled_rejects_unknown_pool_names():
    output = {"cls": torch.zeros(2, 4), "patch": torch.ones(2, 3, 4)}
    assert torch.equal(pooled(output, "avg"), torch.ones(2, 4))
    with pytest.raises(ConfigError, match="not one of cls, avg"):
        pooled(output, "mean")


def test_init_from_loads_the_encoder_strictly_into_student_and_teacher(tmp_path):
    from wildssl.models.loading import load_encoder
    from wildssl.train.engine import train

    source_config = build_config("simclr_quick", tiny_overrides("simclr", "train.steps=2"))
    train(source_config, tmp_path / "source")
    method, _ = _method("dino", f"model.init_from={tmp_path / 'source'}")
    source = load_encoder(tmp_path / "source", teacher=False).state_dict()
    for network in (method.student, method.teacher):
        state = network["backbone"].state_dict()
        for key, value in source.items():
            if key != "mask_token":
                assert torch.equal(state[key], value), key
    assert torch.count_nonzero(method.student["backbone"].mask_token) == 0  # DINO does not mask: not taken


def test_init_from_a_mismatched_architecture_is_one_line(tmp_path):
    from wildssl.errors import CheckpointError
    from wildssl.train.engine import train

    train(build_config("simclr_quick", tiny_overrides("simclr", "train.steps=1")), tmp_path / "source")
    with pytest.raises(CheckpointError, match=r"holds an encoder with embed_dim 32, this run's model has embed_dim "
                                              r"64; give the run that encoder's architecture \(--set model.embed_dim=32\)"):
        _method("dino", f"model.init_from={tmp_path / 'source'}", "model.embed_dim=64")
    # another patch size: a strict load named only the position table ("pos_embed has shape ...")
    with pytest.raises(CheckpointError, match=r"holds an encoder with patch_size 4, this run's model has patch_size 8; "
                                              r".*--set model.patch_size=4"):
        _method("dino", f"model.init_from={tmp_path / 'source'}", "model.patch_size=8")
