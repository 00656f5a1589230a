"""``wildssl eval all`` and the probe verbs, end to end on synthetic scenes with a tiny encoder."""

import json

import pytest
import torch
import yaml

from wildssl.cli import main
from wildssl.io import atomic_save
from wildssl.models.loading import EXPORT_FORMAT
from wildssl.models.vit import build_encoder

TRAIN = "synthetic:scenes?n=48&size=16&split=train"
TEST = "synthetic:scenes?n=32&size=16&split=test"
MODEL = {"name": "tiny", "depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 4, "img_size": 16}
SMALL = {"epochs": 2, "lrs": [1e-3, 1e-2]}
SUITE = {"seed": 0, "probes": {
    "knn": {"train": TRAIN, "test": TEST},
    "linear": {"train": TRAIN, "test": TEST, **SMALL},
    "attentive": {"train": TRAIN, "test": TEST, **SMALL},
    "decoder": {"train": TRAIN, "test": TEST, **SMALL, "width": 32, "depth": 1, "heads": 2},
    "fewshot": {"data": TEST, "n_way": 3, "k_shot": 1, "n_query": 2, "episodes": 10},
    "discovery": {"data": TEST, "pictures": 3},
    "segment": {"train": TRAIN, "test": TEST, **SMALL, "image_size": 32},
}}


@pytest.fixture
def export(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "encoder.safetensors"
    atomic_save(dict(build_encoder(**MODEL).state_dict()),
                {"format": EXPORT_FORMAT, "config": json.dumps({"model": MODEL})}, path)
    return path


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_all_runs_every_probe_and_writes_json_markdown_and_pictures(tmp_path, export, capsys):
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(SUITE, sort_keys=False))
    out = tmp_path / "report"
    argv = ["eval", "all", str(export), "--suite", str(tmp_path / "suite.yaml"), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    assert main(argv) == 0
    printed = _last_json(capsys)
    assert printed["network"] == "export" and list(printed["probes"]) == list(SUITE["probes"])
    figures = printed["probes"]
    for value in (figures["knn"]["top1"], figures["linear"]["top1"], figures["attentive"]["top1"],
                  figures["decoder"]["image_top1"], figures["decoder"]["box_top1"], figures["fewshot"]["accuracy"],
                  figures["discovery"]["corloc"], figures["discovery"]["jaccard"], figures["segment"]["miou"]):
        assert 0.0 <= value <= 1.0
    assert figures["segment"]["grid_size"] == [8, 8]  # its own eval resolution, 32 px
    assert json.loads((out / "results.json").read_text())["probes"].keys() == figures.keys()
    report = (out / "report.md").read_text()
    for name in ("linear_curves.png", "attentive_curves.png", "decoder_curves.png", "segment_curves.png",
                 "discovery_attention.png"):
        assert (out / name).is_file() and f"]({name})" in report
    assert "| linear | top1 " in report


def test_random_init_floor_evaluates_the_same_architecture_untrained(tmp_path, export, capsys):
    swapped = {"train": TEST, "test": TRAIN}  # a second run of a probe is labelled probe@label
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"probes": {"knn": {"train": TRAIN, "test": TEST},
                                                                    "knn@swapped": swapped}}))
    argv = ["eval", "all", str(export), "--suite", str(tmp_path / "suite.yaml"), "--cache-dir", str(tmp_path / "c"),
            "--json"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    trained = _last_json(capsys)
    for seed, folder in (("0", "b"), ("0", "c"), ("1", "d")):
        assert main(argv + ["--random-init", "--seed", seed, "--out", str(tmp_path / folder)]) == 0
    floors = [json.loads((tmp_path / f / "results.json").read_text())["probes"]["knn"] for f in "bcd"]
    # the export was drawn with seed 0, so the seed-0 floor is those very weights; seed 1 is another draw
    assert floors[0]["top1"] == floors[1]["top1"] == trained["probes"]["knn"]["top1"]
    assert "random-init" in json.loads((tmp_path / "d" / "results.json").read_text())["name"]
    assert trained["probes"]["knn@swapped"]["num_test"] == 48


def test_each_probe_verb_prints_one_json_line(tmp_path, export, capsys):
    common = [str(export), "--cache-dir", str(tmp_path / "cache"), "--json"]
    splits = ["--train", TRAIN, "--test", TEST]
    runs = {"linear": splits + ["--set", "epochs=2", "--set", "lrs=[0.01]"],
            "attentive": splits + ["--set", "epochs=1", "--set", "lrs=[0.01]"],
            "decoder": splits + ["--set", "epochs=1", "--set", "lrs=[0.01]", "--set", "width=16"],
            "segment": splits + ["--set", "epochs=1", "--set", "lrs=[0.01]"],
            "fewshot": ["--data", TEST, "--set", "n_way=2", "--set", "k_shot=1", "--set", "n_query=1",
                        "--set", "episodes=5"],
            "discovery": ["--data", TEST, "--out", str(tmp_path / "discovery")]}
    headline = {"linear": "top1", "attentive": "top1", "decoder": "box_top1", "segment": "miou",
                "fewshot": "accuracy", "discovery": "corloc"}
    for verb, extra in runs.items():
        assert main(["eval", verb, *common, *extra]) == 0
        printed = _last_json(capsys)
        assert printed["probe"] == verb and 0.0 <= printed[headline[verb]] <= 1.0
    assert (tmp_path / "discovery" / "discovery_attention.png").is_file()


@pytest.mark.parametrize("suite,expected", [
    ({"probes": {"linaer": {}}}, "unknown probe 'linaer'"),
    ({"probes": {"linear": {"train": TRAIN, "test": TEST, "epoch": 3}}}, "unknown option 'epoch' of the linear probe"),
    ({"probes": {"linear": {"test": TEST}}}, "the linear probe needs 'train'"),
    ({"image_sise": 32, "probes": {"knn": {}}}, "unknown key 'image_sise'"),
    # values of the wrong type: one line naming the option, not a traceback from inside the probe
    ({"probes": {"linear": {"train": TRAIN, "test": TEST, "lrs": "1e-3,1e-2"}}},
     "option 'lrs' of the linear probe must be a list of positive numbers"),
    ({"probes": {"linear": {"train": TRAIN, "test": TEST, "lrs": [1e-3, 0]}}},
     "option 'lrs' of the linear probe must be a list of positive numbers"),
    ({"probes": {"attentive": {"train": TRAIN, "test": TEST, "epochs": 1.5}}},
     "option 'epochs' of the attentive probe must be a whole number"),
    ({"probes": {"linear": {"train": TRAIN, "test": TEST, "pools": [1]}}},
     "option 'pools' of the linear probe must be a list of names"),
    ({"probes": {"fewshot": {"data": 3}}}, "option 'data' of the fewshot probe must be a data SPEC"),
    ({"probes": {"knn": {"train": TRAIN, "test": TEST, "temperature": "warm"}}},
     "option 'temperature' of the knn probe must be a number"),
    # ranges: with the types, before the encoder is loaded and before the probes above them run
    ({"probes": {"knn": {"train": TRAIN, "test": TEST, "k": 0}}}, "option 'k' of the knn probe must be >= 1, got 0"),
    ({"probes": {"knn": {"train": TRAIN, "test": TEST}, "fewshot": {"data": TEST, "n_way": 1}}},
     "option 'n_way' of the fewshot probe must be >= 2, got 1"),
    ({"probes": {"discovery": {"data": TEST, "mass": 0}}}, "option 'mass' of the discovery probe must be > 0.0 and <= 1.0"),
    ({"probes": {"discovery": {"data": TEST, "pictures": -1}}}, "option 'pictures' of the discovery probe must be >= 0"),
    ({"probes": {"segment": {"train": TRAIN, "test": TEST, "num_classes": 0}}},
     "option 'num_classes' of the segment probe must be >= 1, got 0"),
    # NaN passed every range check (a k-NN at temperature NaN gave a figure); an empty option or suite key a traceback
    ({"probes": {"knn": {"train": TRAIN, "test": TEST, "temperature": float("nan")}}},
     "option 'temperature' of the knn probe must be a number"),
    ({"probes": {"linear": {"train": TRAIN, "test": TEST, "weight_decay": float("inf")}}},
     "option 'weight_decay' of the linear probe must be a number"),
    ({"probes": {"linear": {"train": TRAIN, "test": TEST, "epochs": None}}},
     "option 'epochs' of the linear probe must be a value (like 30), not empty"),
    ({"seed": "abc", "probes": {"knn": {"train": TRAIN, "test": TEST}}}, "seed: 'abc' in"),
    ({"batch_size": 0, "probes": {"knn": {"train": TRAIN, "test": TEST}}}, "batch_size: 0 in"),
    ({"image_size": "32", "probes": {"knn": {"train": TRAIN, "test": TEST}}}, "image_size: '32' in"),
])
def test_suite_mistakes_are_one_line_errors(tmp_path, export, capsys, suite, expected):
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    code = main(["eval", "all", str(export), "--suite", str(tmp_path / "suite.yaml"), "--out", str(tmp_path / "o"),
                 "--no-cache"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and expected in error[-1] and error[-1].startswith("wildssl: error:")


def test_a_suite_reads_numbers_as_recipes_do_and_a_single_lr_is_a_sweep_of_one(tmp_path, export, capsys):
    # PyYAML alone reads 1e-3 as a string; suites are read like recipes, where it is a number
    (tmp_path / "suite.yaml").write_text(f"probes:\n  linear: {{train: '{TRAIN}', test: '{TEST}', epochs: 1, "
                                         "lrs: [1e-3], pools: [avg]}\n")
    code = main(["eval", "all", str(export), "--suite", str(tmp_path / "suite.yaml"), "--out", str(tmp_path / "o"),
                 "--no-cache", "--json"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["probes"]["linear"]["lr"] == pytest.approx(1e-3)
    code = main(["eval", "linear", str(export), "--train", TRAIN, "--test", TEST, "--set", "epochs=1",
                 "--set", "lrs=0.01", "--set", "pools=avg", "--no-cache", "--json"])
    assert code == 0, capsys.readouterr().err
    assert _last_json(capsys)["lr"] == pytest.approx(0.01)


def test_a_probe_names_test_classes_its_train_split_lacks_and_warns_when_testing_on_its_training_images(
        tmp_path, export, caplog):
    """The k-NN did this already; the trained probes reported a figure over a misspelt class folder without a word."""
    import logging
    import shutil

    from PIL import Image

    for split, names in (("train", ("cat", "dog", "cow")), ("test", ("cat", "cow", "dgo"))):  # dgo: misspelt
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            for k in range(4):
                Image.new("RGB", (16, 16), (40 * k, 20 + 80 * len(name) % 200, 90)).save(
                    tmp_path / split / name / f"{k}.png")
    train, test = str(tmp_path / "train"), str(tmp_path / "test")
    with caplog.at_level(logging.INFO, logger="wildssl"):
        assert main(["eval", "linear", str(export), "--train", train, "--test", test, "--set", "epochs=1",
                     "--no-cache", "--json"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["linear probe: 1 of the 3 classes of the test images are not among the train split's "
                        "classes, so their images count as errors: dgo"]
    caplog.clear()
    shutil.rmtree(tmp_path / "test" / "dgo")
    with caplog.at_level(logging.INFO, logger="wildssl"):
        assert main(["eval", "linear", str(export), "--train", train, "--test", train, "--set", "epochs=1",
                     "--no-cache", "--json"]) == 0
        assert main(["eval", "linear", str(export), "--train", train, "--test", test, "--set", "epochs=1",
                     "--no-cache", "--json"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"linear probe: its test images are its training images ({train}), so the figure says "
                        "nothing about new images; give a held-out --test"]


def test_the_knn_and_fewshot_probes_read_the_feature_the_run_reads_unless_told(tmp_path, capsys):
    """`eval all RUN` read the class token of a run trained and evaluated on the mean patch token, while `eval knn
    RUN` read the mean token: two figures for one encoder and one data set, without a word."""
    torch.manual_seed(0)
    path = tmp_path / "avg_run_export.safetensors"
    atomic_save(dict(build_encoder(**MODEL).state_dict()),
                {"format": EXPORT_FORMAT, "config": json.dumps({"model": MODEL, "eval": {"pool": "avg"}})}, path)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"probes": {"knn": {"train": TRAIN, "test": TEST},
                                                "knn@cls": {"train": TRAIN, "test": TEST, "pool": "cls"},
                                                "fewshot": {"data": TEST, "n_way": 3, "k_shot": 1, "n_query": 2,
                                                            "episodes": 4}}}))
    assert main(["eval", "all", str(path), "--suite", str(suite), "--out", str(tmp_path / "o"), "--no-cache",
                 "--json"]) == 0
    probes = _last_json(capsys)["probes"]
    assert (probes["knn"]["pool"], probes["knn@cls"]["pool"], probes["fewshot"]["pool"]) == ("avg", "cls", "avg")
    assert main(["eval", "knn", str(path), "--train", TRAIN, "--test", TEST, "--json"]) == 0
    assert _last_json(capsys)["knn_top1"] == probes["knn"]["top1"]


def test_the_command_lines_seed_batch_and_data_are_used_or_refused_never_dropped(tmp_path, export, capsys):
    """`eval all --seed 7` ran the suite's seed 0, `--batch-size 0` ran; a probe verb's `--set train=...` silently
    replaced its `--train`; `--batch-size 0` and `--image-size 0` on a probe verb ended in a traceback or fell
    back to the encoder's size."""
    suite = {"probes": {"linear": {"train": TRAIN, "test": TEST, **SMALL}}}
    for seed in (0, 7):
        (tmp_path / f"s{seed}.yaml").write_text(yaml.safe_dump({**suite, "seed": seed}))
    figures = {}
    for name, extra in (("seed7", ["--seed", "7"]), ("suite7", []), ("suite0", [])):
        path = tmp_path / ("s7.yaml" if name == "suite7" else "s0.yaml")
        assert main(["eval", "all", str(export), "--suite", str(path), "--no-cache", "--json", *extra,
                     "--out", str(tmp_path / name)]) == 0
        figures[name] = _last_json(capsys)["probes"]["linear"]["grid"]
    assert figures["seed7"] == figures["suite7"] != figures["suite0"]
    for arguments, expected in (
            (["linear", "--train", TRAIN, "--test", TEST, "--set", f"train={TEST}"], "name two data sets"),
            (["linear", "--train", TRAIN, "--test", TEST, "--batch-size", "0"], "--batch-size 0 is invalid"),
            (["linear", "--train", TRAIN, "--test", TEST, "--image-size", "0"], "--image-size 0 is invalid"),
            (["all", "--suite", str(tmp_path / "s0.yaml"), "--num-workers", "-5"], "--num-workers -5 is invalid")):
        code = main(["eval", arguments[0], str(export), *arguments[1:], "--no-cache"])
        error = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and expected in error[-1], (arguments, error[-1:])


def test_a_failing_probe_keeps_the_finished_ones_and_a_second_verb_adds_to_the_same_out(tmp_path, export, capsys):
    """eval all wrote results.json only at the end, so a later probe's data error lost every finished probe; a
    second probe verb into the same --out replaced the first one's results; a label with '/' ran every probe and
    then failed writing its picture."""
    out = tmp_path / "o"
    broken = {"probes": {"knn": {"train": TRAIN, "test": TEST},
                         "linear": {"train": TRAIN, "test": str(tmp_path / "gone"), **SMALL}}}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    assert main(["eval", "all", str(export), "--suite", str(tmp_path / "broken.yaml"), "--out", str(out),
                 "--no-cache"]) == 2
    assert "data path not found" in capsys.readouterr().err
    assert set(json.loads((out / "results.json").read_text())["probes"]) == {"knn"}
    assert main(["eval", "fewshot", str(export), "--data", TEST, "--set", "n_way=3", "--set", "k_shot=1",
                 "--set", "n_query=2", "--set", "episodes=5", "--out", str(out), "--no-cache"]) == 0
    recorded = json.loads((out / "results.json").read_text())
    assert set(recorded["probes"]) == {"knn", "fewshot"} and set(recorded["suite"]["probes"]) == {"knn", "fewshot"}
    assert "## knn" in (out / "report.md").read_text()
    other = tmp_path / "other.safetensors"
    other.write_bytes(export.read_bytes())
    assert main(["eval", "fewshot", str(other), "--data", TEST, "--set", "n_way=3", "--set", "k_shot=1",
                 "--set", "n_query=2", "--set", "episodes=5", "--out", str(out), "--no-cache"]) == 2
    assert "holds the results of" in capsys.readouterr().err
    (tmp_path / "slash.yaml").write_text(yaml.safe_dump({"probes": {"knn@a/b": {"train": TRAIN, "test": TEST}}}))
    assert main(["eval", "all", str(export), "--suite", str(tmp_path / "slash.yaml"), "--no-cache"]) == 2
    assert "a probe's label may hold" in capsys.readouterr().err
