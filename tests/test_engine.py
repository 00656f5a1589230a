import contextlib
import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_ab_overrides, tiny_overrides
from wildssl.errors import CheckpointError, ConfigError
from wildssl.methods.dino import DINO
from wildssl.models.loading import CHECKPOINT_NAME
from wildssl.train.config import build_config
from wildssl.data.sampler import StepBatchSampler
from wildssl.train.engine import TrainingStopped, train


def _config(method="dino", *extra):
    return build_config(f"{method}_quick", tiny_overrides(method, *extra))


def _interrupt_at(monkeypatch, cls, step_to_interrupt):
    original = cls.forward

    def forward(self, batch, step):
        if step.step == step_to_interrupt:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, step)

    monkeypatch.setattr(cls, forward.__name__, forward)


def test_resume_after_ctrl_c_is_bit_identical_to_an_unbroken_run(tmp_path, monkeypatch):
    config = _config("dino", "train.steps=6", "train.checkpoint_every=0", "model.drop_path_rate=0.1")
    train(config, tmp_path / "straight")
    _interrupt_at(monkeypatch, DINO, 2)
    with pytest.raises(KeyboardInterrupt, match="step 3"):
        train(config, tmp_path / "broken")
    monkeypatch.undo()
    assert load_file(str(tmp_path / "broken" / CHECKPOINT_NAME))  # saved on Ctrl-C
    summary = train(config, tmp_path / "broken", resume=True)
    assert summary["start_step"] == 3
    straight = load_file(str(tmp_path / "straight" / CHECKPOINT_NAME))
    resumed = load_file(str(tmp_path / "broken" / CHECKPOINT_NAME))
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, different[:5]
    assert any(k.startswith("method.teacher.") for k in straight)


@pytest.mark.parametrize("signal_name, status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_schedulers_sigterm_or_a_closed_terminal_saves_a_checkpoint_as_ctrl_c_does(tmp_path, monkeypatch, capsys,
                                                                                      signal_name, status):
    """SLURM and Kubernetes preempt with SIGTERM (then SIGKILL after a grace period); a closed terminal sends SIGHUP.
    Both ended the run at once, with no checkpoint and no word (exit 143 / 129): all training since the last
    checkpoint was lost. They are handled as Ctrl-C is: a checkpoint at the end of the step, one line, 128 + the
    signal as the exit status, and --resume continues the run."""
    from wildssl.cli import main

    original = DINO.forward

    def forward(self, batch, step):
        if step.step == 2:
            os.kill(os.getpid(), getattr(signal, signal_name))
        return original(self, batch, step)

    monkeypatch.setattr(DINO, "forward", forward)
    argv = ["train", "dino_quick", "--out", str(tmp_path / "run")]
    for item in tiny_overrides("dino", "train.steps=6", "train.checkpoint_every=0"):
        argv += ["--set", item]
    assert main(argv) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"wildssl: interrupted ({signal_name}) at step 3; checkpoint saved to "
                       f"{tmp_path / 'run' / CHECKPOINT_NAME} (continue with --resume)")
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["start_step"] == 3


