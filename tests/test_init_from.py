"""``model.init_from`` across a chain of runs (MAE -> WSP -> LiT, a DINO run -> another method): which encoder
it reads, what the run's random-init floor measures, resuming without the file, and its one-line errors."""
import logging

import pytest
import torch

from conftest import tiny_config
from wildssl.errors import CheckpointError
from wildssl.methods import build_method
from wildssl.models.export import save_encoder_export
from wildssl.models.loading import load_encoder
from wildssl.train.engine import train


def _backbone_equals(method, encoder) -> bool:
    state = method.student["backbone"].state_dict()
    return all(torch.equal(state[key], value) for key, value in encoder.state_dict().items() if key != "mask_token")


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
    """A DINO run whose EMA teacher differs from its student (momentum 0.5 over 3 steps)."""
    run = tmp_path_factory.mktemp("dino") / "run"
    train(tiny_config("dino", "train.steps=3", "ema.momentum=0.5", "ema.momentum_end=0.5", "optim.lr=0.01",
                      "optim.warmup_epochs=0"), run)
    return run


def test_init_from_a_run_reads_the_encoder_its_export_and_evaluations_read(dino_run, tmp_path, caplog):
    """init_from a DINO run loaded its student, while `eval knn`, `export` and init_from the export read its
    EMA teacher: the same run gave different weights by the way it was passed."""
    teacher, student = load_encoder(dino_run), load_encoder(dino_run, teacher=False)
    assert not _backbone_equals(build_method(tiny_config("simclr", "model.init_from=" + str(dino_run))), student)
    caplog.set_level(logging.INFO, logger="wildssl")
    from_run = build_method(tiny_config("simclr", f"model.init_from={dino_run}"))
    save_encoder_export(tmp_path / "dino.safetensors", dino_run)
    from_export = build_method(tiny_config("simclr", f"model.init_from={tmp_path / 'dino.safetensors'}"))
    assert _backbone_equals(from_run, teacher) and _backbone_equals(from_export, teacher)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model.init_from")]
    assert "of the run's teacher (method.teacher.backbone) into the student backbone" in lines[0]
    assert "student.backbone (" in lines[0] and "teacher.backbone" not in lines[0].split("dropped:")[1]
    # an export's encoder tensors are loaded, not listed as dropped ("blocks (48 tensors), norm, patch_embed")
    assert "of its one encoder" in lines[1] and lines[1].endswith("dropped: mask_token (this run keeps its own)")


def test_init_from_a_timm_export_keeps_this_runs_mask_token(dino_run, tmp_path):
    """A `--timm` export (no mask token) was refused: "does not match the model: missing 1 keys (e.g. mask_token)"."""
    save_encoder_export(tmp_path / "timm.safetensors", dino_run, timm=True)
    for method in ("mae", "simclr"):  # one that masks, one that does not
        built = build_method(tiny_config(method, f"model.init_from={tmp_path / 'timm.safetensors'}"))
        assert _backbone_equals(built, load_encoder(dino_run))


def test_the_floor_of_a_run_with_init_from_is_its_random_initialization(dino_run, tmp_path):
    """With model.init_from the "random initialization" k-NN measured the loaded encoder: a LiT run (its tower
    locked) raised a quality alarm every time, and WSP from MAE compared itself with MAE."""
    def fingerprint(method):  # a stand-in k-NN: a number that follows the evaluated encoder's weights
        return {"knn_top1": float(method.encoder().patch_embed.proj.weight.detach().double().abs().sum()) % 1.0}

    plain = train(tiny_config("simclr", "train.steps=1", "eval.knn_every=1"), tmp_path / "plain",
                  knn_evaluator=fingerprint)
    loaded = train(tiny_config("simclr", "train.steps=1", "eval.knn_every=1", f"model.init_from={dino_run}"),
                   tmp_path / "loaded", knn_evaluator=fingerprint)
    floor = plain["final_metrics"]["knn_top1_random_init"]
    assert loaded["final_metrics"]["knn_top1_random_init"] == floor
    assert floor != fingerprint(build_method(tiny_config("simclr", f"model.init_from={dino_run}")))["knn_top1"]
    # the run's own steps are those of a run without the floor's extra build (same data order, same weights)
    again = train(tiny_config("simclr", "train.steps=1", "eval.knn_every=0", f"model.init_from={dino_run}"),
                  tmp_path / "again")
    assert again["final_loss"] == loaded["final_loss"]


def test_a_run_resumes_without_its_init_from_file_and_a_missing_one_names_the_key(dino_run, tmp_path):
    """Resuming read model.init_from again, so a deleted file failed with "checkpoint not found: X", as if the
    run's own checkpoint were lost; a missing file also left an empty --out folder."""
    source = tmp_path / "source.safetensors"
    save_encoder_export(source, dino_run)

    def config(steps):
        return tiny_config("simclr", f"train.steps={steps}", f"model.init_from={source}")

    train(config(2), tmp_path / "run")
    source.unlink()
    summary = train(config(3), tmp_path / "run", resume=True)
    assert summary["start_step"] == 2 and summary["steps"] == 3
    with pytest.raises(CheckpointError, match=rf"^model.init_from: checkpoint not found: {source}"):
        train(config(3), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_the_quality_alarm_of_a_locked_encoder_names_init_from_not_the_learning_rate(dino_run, tmp_path, monkeypatch):
    """LiT's tower is locked: its k-NN can only show what model.init_from loaded, yet the alarm said "check the
    learning rate, the augmentations and the budget", none of which moves it."""
    from wildssl.methods.lit import LiT
    from wildssl.methods.simclr import SimCLR

    assert LiT.locks_encoder and not SimCLR.locks_encoder
    monkeypatch.setattr(SimCLR, "locks_encoder", True)  # a locked stand-in, trained as LiT would be
    summary = train(tiny_config("simclr", "train.steps=1", "eval.knn_every=1", f"model.init_from={dino_run}"),
                    tmp_path / "run", knn_evaluator=lambda method: {"knn_top1": 0.25})
    (alarm,) = [a for a in summary["alarms"] if a.startswith("quality alarm")]
    assert f"locks the encoder model.init_from loaded ({dino_run})" in alarm and "learning rate" not in alarm
