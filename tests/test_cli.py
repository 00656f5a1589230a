import json
import subprocess
import sys

import pytest
import torch

from conftest import PROCESS_GROUP, TINY_DATA, tiny_overrides
from wildssl.cli import main, parse_arguments


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train(tmp_path, capsys, method="simclr", *extra):
    argv = ["train", f"{method}_quick", "--out", str(tmp_path / "run")]
    for item in tiny_overrides(method, "train.steps=2", *extra):
        argv += ["--set", item]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_train_then_eval_knn_json_then_export_round_trip(tmp_path, capsys):
    summary = _train(tmp_path, capsys, "dino")
    assert summary["steps"] == 2
    data = "synthetic:scenes?n=32&size=16"
    code, out, err = _run(capsys, "eval", "knn", "--checkpoint", str(tmp_path / "run"), "--train",
                          data + "&split=train", "--test", data + "&split=test", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert 0.0 <= result["knn_top1"] <= 1.0
    code, out, err = _run(capsys, "eval", "knn", "--checkpoint", str(tmp_path / "run"), "--random-init",
                          "--train", data + "&split=train", "--test", data + "&split=test", "--json")
    assert code == 0, err
    assert "knn_top1" in json.loads(out.strip().splitlines()[-1])

    import wildssl

    trained = wildssl.load_encoder(tmp_path / "run")
    images = torch.randn(2, 3, 16, 16)
    for flag in ([], ["--timm"]):
        export = tmp_path / f"export{len(flag)}.safetensors"
        code, out, err = _run(capsys, "export", "--checkpoint", str(tmp_path / "run"), "--out", str(export), *flag)
        assert code == 0, err
        exported = wildssl.load_encoder(export)
        torch.testing.assert_close(exported.forward_features(images), trained.forward_features(images))
    tokens = trained.forward_features(images)
    assert tokens.shape == (2, 1 + 16, 32)


def test_train_ends_with_one_plain_line_of_trained_against_random_init_knn(tmp_path, capsys):
    argv = ["train", "simclr_quick", "--out", str(tmp_path / "run")]
    for item in tiny_overrides("simclr", "train.steps=2", "eval.knn_every=2", "eval.knn_train=" + TINY_DATA,
                               "eval.knn_test=synthetic:scenes?n=32&size=16&split=test"):
        argv += ["--set", item]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    trained, floor = 100 * summary["knn_top1"], 100 * summary["knn_top1_random_init"]
    lines = [line for line in err.splitlines() if line.startswith("wildssl: k-NN top-1")]
    # which network was read, and how (a summary said neither; the eval verbs did)
    assert summary["knn_network"] == "student" and summary["knn_pool"] == "avg"
    assert lines == [f"wildssl: k-NN top-1 {trained:.1f}% trained, {floor:.1f}% for the same encoder at random "
                     f"initialization ({trained - floor:+.1f} points; the student, mean patch token)"]


def test_a_resumed_run_compares_with_the_random_init_figure_it_recorded_before_step_0(tmp_path, capsys):
    """A resumed run lost its floor: no trained-vs-random line, no knn_top1_random_init in the summary, and a
    quality alarm the first session raised was not raised again on the same figure."""
    knn = ["eval.knn_every=2", "eval.knn_train=" + TINY_DATA, "eval.knn_test=synthetic:scenes?n=32&size=16&split=test",
           "optim.lr=1e-12"]  # a run that learns nothing: its k-NN stays at the floor
    summaries, errs = [], []
    for steps, resume in ((2, []), (4, ["--resume"])):
        argv = ["train", "simclr_quick", "--out", str(tmp_path / "run"), *resume]
        for item in tiny_overrides("simclr", f"train.steps={steps}", *knn):
            argv += ["--set", item]
        code, out, err = _run(capsys, *argv)
        assert code == 0, err
        summaries.append(json.loads(out.strip().splitlines()[-1]))
        errs.append(err)
    first, resumed = summaries
    assert resumed["start_step"] == 2
    assert resumed["knn_top1_random_init"] == first["knn_top1_random_init"]
    assert any(a.startswith("quality alarm") for a in first["alarms"])
    assert any(a.startswith("quality alarm") for a in resumed["alarms"]), resumed["alarms"]
    assert sum(line.startswith("wildssl: k-NN top-1") for line in errs[1].splitlines()) == 1, errs[1]


def test_a_resume_that_changes_the_online_knn_measures_its_floor_again_under_the_new_settings(tmp_path, capsys,
                                                                                             caplog):
    """eval.* may change on resume, but the summary compared the new k-NN with the floor measured under the old
    settings (another k here; another --val likewise), or had none when the k-NN was off at the start. The floor is
    measured again at the random initialization: the figure a new run with the new settings measures before step 0."""
    data = ["eval.knn_train=" + TINY_DATA, "eval.knn_test=synthetic:scenes?n=32&size=16&split=test"]

    def run(out, steps, *extra, resume=False):
        argv = ["train", "simclr_quick", "--out", str(tmp_path / out), *(["--resume"] if resume else [])]
        for item in tiny_overrides("simclr", f"train.steps={steps}", *data, *extra):
            argv += ["--set", item]
        code, stdout, err = _run(capsys, *argv)
        assert code == 0, err
        return json.loads(stdout.strip().splitlines()[-1]), err

    fresh, _ = run("fresh", 2, "eval.knn_every=2", "eval.knn_k=1")  # the new settings from step 0
    first, _ = run("run", 2, "eval.knn_every=2", "eval.knn_k=20")
    assert first["knn_top1_random_init"] != fresh["knn_top1_random_init"]  # else the test could not tell
    caplog.set_level("INFO", logger="wildssl")
    resumed, _ = run("run", 4, "eval.knn_every=2", "eval.knn_k=1", resume=True)
    assert resumed["knn_top1_random_init"] == fresh["knn_top1_random_init"]
    assert "eval.knn_k: 20 -> 1" in caplog.text
    # a run whose k-NN was off at its start has no floor: it is measured when a resume turns the k-NN on
    run("off", 2, "eval.knn_every=0", "eval.knn_k=1")
    turned_on, _ = run("off", 4, "eval.knn_every=2", "eval.knn_k=1", resume=True)
    assert turned_on["knn_top1_random_init"] == fresh["knn_top1_random_init"]
    # an unchanged resume reads the recorded floor again (the test above) and measures nothing
    caplog.clear()
    again, _ = run("run", 6, "eval.knn_every=2", "eval.knn_k=1", resume=True)
    assert again["knn_top1_random_init"] == fresh["knn_top1_random_init"] and "measured again" not in caplog.text


def test_training_into_a_run_that_holds_a_checkpoint_is_refused_before_any_data_is_opened(tmp_path, capsys, caplog):
    import logging

    _train(tmp_path, capsys, "simclr")
    caplog.clear()
    checkpoint = tmp_path / "run" / "checkpoint.safetensors"
    before = checkpoint.read_bytes()
    argv = ["train", "simclr_quick", "--out", str(tmp_path / "run")]
    for item in tiny_overrides("simclr", "train.steps=2", "eval.knn_every=2"):  # a k-NN that would open its data
        argv += ["--set", item]
    with caplog.at_level(logging.INFO, logger="wildssl"):
        code, out, err = _run(capsys, *argv)
    assert code == 2 and checkpoint.read_bytes() == before
    assert not [r.getMessage() for r in caplog.records if "online k-NN" in r.getMessage()]
    assert err.strip().splitlines() == [f"wildssl: error: run directory {tmp_path / 'run'} already holds a checkpoint; "
                                        "pass --resume to continue it or choose another --out"]  # no k-NN set-up line


def test_teacher_is_the_default_encoder_and_student_is_selectable(tmp_path, capsys):
    _train(tmp_path, capsys, "dino", "ema.momentum=0.5")
    import wildssl

    teacher, student = wildssl.load_encoder(tmp_path / "run"), wildssl.load_encoder(tmp_path / "run", teacher=False)
    assert not torch.equal(teacher.cls_token, student.cls_token)
    assert torch.equal(wildssl.load_encoder(tmp_path / "run", teacher=True).cls_token, teacher.cls_token)


@pytest.mark.parametrize("argv, expected", [
    (["train", "simclr_quick", "--data", "/no/such/folder"], "data path not found: /no/such/folder"),
    (["train", "simclr_quick", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train", "no_such_recipe"], "unknown recipe 'no_such_recipe'"),
    (["eval", "knn", "--checkpoint", "/no/such/run", "--train", "synthetic:scenes", "--test", "synthetic:scenes"],
     "checkpoint not found: /no/such/run"),
])
def test_bad_input_is_one_line_error_with_status_2(capsys, argv, expected):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err


# every command that reads a checkpoint, with its other required arguments
CHECKPOINT_COMMANDS = [
    (["eval", "knn"], ["--train", "a", "--test", "b"]),
    (["eval", "all"], ["--suite", "s.yaml"]),
    *[(["eval", verb], ["--train", "a", "--test", "b"]) for verb in ("linear", "attentive", "decoder", "segment")],
    *[(["eval", verb], ["--data", "a"]) for verb in ("fewshot", "discovery", "zeroshot")],
    (["export"], ["--out", "x.safetensors"]),
]


@pytest.mark.parametrize("command, rest", CHECKPOINT_COMMANDS, ids=[" ".join(c) for c, _ in CHECKPOINT_COMMANDS])
def test_every_command_takes_the_checkpoint_as_first_argument_or_as_an_option(command, rest, capsys):
    positional = parse_arguments([*command, "runs/a", *rest])
    assert positional.checkpoint == "runs/a"
    assert parse_arguments([*command, *rest, "--checkpoint", "runs/a"]).checkpoint == "runs/a"
    assert parse_arguments([*command, *rest, "runs/a", "--checkpoint", "runs/a"]).checkpoint == "runs/a"
    with pytest.raises(SystemExit) as exit_:
        parse_arguments([*command, "runs/a", "--checkpoint", "runs/b", *rest])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"wildssl {' '.join(command)}: error: two checkpoints given: runs/a and --checkpoint runs/b" in err
    if command != ["eval", "knn"]:  # k-NN also runs without one (--random-init --model)
        with pytest.raises(SystemExit):
            parse_arguments([*command, *rest])
        assert f"wildssl {' '.join(command)}: error: the checkpoint is required" in capsys.readouterr().err


def test_an_unknown_option_is_reported_by_its_command_with_its_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_arguments(["eval", "linear", "--run", "runs/a", "--train", "a", "--test", "b"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "wildssl eval linear: error: unrecognized arguments: --run" in err
    assert err.startswith("usage: wildssl eval linear")


def test_corrupt_checkpoint_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    code, out, err = _run(capsys, "export", "--checkpoint", str(bad), "--out", str(tmp_path / "x.safetensors"))
    assert code == 2 and "cannot read checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_recipes_lists_every_shipped_recipe(capsys):
    code, out, _ = _run(capsys, "recipes")
    assert code == 0
    names = {line.split()[0] for line in out.splitlines()}
    assert {"demo", "dino", "dino_quick", "simclr", "simclr_quick"} <= names


@PROCESS_GROUP
def test_ddp_training_with_two_gloo_processes(tmp_path):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "wildssl.cli", "train", "simclr_quick", "--out", str(tmp_path / "ddp")]
    for item in tiny_overrides("simclr", "train.steps=2"):
        argv += ["--set", item]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout  # only rank 0 prints the summary
    summary = json.loads(lines[0])
    assert summary["steps"] == 2 and (tmp_path / "ddp" / "checkpoint.safetensors").is_file()


def test_demo_json_line_has_trained_and_random_knn(tmp_path, capsys):
    code, out, err = _run(capsys, "demo", "--json", "--out", str(tmp_path / "demo"), "--set", "train.steps=2",
                          "--set", "train.progress=false")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert 0 <= result["knn_top1_trained"] <= 1 and 0 <= result["knn_top1_random"] <= 1
    assert result["steps"] == 2 and result["method"] == "ab_clip"


def test_eval_knn_pools_as_the_run_did_unless_told(tmp_path, capsys):
    # A run whose own k-NN read the mean patch token is evaluated (and its random-init floor too) on that
    # feature by default; --pool still chooses.
    _train(tmp_path, capsys, "simclr", "method.pool=avg", "eval.pool=avg")
    data = "synthetic:scenes?n=16&size=16"
    common = ["eval", "knn", "--checkpoint", str(tmp_path / "run"), "--train", data + "&split=train",
              "--test", data + "&split=test", "--json"]
    for extra, pool in (([], "avg"), (["--random-init"], "avg"), (["--pool", "cls"], "cls")):
        code, out, err = _run(capsys, *common, *extra)
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["pool"] == pool


def test_export_never_writes_over_a_training_checkpoint_or_into_a_folder(tmp_path, capsys):
    """`wildssl export RUN --out RUN/checkpoint.safetensors` replaced the run's checkpoint (optimizer, heads,
    teacher) by the 1-encoder export; `--out .` was a ValueError traceback."""
    _train(tmp_path, capsys, "dino")
    run, other = tmp_path / "run", tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.safetensors").write_bytes((run / "checkpoint.safetensors").read_bytes())
    before = (run / "checkpoint.safetensors").read_bytes()
    cases = [(run / "checkpoint.safetensors", "is the checkpoint being exported"),
             (other / "checkpoint.safetensors", "is a training checkpoint"),
             (tmp_path, "is a folder; give a file name")]
    for out, expected in cases:
        code, _, err = _run(capsys, "export", str(run), "--out", str(out))
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert (run / "checkpoint.safetensors").read_bytes() == before
    assert (other / "checkpoint.safetensors").read_bytes() == before
    export = tmp_path / "export.safetensors"  # an export may replace an export
    for _ in range(2):
        assert _run(capsys, "export", str(run), "--out", str(export))[0] == 0


def test_an_export_is_evaluated_with_the_runs_pooling_and_its_timm_snippet_is_valid_python(tmp_path, capsys):
    """dino_quick evaluates the mean patch token; its export used to be read with the class token (another
    figure for the same weights, without a word), and the --timm snippet passed num_classes twice."""
    import ast

    from wildssl.models.loading import read_checkpoint_config

    _train(tmp_path, capsys, "dino", "method.pool=avg", "eval.pool=avg")
    run, export = tmp_path / "run", tmp_path / "export.safetensors"
    code, out, err = _run(capsys, "export", str(run), "--out", str(export), "--timm")
    assert code == 0, err
    call = next(line.strip() for line in out.splitlines() if "timm.create_model(" in line)
    keywords = [k.arg for k in ast.parse(call).body[0].value.keywords]  # a SyntaxError before
    assert len(keywords) == len(set(keywords)) and "global_pool='avg'" in call
    assert read_checkpoint_config(export)["eval"] == {"pool": "avg"}
    data = "synthetic:scenes?n=32&size=16"
    figures = []
    for checkpoint in (run, export):
        code, out, err = _run(capsys, "eval", "knn", str(checkpoint), "--train", data + "&split=train", "--test",
                              data + "&split=test", "--json")
        assert code == 0, err
        figures.append(json.loads(out.strip().splitlines()[-1]))
    assert figures[0]["pool"] == figures[1]["pool"] == "avg"
    assert figures[0]["knn_top1"] == figures[1]["knn_top1"]


def test_plot_checks_its_out_path_before_reading_the_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _train(tmp_path, capsys, "simclr")
    run = tmp_path / "run"
    code, out, err = _run(capsys, "plot", str(run), "--out", str(tmp_path / "new" / "curves"))
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'new' / 'curves.png'}"  # the file it wrote
    assert (tmp_path / "new" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    for out_arg, expected in ((str(tmp_path) + "/", "is a folder; give a file name"),
                              (str(tmp_path / "p.xyz"), "cannot write a .xyz file; use one of .png"),
                              (str(run / "metrics.jsonl" / "p.png"), "cannot make its folder")):
        code, _, err = _run(capsys, "plot", str(run), "--out", out_arg)
        assert code == 2 and expected in err and "Traceback" not in err, err


def test_a_file_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path, capsys):
    """A place no check names first (a probe's --out that is a file) ends in one line with the system's reason."""
    _train(tmp_path, capsys, "simclr")
    blocker = tmp_path / "report"
    blocker.write_text("a file where the report folder would go")
    data = "synthetic:scenes?n=32&size=16&split=test"
    code, _, err = _run(capsys, "eval", "fewshot", str(tmp_path / "run"), "--data", data, "--set", "n_way=2",
                        "--set", "k_shot=1", "--set", "episodes=2", "--no-cache", "--out", str(blocker))
    assert code == 2 and err.strip().splitlines()[-1] == f"wildssl: error: File exists: {blocker}", err


def test_demo_into_a_used_run_directory_says_to_choose_another_out(tmp_path, capsys):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"x")
    code, _, err = _run(capsys, "demo", "--out", str(tmp_path))
    assert code == 2 and err.strip() == (f"wildssl: error: {tmp_path} already holds a run; give the demo another --out "
                                         "(or none: runs/demo-<time>)")  # it said "pass --resume", which demo lacks


def test_resume_without_a_run_to_continue_is_said_plainly(tmp_path, capsys, caplog):
    """--resume without --out made a new runs/<method>-<time> folder; --resume on a misspelt --out started at
    step 0 with an info line only (a preemptible job's first start needs that to work, so it is a warning)."""
    import logging

    code, _, err = _run(capsys, "train", "simclr_quick", "--resume")
    assert code == 2 and err.strip() == "wildssl: error: --resume needs --out RUN: the run directory to continue"
    argv = ["train", "simclr_quick", "--out", str(tmp_path / "typo"), "--resume"]
    for item in tiny_overrides("simclr", "train.steps=1"):
        argv += ["--set", item]
    with caplog.at_level(logging.INFO, logger="wildssl"):
        code, out, err = _run(capsys, *argv)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["start_step"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--resume" in r.getMessage()]
    assert warnings == [f"--resume: no checkpoint in {tmp_path / 'typo'} yet, so this run starts at step 0 (is that "
                        "the run directory you meant?)"]


def test_resuming_with_another_config_names_what_differs_the_method_first(tmp_path, capsys):
    from wildssl.errors import ConfigError
    from wildssl.train.config import build_config
    from wildssl.train.run import check_resume_config

    saved = build_config("simclr_quick")
    check_resume_config(saved, build_config("simclr_quick", ["eval.knn_every=7"]), "run")  # eval.* may change
    with pytest.raises(ConfigError) as info:
        check_resume_config(saved, build_config("simclr_quick", ["train.batch_size=8"]), "run")
    assert str(info.value) == ("cannot resume run: the config differs from the checkpoint's (train.batch_size: 128 -> "
                               "8); use the same recipe and --set values, or a new --out directory")
    with pytest.raises(ConfigError) as info:
        check_resume_config(saved, build_config("dino_quick"), "run")
    message = str(info.value)
    assert message.startswith("cannot resume run: the config differs from the checkpoint's (method.name: 'simclr' -> "
                              "'dino', ") and " more keys); use the same recipe" in message
    _train(tmp_path, capsys, "simclr")  # and through the command line, before any step
    argv = ["train", "dino_quick", "--out", str(tmp_path / "run"), "--resume"]
    for item in tiny_overrides("dino", "train.steps=2"):
        argv += ["--set", item]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "(method.name: 'simclr' -> 'dino', " in err and len(err.strip().splitlines()) == 1, err


def test_options_a_command_would_ignore_are_one_line_errors(tmp_path, capsys):
    """`eval knn --model/--patch-size` with a checkpoint (the checkpoint's architecture is used), `eval knn --seed` without
    --random-init and `plot --count/--seed` without --reconstructions used to be dropped without a word."""
    _train(tmp_path, capsys, "simclr")
    run, data = str(tmp_path / "run"), "synthetic:scenes?n=32&size=16"
    for extra, expected in ((["--model", "base"], "--model only builds an architecture for --random-init without a"),
                            (["--patch-size", "8", "--random-init"], "--patch-size only builds an architecture"),
                            (["--seed", "3"], "--seed only seeds --random-init's weights")):
        code, out, err = _run(capsys, "eval", "knn", run, "--train", data + "&split=train", "--test",
                              data + "&split=test", *extra)
        assert code == 2 and expected in err, err
        assert "Traceback" not in err and out == ""
    code, out, err = _run(capsys, "eval", "knn", "--random-init", "--model", "tiny", "--patch-size", "8",
                          "--image-size", "16", "--train", data + "&split=train", "--test", data + "&split=test", "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["network"] == "random-init", err
    for extra in (["--count", "3"], ["--seed", "1"]):
        code, out, err = _run(capsys, "plot", run, "--out", str(tmp_path / "curves.png"), *extra)
        assert code == 2 and f"{extra[0]} only applies to --reconstructions" in err, err
    assert not (tmp_path / "curves.png").exists()


def test_an_empty_data_option_is_an_error_not_the_recipes_data(tmp_path, capsys):
    """`--data "$DATA"` with $DATA unset trained on the recipe's synthetic scenes without a word."""
    for command in (["train", "simclr_quick", "--out", str(tmp_path / "run")], ["config", "simclr_quick"],
                    ["bench", "simclr_quick"]):
        for flag in ("--data", "--val") if command[0] == "train" else ("--data",):
            code, out, err = _run(capsys, *command, flag, "")
            assert code == 2 and f"{flag} is empty: give a data SPEC" in err, (command, flag, err)
    assert not (tmp_path / "run").exists()


def test_recipes_lists_each_recipe_with_its_first_sentence_whole(capsys):
    """`wildssl recipes` printed each file's first comment line, so a sentence that went on below was cut:
    'slotmim ... (Wen et al. 2025,', 'adasim_simsiam_quick ... sampled by'."""
    from wildssl.cli import _recipe_summary
    from wildssl.train.config import recipe_names

    assert _recipe_summary("# A headline without a stop\n# Then the body. More.\nkey: 1\n") == "A headline without a stop"
    assert _recipe_summary("# Cut at a comma,\n# 2300 steps and\n# AdaSim's pairs. Next.\n") == \
        "Cut at a comma, 2300 steps and AdaSim's pairs."
    code, out, _ = _run(capsys, "recipes")
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert sorted(lines) == recipe_names()
    for name, summary in lines.items():
        assert summary.rstrip(".").split()[-1] not in ("by", "of", "the", "and") and not summary.endswith(","), name
    assert lines["slotmim"].endswith("(--group-loss-weight 0.5)"), lines["slotmim"]


def test_under_torchrun_only_the_first_process_prints_information_lines(monkeypatch):
    """The online k-NN's set-up line (and every other information line) was printed once per process."""
    import logging

    from wildssl.cli import _configure_logging

    logger = logging.getLogger("wildssl")
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    for rank, level in (("0", logging.NOTSET), ("1", logging.WARNING)):
        logger.setLevel(logging.NOTSET)
        monkeypatch.setenv("RANK", rank)
        _configure_logging()
        assert logger.level == level, rank


def test_num_heads_on_a_wildssl_file_and_neighbours_beside_reconstructions_are_one_line_errors(tmp_path, capsys):
    """`--num-heads 7` on a wildssl run ran with the run's own heads, and `plot --reconstructions ... --neighbours 3`
    drew the reconstructions only: both options were dropped without a word."""
    _train(tmp_path, capsys, "simclr")
    run, data = str(tmp_path / "run"), "synthetic:scenes?n=32&size=16"
    for command in (["eval", "knn", run, "--train", data + "&split=train", "--test", data + "&split=test"],
                    ["eval", "linear", run, "--train", data + "&split=train", "--test", data + "&split=test",
                     "--no-cache"]):
        code, out, err = _run(capsys, *command, "--num-heads", "7")
        assert code == 2 and "--num-heads applies to a peer's file" in err, err
    code, out, err = _run(capsys, "plot", run, "--reconstructions", data, "--neighbours", "3",
                          "--out", str(tmp_path / "r.png"))
    assert code == 2 and "give one of them" in err and not (tmp_path / "r.png").exists(), err


def test_train_and_demo_refuse_an_out_folder_of_other_files(tmp_path, capsys):
    """`wildssl train ... --out PHOTOS` (or `demo --out` onto a benchmark folder) wrote checkpoint, config.yaml,
    metrics.jsonl and tensorboard/ among the user's files: tensorboard/ then read as a class of the image folder."""
    photos = tmp_path / "photos"
    (photos / "cat").mkdir(parents=True)
    (photos / "cat" / "1.png").write_bytes(b"")
    for argv in (["train", "simclr_quick", "--set", "train.steps=1", "--out", str(photos)],
                 ["demo", "--out", str(photos)]):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"wildssl: error: --out {photos} is a folder of other files ('cat') that holds no run; "
                           "a run writes its checkpoint, config.yaml, metrics.jsonl and tensorboard/ there: give a "
                           "new or empty folder")
        assert sorted(p.name for p in photos.iterdir()) == ["cat"]


def test_an_error_raised_in_a_data_worker_is_one_line(capsys, monkeypatch):
    """PyTorch re-raises a worker's DataError with the worker's whole traceback as its message, and the CLI
    printed it all after "wildssl: error: Caught DataError in DataLoader worker process 1."."""
    from torch.utils.data import DataLoader, Dataset

    import wildssl.cli
    from wildssl.errors import DataError

    class Unreadable(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise DataError("tar shard x.tar: k.cls holds 'cat', expected an integer label >= 0")

    def train_from_a_worker(args):
        next(iter(DataLoader(Unreadable(), num_workers=1)))

    with pytest.raises(DataError, match="Caught DataError in DataLoader worker") as error:
        train_from_a_worker(None)
    assert wildssl.cli._one_line(error.value) == "tar shard x.tar: k.cls holds 'cat', expected an integer label >= 0"
    args = parse_arguments(["recipes"])
    monkeypatch.setattr(wildssl.cli, "parse_arguments", lambda argv: args)
    args.func = train_from_a_worker
    assert main(["recipes"]) == 2
    assert capsys.readouterr().err.strip() == ("wildssl: error: tar shard x.tar: k.cls holds 'cat', expected an "
                                               "integer label >= 0")


@pytest.mark.parametrize("override, said", [
    ("method.photometric=bogus", "method.photometric='bogus' is not a photometric pipeline"),
    ("method.centering=bogus", "method.centering='bogus' must be one of center, sinkhorn"),
    ("model.name=foo", "unknown encoder 'foo'; valid names: tiny, small"),
])
def test_config_refuses_what_train_refuses_the_values_a_method_checks_itself(capsys, override, said):
    """`wildssl config` printed these configs and exited 0, though `train` refused them (after opening the data, for
    model.name): the method is built on the meta device first, by both."""
    code, out, err = _run(capsys, "config", "dino_quick", "--set", override)
    assert code == 2 and out == "" and err.strip().splitlines() == [f"wildssl: error: {err.split('error: ', 1)[1].strip()}"]
    assert said in err


def test_data_replaces_a_recipes_synthetic_knn_sets_so_the_online_knn_measures_the_users_data(tmp_path, capsys):
    """wsp_quick pins its online k-NN to synthetic scenes: with --data FOLDER the k-NN, its quality alarm and the
    final trained-vs-random line still measured the scenes (with --val, a memory of scenes against the user's test
    images, matched by integer label)."""
    import yaml

    def knn_sets(*argv):
        code, out, err = _run(capsys, "config", "wsp_quick", *argv)
        assert code == 0, err
        ecfg = yaml.safe_load(out)["eval"]
        return ecfg["knn_train"], ecfg["knn_test"], err

    photos, val = str(tmp_path / "photos"), str(tmp_path / "val")
    assert knn_sets("--data", photos)[:2] == (None, None)  # the data's labelled images, in folds
    memory, test, err = knn_sets("--data", photos, "--val", val)
    assert (memory, test) == (None, val) and "not the recipe's synthetic scenes (eval.knn_train left out)" in err
    memory, test, _ = knn_sets("--data", photos, "--set", "eval.knn_train=synthetic:scenes?n=64&split=train")
    assert memory == "synthetic:scenes?n=64&split=train" and test is None  # what the user sets stays
    assert knn_sets()[0].startswith("synthetic:")  # the recipe alone keeps its sets


@pytest.mark.parametrize("method", ["mae", "ijepa"])
def test_eval_random_init_of_a_run_is_the_runs_own_floor(tmp_path, capsys, monkeypatch, method):
    """MAE's and I-JEPA's runs fix their position table to sine-cosine; `eval knn RUN --random-init` built the bare
    architecture with a random table, so its floor (24.8% on CIFAR-10) was not the run's (27.0%), nor were the
    probes'. The encoder it evaluates is now the run's initial one, tensor for tensor."""
    import wildssl.eval.evaluate as evaluate_module
    from wildssl.methods import build_initial_method
    from wildssl.train.config import build_config

    argv = ["train", f"{method}_quick", "--out", str(tmp_path / "run")]
    for item in tiny_overrides(method, "train.steps=1", "eval.knn_every=0"):
        argv += ["--set", item]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    seen = []
    monkeypatch.setattr(evaluate_module, "evaluate_knn", lambda encoder, *a, **k: seen.append(encoder) or
                        {"knn_top1": 0.0})
    code, out, err = _run(capsys, "eval", "knn", str(tmp_path / "run"), "--random-init", "--train", TINY_DATA,
                          "--test", TINY_DATA, "--json")
    assert code == 0 and len(seen) == 1, err
    initial = build_initial_method(build_config(f"{method}_quick", tiny_overrides(method)), load_init_from=False)
    expected = initial.encoder(None).state_dict()
    for key, value in seen[0].state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_resume_reports_the_runs_figures_and_measures_a_lost_floor_again(tmp_path, capsys, caplog):
    """A resume with nothing left to train printed a summary without final_loss or k-NN (scripts that read it broke);
    a resume whose metrics.jsonl was deleted lost its floor without a word, and with it the quality alarm."""
    knn = ["eval.knn_every=2", "eval.knn_train=" + TINY_DATA, "eval.knn_test=synthetic:scenes?n=32&size=16&split=test"]

    def run(steps, resume):
        argv = ["train", "simclr_quick", "--out", str(tmp_path / "run"), *(["--resume"] if resume else [])]
        for item in tiny_overrides("simclr", f"train.steps={steps}", *knn):
            argv += ["--set", item]
        code, out, err = _run(capsys, *argv)
        assert code == 0, err
        return json.loads(out.strip().splitlines()[-1])

    first = run(2, False)
    again = run(2, True)  # nothing left to train
    for key in ("final_loss", "knn_top1", "knn_top1_random_init"):
        assert again[key] == first[key], key
    run(1, True)  # shorter than the run: nothing trained, and config.yaml keeps the length it was trained to
    assert "steps: 2\n" in (tmp_path / "run" / "config.yaml").read_text()
    (tmp_path / "run" / "metrics.jsonl").unlink()
    caplog.set_level("WARNING", logger="wildssl")
    resumed = run(4, True)
    assert resumed["knn_top1_random_init"] == first["knn_top1_random_init"]  # the same initialization, measured again
    assert "the floor measured before step 0 is not in" in caplog.text