def test_training_changes_the_weights_and_logs_each_step_once(tmp_path):
    from wildssl.methods import build_initial_method

    config = _config("simclr", "train.steps=3")
    initial = {f"method.{k}": v for k, v in build_initial_method(config).state_dict().items()}
    summary = train(config, tmp_path)
    trained = load_file(str(tmp_path / CHECKPOINT_NAME))
    moved = [k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert "method.student.backbone.blocks.0.attn.qkv.weight" in moved and "method.student.head.layers.0.weight" in moved
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert summary["final_loss"] == json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert build_config(str(tmp_path / "config.yaml")) == config


def test_existing_run_directory_is_not_overwritten_without_resume(tmp_path):
    config = _config("simclr", "train.steps=1")
    train(config, tmp_path)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(CheckpointError, match="--resume"):
        train(config, tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before


def test_resume_with_a_different_config_is_refused(tmp_path):
    train(_config("simclr", "train.steps=1"), tmp_path)
    with pytest.raises(ConfigError, match="optim.lr"):
        train(_config("simclr", "train.steps=2", "optim.lr=0.5"), tmp_path, resume=True)


def _nan_at(monkeypatch, cls, bad_steps):
    original = cls.forward

    def forward(self, batch, step):
        output = original(self, batch, step)
        if step.step in bad_steps:
            output["loss"] = output["loss"] * float("nan")
        return output

    monkeypatch.setattr(cls, "forward", forward)


def test_nonfinite_loss_is_skipped_and_counted_without_touching_weights_or_optimizer(tmp_path, monkeypatch):
    from wildssl.methods.simclr import SimCLR

    _nan_at(monkeypatch, SimCLR, {1})
    summary = train(_config("simclr", "train.steps=3", "train.checkpoint_every=1", "train.keep_every=1"), tmp_path)
    assert summary["nonfinite_steps"] == 1
    after_step_0 = load_file(str(tmp_path / "checkpoint_0000001.safetensors"))
    after_skip = load_file(str(tmp_path / "checkpoint_0000002.safetensors"))
    learned = [k for k in after_skip if k.startswith(("method.", "optimizer."))]
    assert learned and all(torch.equal(after_step_0[k], after_skip[k]) for k in learned)
    final = load_file(str(tmp_path / CHECKPOINT_NAME))
    assert not torch.equal(final["method.student.head.layers.0.weight"], after_skip["method.student.head.layers.0.weight"])


def test_nonfinite_loss_with_stop_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from wildssl.methods.simclr import SimCLR

    _nan_at(monkeypatch, SimCLR, {2})
    config = _config("simclr", "train.steps=4", "train.checkpoint_every=1", "train.nonfinite=stop")
    with pytest.raises(TrainingStopped, match="last good checkpoint"):
        train(config, tmp_path)
    from wildssl.train.checkpoint import load_training_checkpoint
    from wildssl.methods import build_method

    assert load_training_checkpoint(tmp_path, build_method(config), None)["step"] == 2


def test_step_sampler_covers_each_epoch_once_and_splits_ranks():
    full = list(StepBatchSampler(10, 4, total_steps=4, seed=3))
    epoch0 = sorted(i for batch in full[:2] for i in batch)
    assert len(set(epoch0)) == 8 and all(len(b) == 4 for b in full)
    rank0 = list(StepBatchSampler(10, 4, total_steps=4, seed=3, rank=0, world_size=2))
    rank1 = list(StepBatchSampler(10, 4, total_steps=4, seed=3, rank=1, world_size=2))
    assert [a + b for a, b in zip(rank0, rank1)] == full
    resumed = list(StepBatchSampler(10, 4, total_steps=4, start_step=3, seed=3))
    assert resumed == full[3:]
    with pytest.raises(ConfigError, match="larger than the data source"):
        StepBatchSampler(3, 4, total_steps=1)


@pytest.mark.parametrize("overrides, key", [
    (tiny_overrides("simclr", "data.train=synthetic:scenes?n=12&size=16&split=train"), "train.batch_size=16"),
    (tiny_ab_overrides("dino", "data.bootstrap=synthetic:scenes?n=3&size=16&split=train", "data.bootstrap_batch_size=4"),
     "data.bootstrap_batch_size=4"),
])
def test_a_batch_larger_than_its_data_is_a_config_error_before_the_random_init_knn(tmp_path, overrides, key):
    """The user learns that a stream's batch cannot be filled before the first k-NN evaluation runs (it can take
    minutes on a large memory), and the error names the setting to lower."""
    evaluated = []
    config = build_config("simclr_quick" if key.startswith("train") else None,
                          overrides + ["train.steps=2", "eval.knn_every=1"])
    with pytest.raises(ConfigError, match=f"{key} is larger than the data source"):
        train(config, tmp_path, knn_evaluator=lambda m: evaluated.append(1) or {"knn_top1": 0.5})
    assert evaluated == []


def test_training_on_a_folder_with_a_corrupt_image_skips_and_counts_it(tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(8):
            pixels = np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    (folder / "a" / "0.png").write_bytes(b"not an image at all")
    config = _config("simclr", f"data.train={folder}", "train.steps=2")
    summary = train(config, tmp_path / "run")
    assert summary["corrupt_images"] >= 1 and summary["steps"] == 2


@pytest.mark.parametrize("figures, standing", [
    ([0.5, 0.4, 0.3, 0.45], "quality alarm: k-NN top-1 45.0% at step 3 is not above the same encoder at random "
                            "initialization (50.0%)"),
    ([0.5, 0.4, 0.6, 0.7], None),
    # a floor of 100% leaves no room: the alarm says the measure is full, not that the encoder got no better
    ([1.0, 1.0, 1.0, 1.0], "quality alarm: k-NN top-1 is 100.0% already at random initialization, so this k-NN set "
                           "cannot show what training adds"),
])
def test_a_run_below_its_random_init_ends_with_one_quality_alarm_naming_the_last_figure(tmp_path, figures, standing):
    """The online k-NN is below the random-init floor at steps 1-2: a run that ends below it reports one
    standing quality alarm with the last figure (not one per evaluation); one that ends above reports none."""
    scripted = iter(figures)
    config = build_config("simclr_quick", tiny_overrides("simclr", "train.steps=3", "eval.knn_every=1"))
    summary = train(config, tmp_path, knn_evaluator=lambda method: {"knn_top1": next(scripted)})
    quality = [alarm for alarm in summary["alarms"] if alarm.startswith("quality alarm")]
    if standing is None:
        assert quality == []
    else:
        assert len(quality) == 1 and quality[0].startswith(standing), quality
    assert next(scripted, "used up") == "used up"  # random init + one evaluation per step


def test_the_quality_alarm_points_to_keep_colour_only_where_the_views_lose_colour(tmp_path):
    """simclr_quick's views jitter hue and go grey (simclr_cifar): the alarm names the option that keeps
    colour; with keep_colour already set it does not."""
    hints = []
    for pipeline in ("simclr_cifar", "keep_colour"):
        scripted = iter([0.5, 0.3])
        config = build_config("simclr_quick", tiny_overrides("simclr", "train.steps=1", "eval.knn_every=1",
                                                              f"method.photometric={pipeline}"))
        summary = train(config, tmp_path / pipeline, knn_evaluator=lambda method: {"knn_top1": next(scripted)})
        (quality,) = [alarm for alarm in summary["alarms"] if alarm.startswith("quality alarm")]
        hints.append("--set method.photometric=keep_colour" in quality)
    assert hints == [True, False]


def test_build_initial_method_rebuilds_the_weights_a_run_starts_from_whatever_the_global_rng_state():
    from wildssl.methods import build_initial_method

    config = _config("simclr")
    torch.manual_seed(123)  # a state the engine does not start from
    first = build_initial_method(config).state_dict()
    torch.rand(7)
    again = build_initial_method(config).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = build_initial_method({**config, "train": {**config["train"], "seed": config["train"]["seed"] + 1}})
    assert any(not torch.equal(first[k], v) for k, v in other.state_dict().items())


def test_the_engines_random_init_knn_is_the_knn_of_build_initial_method(tmp_path):
    from wildssl.eval.evaluate import make_online_knn
    from wildssl.methods import build_initial_method

    config = _config("simclr", "train.steps=1", "eval.knn_every=1",
                     "eval.knn_train=synthetic:scenes?n=64&size=16&split=train",
                     "eval.knn_test=synthetic:scenes?n=48&size=16&split=test")
    knn = make_online_knn(config, "cpu")  # what the CLI hands the engine
    train(config, tmp_path, knn_evaluator=knn)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if "knn_top1_random_init" in r)
    rebuilt = knn(build_initial_method(config))
    assert rebuilt["knn_top1"] == logged["knn_top1_random_init"]
    assert rebuilt["knn_top5"] == logged["knn_top5_random_init"]


@contextlib.contextmanager
def _console_logging():
    """The console handler the CLI's logging.basicConfig installs, with wildssl's info lines on; removed after."""
    import logging
    import sys

    root, log = logging.getLogger(), logging.getLogger("wildssl")
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        yield console
    finally:
        root.removeHandler(console)
        log.setLevel(level)


def _bar(total_steps: int, terminal: bool):
    from types import SimpleNamespace

    from wildssl.train.logging import ProgressBar

    return ProgressBar(SimpleNamespace(total_steps=total_steps, start_step=0, config={"method": {"name": "dino"}}),
                       terminal=terminal)


def test_a_log_line_printed_while_the_progress_bar_runs_starts_a_line_of_its_own(capsys):
    """The online k-NN's and the alarms' lines go through tqdm while the bar is open: they start a line instead of
    trailing the bar ("...eta=0:00:03]step 30: knn_top1=..."), and the console handler is back after the run."""
    import logging
    import re

    with _console_logging() as console:
        bar = _bar(4, terminal=True)
        bar.update()
        bar.show(1, {"loss": 1.0, "images_per_s": 10.0}, 0.1, [])
        logging.getLogger("wildssl").info("step 1: knn_top1=0.5000")
        bar.update()
        bar.close()
        assert console in logging.getLogger().handlers
    err = capsys.readouterr().err
    assert re.search(r"(^|[\r\n])step 1: knn_top1=0\.5000\n", err), repr(err)
    assert err.count("step 1: knn_top1") == 1


def test_without_a_terminal_progress_is_a_plain_line_now_and_then_not_a_bar_per_step(capsys):
    """`wildssl train ... > log.txt 2>&1` (a batch job) wrote tqdm's carriage-return update for every step into the
    file: 33 KB of one "line" for 300 steps, about 1 KB/s on a fast GPU. Without a terminal a plain line is printed at
    the first logged step, then at most every PLAIN_PROGRESS_SECONDS, and at the last step."""
    with _console_logging():
        bar = _bar(40, terminal=False)
        for done in range(1, 41):
            bar.update()
            if done % 10 == 0:
                bar.show(done, {"loss": 1.0 / done, "images_per_s": 10.0}, 0.1, [])
        bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == ["dino: step 10/40 (25%), loss 0.1000, img/s 10, eta 0:00:03",
                                "dino: step 40/40 (100%), loss 0.0250, img/s 10, eta 0:00:00"]


@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_kept_checkpoints_are_written_at_every_keep_step_whatever_checkpoint_every_says(tmp_path, checkpoint_every):
    """train.keep_every=3 with checkpoint_every=2 (or 0: only the final one) kept no copy at step 3: a copy was
    made only on steps that also wrote the checkpoint."""
    train(_config("simclr", "train.steps=6", f"train.checkpoint_every={checkpoint_every}", "train.keep_every=3",
                  "eval.knn_every=0"), tmp_path / "run")
    kept = sorted(p.name for p in (tmp_path / "run").glob("checkpoint_*.safetensors"))
    assert kept == ["checkpoint_0000003.safetensors", "checkpoint_0000006.safetensors"]
    assert load_file(str(tmp_path / "run" / "checkpoint_0000003.safetensors"))  # a whole checkpoint


def test_a_run_evaluating_its_student_records_that_for_load_encoder_and_export(tmp_path):
    """DINO with eval.encoder=student watched the student's k-NN, but its checkpoint said eval_network teacher,
    so load_encoder, export and eval knn read the teacher: another network than the run reported on."""
    from wildssl.models.loading import evaluated_network, load_encoder

    train(_config("dino", "train.steps=2", "eval.encoder=student", "eval.knn_every=0"), tmp_path / "run")
    assert evaluated_network(tmp_path / "run") == "student"
    state = load_file(str(tmp_path / "run" / CHECKPOINT_NAME))
    loaded = load_encoder(tmp_path / "run").state_dict()
    assert all(torch.equal(value, state[f"method.student.backbone.{name}"]) for name, value in loaded.items())
    train(_config("dino", "train.steps=2", "eval.knn_every=0"), tmp_path / "auto")
    assert evaluated_network(tmp_path / "auto") == "teacher"  # auto: DINO's own network


def test_load_encoder_takes_only_a_bool_or_none_for_teacher(tmp_path):
    """load_encoder(run, teacher="no") read "no" as true and asked for a teacher."""
    from wildssl.errors import ConfigError
    from wildssl.models.loading import load_encoder

    train(_config("simclr", "train.steps=1", "eval.knn_every=0"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"teacher='no': give True \(the EMA teacher\), False"):
        load_encoder(tmp_path / "run", teacher="no")
    assert load_encoder(tmp_path / "run", teacher=False) is not None


def test_a_final_knn_that_fails_leaves_the_final_checkpoint_written(tmp_path):
    """The online k-NN ran before the step's checkpoint: when the final evaluation failed (its validation folder
    gone, the memory out of memory, non-finite features) the last steps since train.checkpoint_every were lost."""
    from safetensors import safe_open
    from wildssl.errors import DataError

    def knn(method):
        if calls.append(1) or len(calls) > 1:  # the random-init floor passes, the final evaluation fails
            raise DataError("the validation folder is gone")
        return {"knn_top1": 0.5}

    calls = []
    config = build_config(None, tiny_overrides("simclr", "train.steps=3", "train.checkpoint_every=2",
                                               "eval.knn_every=3"))
    with pytest.raises(DataError, match="validation folder"):
        train(config, tmp_path, knn_evaluator=knn)
    assert len(calls) == 2
    with safe_open(str(tmp_path / CHECKPOINT_NAME), framework="pt") as checkpoint:
        assert checkpoint.metadata()["step"] == "3"


def test_metrics_jsonl_is_strict_json_with_a_skipped_steps_loss_as_null(tmp_path, monkeypatch):
    """A skipped step's NaN loss was written as a bare NaN, which is not JSON: jq, JavaScript and strict parsers
    refused the whole file. It is null there, and NaN again to wildssl's own reader."""
    from wildssl.io import read_metrics
    from wildssl.methods.simclr import SimCLR

    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    _nan_at(monkeypatch, SimCLR, {1})
    train(_config("simclr", "train.steps=3", "train.log_every=1"), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=strict) for line in lines]
    skipped = [r for r in records if r["step"] == 2 and "loss" in r]
    assert len(skipped) == 1 and skipped[0]["loss"] is None
    assert all(r["loss"] is not None for r in records if "loss" in r and r["step"] != 2)
    read = [r for r in read_metrics(tmp_path) if r["step"] == 2 and "loss" in r]
    assert math.isnan(read[0]["loss"])


def test_a_gradient_of_exactly_zero_raises_a_training_alarm_from_the_first_logged_steps(tmp_path):
    """iBOT with every loss weight 0 (and SlotMIM's, AB_SimCLR's without its base loss at ratio 0) logged loss 0 and
    gradient 0 at every step, ending with no alarm: nothing had learnt."""
    from wildssl.train.logging import CollapseMonitor

    monitor = CollapseMonitor(after_step=100)  # watched before after_step: a zero gradient is never a phase
    fired = [monitor.check(step, {"loss": 0.0, "grad_norm": 0.0}) for step in (1, 2, 3)]
    assert fired[:2] == [[], []] and "the gradient is exactly 0" in fired[2][0]
    assert CollapseMonitor().check(5, {"loss": 1.0, "grad_norm": 1e-12}) == []
    config = build_config("ibot_quick", tiny_overrides("dino", "train.steps=4", "train.log_every=1",
                                                       "method.patch_loss_weight=0", "method.cls_loss_weight=0",
                                                       "method.patch_out_dim=64", "method.koleo_weight=0"))
    summary = train(config, tmp_path)
    assert any("the gradient is exactly 0" in alarm for alarm in summary["alarms"]), summary["alarms"]


def test_a_run_started_again_before_its_first_checkpoint_logs_its_floor_once(tmp_path):
    """A run killed before its first checkpoint, started again (with --resume, as a requeued job does), kept the
    killed attempt's step-0 rows and logged the random-init floor a second time."""
    from wildssl.io import read_metrics

    config = _config("simclr", "train.steps=2", "train.checkpoint_every=0", "eval.knn_every=2",
                     "eval.knn_train=synthetic:scenes?n=32&size=16&split=train",
                     "eval.knn_test=synthetic:scenes?n=32&size=16&split=test")
    from wildssl.eval.evaluate import make_online_knn

    train(config, tmp_path, knn_evaluator=make_online_knn(config, "cpu"))
    (tmp_path / CHECKPOINT_NAME).unlink()  # as if killed before its first checkpoint: its rows are on the disk
    train(config, tmp_path, resume=True, knn_evaluator=make_online_knn(config, "cpu"))
    floors = [r for r in read_metrics(tmp_path) if "knn_top1_random_init" in r]
    steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(floors) == 1 and steps == sorted(set(steps)), (floors, steps)
