"""``wildssl benchmark``: every shipped suite runs at tiny scale, resumes without redoing finished runs, and its
table is rebuilt from the recorded runs with mean and spread computed as numpy does."""

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from wildssl.benchmark import runner, table, tiny
from wildssl.benchmark.prepare import prepare
from wildssl.benchmark.suite import check_suite, read_suite
from wildssl.cli import main
from wildssl.eval.report import probe_kind
from wildssl.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted((ROOT / "benchmarks" / "suites").glob("*.yaml"))
SHIPPED = {"object_centric", "scene_data", "decoupled", "weak_supervision", "adasim", "maws", "slotmim"}

# A two-entry suite of its own for the resume, report and spread tests (k-NN only: cheap).
SMALL = """
name: small
mirrors: a test
direction: none
seeds: 2
data:
  train: synthetic:scenes?n=16&size=16&colours=2&num_classes=4&split=train
  test: synthetic:scenes?n=16&size=16&colours=2&num_classes=4&split=test
entries:
  - {label: simclr, recipe: simclr_quick, streams: {train: train}}
  - {label: dino, recipe: dino_quick, streams: {train: train}}
probes:
  knn: {train: train, test: test}
knn_curve: {train: train, test: test, points: 2}
"""


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of table.md's main table: {entry: [cells after the runs column]}."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("entry",) and not cells[0].startswith("---"):
            rows[cells[0]] = cells[2:]
    return rows


def test_the_seven_suites_of_issue_13_are_shipped_and_name_their_seed_table_and_direction():
    assert {p.stem for p in SUITES} == SHIPPED
    for path in SUITES:
        suite = read_suite(path)
        assert path.read_text().startswith("# Mirrors seed"), path.name
        assert suite["name"] == path.stem and suite["mirrors"].startswith("seed") and suite["direction"]


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.stem)
def test_every_suite_resolves_at_cpu_and_gpu_scale_with_equal_images_seen_and_one_network(path, tmp_path):
    suite = read_suite(path)
    specs = {name: f"/prepared/{name}" for name in suite["data"]}  # paths are not opened when configs are built
    for scale in ("cpu", "gpu"):
        configs = [runner.entry_config(suite, entry, scale, 0, specs, tmp_path)[0] for entry in suite["entries"]]
        assert len({c["train"]["images"] for c in configs}) == 1, scale
        assert {c["eval"]["encoder"] for c in configs} == {suite["network"]}
        # the scale's model, the same for every entry (the floor is the first entry's architecture)
        assert len({json.dumps({k: c["model"][k] for k in ("name", "depth", "embed_dim", "patch_size", "img_size")})
                    for c in configs}) == 1
        for entry, config in zip(suite["entries"], configs):
            for stream, name in entry["streams"].items():
                assert config["data"][stream] == specs[name]
        # a k-NN probe reads the feature each entry trains and watches (its eval.pool), for the floor too
        knn_pools = {options.get("pool", "cls") for name, options in suite["probes"].items()
                     if probe_kind(name) == "knn"}
        if knn_pools:
            assert {c["eval"]["pool"] for c in configs} <= knn_pools, (scale, knn_pools)


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.stem)
def test_every_suite_runs_at_tiny_scale_and_tables_each_entry_and_the_floor(path, tmp_path):
    runner.run_benchmark(path, "tiny", seeds=1, out=tmp_path)
    suite = read_suite(path)
    labels = [e["label"] for e in suite["entries"]]
    rows = table_rows((tmp_path / "table.md").read_text())
    assert list(rows) == ["random_init", *labels]
    for label in ["random_init", *labels]:
        record = json.loads((tmp_path / "runs" / f"{label}-s0" / "result.json").read_text())
        for probe in suite["probes"]:
            figures = record["probes"][probe]
            assert "skipped" in figures or all(np.isfinite(v) for v in figures.values()), (label, probe)
        if label != "random_init":
            assert record["images"] == tiny.IMAGES and record["steps"] >= 1  # equal images seen
    assert all(cell != "" for cells in rows.values() for cell in cells)


def _small_suite(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    return path


def test_resuming_a_killed_suite_reruns_nothing_that_finished(tmp_path, monkeypatch, capsys):
    from wildssl.train import engine

    calls = []
    real_train = engine.train

    def counting_train(config, out_dir, *args, **kwargs):
        calls.append(Path(out_dir).parent.name)
        return real_train(config, out_dir, *args, **kwargs)

    monkeypatch.setattr(engine, "train", counting_train)
    out = tmp_path / "out"
    runner.run_benchmark(_small_suite(tmp_path), "tiny", out=out)
    assert sorted(calls) == ["dino-s0", "dino-s1", "simclr-s0", "simclr-s1"]
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(progress) == 6 and all(re.match(r"\[\d/6\] small \w+ seed \d: [\d.]+ s; elapsed .*; ETA ", line)
                                      for line in progress)
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert len(stamps) == 6  # 4 runs and 2 floors
    # killed during training of dino seed 1 (nothing of it recorded) and during evaluation of simclr seed 0
    (out / "runs" / "dino-s1" / "result.json").unlink()
    (out / "runs" / "dino-s1" / "train_done.json").unlink()
    (out / "runs" / "simclr-s0" / "result.json").unlink()
    calls.clear()
    runner.run_benchmark(_small_suite(tmp_path), "tiny", out=out)
    assert calls == ["dino-s1"]  # simclr-s0 had finished training: only evaluated again
    # dino-s1 was killed after its last checkpoint: the engine resumed it there and trained no step again
    summary = json.loads((out / "runs" / "dino-s1" / "train_done.json").read_text())
    assert summary["start_step"] == summary["total_steps"] == summary["steps"]
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.endswith("recorded, skipped")]
    assert len(skipped) == 4
    for name, stamp in stamps.items():
        now = (out / "runs" / name / "result.json").stat().st_mtime_ns
        assert (now == stamp) == (name not in ("dino-s1", "simclr-s0")), name


def test_report_rebuilds_the_same_table_from_the_recorded_runs(tmp_path, capsys):
    out = tmp_path / "out"
    runner.run_benchmark(_small_suite(tmp_path), "tiny", seeds=1, out=out)
    first = (out / "table.md").read_text()
    assert "![" not in first  # tiny runs draw no plots; report draws them and links them below the table
    results = json.loads((out / "results.json").read_text())
    (out / "table.md").unlink()
    (out / "results.json").unlink()
    assert main(["benchmark", "report", str(out)]) == 0
    rebuilt = (out / "table.md").read_text()
    assert "\n".join(line for line in rebuilt.splitlines() if not line.startswith("![")).rstrip() == first.rstrip()
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "probes.png").is_file() and (out / "knn_curve.png").is_file()
    # the k-NN curve of every run starts at the random initialization (step 0) and ends at its last step
    for run in results["runs"]:
        if run["label"] != "random_init":
            assert run["knn_curve"][0][0] == 0 and run["knn_curve"][-1][0] == run["steps"]


def test_a_table_without_recorded_runs_is_valid_markdown_and_the_eta_counts_only_runs_to_do(tmp_path, capsys):
    from wildssl.benchmark.table import markdown

    suite = check_suite({"name": "empty", "data": {"d": "synthetic:scenes"},
                         "entries": [{"label": "a", "recipe": "simclr_quick", "streams": {"train": "d"}}],
                         "probes": {"knn": {"train": "d", "test": "d"}}})
    meta = {"suite": suite, "scale": "tiny", "seeds": [0], "command": "c", "device": "d", "started": "s"}
    text = markdown(meta, [], {})
    header, separator = [line for line in text.splitlines() if line.startswith("|")]
    assert header == "| entry | runs |" and separator == "|---|---|"  # was "| entry | runs |  |" over two columns
    assert "**0 of the 2 runs of this command recorded so far**" in text  # a table read mid-run says it
    out = tmp_path / "out"
    runner.run_benchmark(_small_suite(tmp_path), "tiny", seeds=1, out=out)
    (out / "runs" / "random_init-s0" / "result.json").unlink()  # the first job runs again, the rest is recorded
    capsys.readouterr()
    runner.run_benchmark(_small_suite(tmp_path), "tiny", seeds=1, out=out)
    lines = [line for line in capsys.readouterr().err.splitlines() if "random_init seed 0:" in line]
    assert len(lines) == 1 and lines[0].endswith("ETA 0 s for 0 more"), lines


def test_a_misspelt_prepared_set_is_named_before_any_run_starts(tmp_path):
    # 'cifar10:trian' was taken as a path and failed as "data path not found" once the floor's run had started
    suite = tmp_path / "typo.yaml"
    suite.write_text("name: typo\ndata: {d: 'cifar10:trian'}\nentries:\n"
                     "  - {label: a, recipe: simclr_quick, streams: {train: d}}\nprobes: {knn: {train: d, test: d}}\n")
    with pytest.raises(ConfigError, match=r"suite typo data d: 'cifar10:trian' is no prepared data set; did you "
                                          r"mean 'cifar10:train'\?"):
        runner.run_benchmark(suite, "cpu", out=tmp_path / "out")
    assert not (tmp_path / "out" / "runs").exists()


def test_table_cells_are_numpy_mean_and_sample_standard_deviation_of_the_recorded_values(tmp_path, caplog):
    suite = check_suite({"name": "formula", "data": {"d": "synthetic:scenes"}, "seeds": 3,
                         "entries": [{"label": "a", "recipe": "simclr_quick", "streams": {"train": "d"}}],
                         "probes": {"knn": {"train": "d", "test": "d"}},
                         "metrics": ["embedding_std", "neighbour_ratio"]})
    (tmp_path / "suite.json").write_text(json.dumps({"suite": suite, "scale": "tiny", "seeds": [0, 1, 2],
                                                     "command": "c", "device": "d", "started": "s"}))
    rng = np.random.default_rng(0)
    values = {"a": rng.uniform(0, 1, 3), "random_init": rng.uniform(0, 1, 3)}
    stds = rng.uniform(0, 2, 3)
    for label, figures in values.items():
        for seed, value in enumerate(figures):
            folder = tmp_path / "runs" / f"{label}-s{seed}"
            folder.mkdir(parents=True)
            (folder / "result.json").write_text(json.dumps(
                {"label": label, "seed": seed, "probes": {"knn": {"top1": value}}, "train_seconds": 1.0,
                 "eval_seconds": 1.0, "metrics": {"embedding_std": stds[seed]} if label == "a" else {},
                 "knn_curve": []}))
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        results = table.write_outputs(tmp_path, plots=False)
    # a metric no run logged (SimCLR has no neighbour_ratio) is named, not only a column of "-"
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'table.md'}: no run logged the metrics neighbour_ratio (names as in the runs' metrics.jsonl)"]
    assert "recorded so far" not in (tmp_path / "table.md").read_text()  # all 6 runs are there
    rows = table_rows((tmp_path / "table.md").read_text())
    for label, figures in values.items():
        mean, sd = np.mean(figures), np.std(figures, ddof=1)
        stats = results["table"][label]["knn top1"]
        assert stats["n"] == 3 and abs(stats["mean"] - mean) < 1e-12 and abs(stats["spread"] - sd) < 1e-12
        assert rows[label][0] == f"{100 * mean:.1f} ± {100 * sd:.1f}"
    assert rows["a"][1] == f"{np.mean(stds):.3f} ± {np.std(stds, ddof=1):.3f}"  # metrics: not in percent
    assert rows["random_init"][1] == "-"


def test_a_single_seed_has_no_spread():
    assert table.spread([0.25]) == (0.25, None)
    assert table.cell({"mean": 0.25, "spread": None, "n": 1}, percent=True) == "25.0"


def test_bad_suites_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMALL.replace("entries:", "entriez:"))
    with pytest.raises(ConfigError, match="unknown key 'entriez'") as error:
        read_suite(bad)
    assert "\n" not in str(error.value)
    assert main(["benchmark", "run", str(bad), "--scale", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    unknown = tmp_path / "recipe.yaml"
    unknown.write_text(SMALL.replace("recipe: dino_quick", "recipe: dino_quik"))
    with pytest.raises(ConfigError, match=r"entry dino: unknown recipe 'dino_quik'"):
        runner.run_benchmark(unknown, "tiny", out=tmp_path / "o2")
    assert not (tmp_path / "o2" / "runs").exists()  # nothing trained before the error
    stream = tmp_path / "stream.yaml"
    stream.write_text(SMALL.replace("streams: {train: train}}\n  - {label: dino",
                                    "streams: {train: nope}}\n  - {label: dino"))
    with pytest.raises(ConfigError, match="'nope', which is not a name under data"):
        read_suite(stream)


def test_missing_shared_data_names_the_file_and_the_environment_variable(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "cifar10_carry.npz")) + ".*WILDSSL_SHARED_DATA"):
        prepare("cifar10:train", tmp_path, tmp_path / "out")
    monkeypatch.delenv("WILDSSL_SHARED_DATA", raising=False)
    with pytest.raises(DataError, match="WILDSSL_SHARED_DATA"):
        prepare("scenes", None, tmp_path / "out")


def _fake_shared(root: Path) -> Path:
    """A shared folder in the real layout with a handful of records per set."""
    from PIL import Image

    image = Image.new("RGB", (8, 6), (90, 120, 30))
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    np.savez(root / "cifar10_carry.npz", x_train=rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8),
             y_train=np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8), x_test=rng.integers(0, 255, (3, 32, 32, 3),
                                                                                    dtype=np.uint8),
             y_test=np.array([2, 1, 0], dtype=np.uint8), classes=np.array(["airplane", "automobile", "bird"]))
    sets = {
        "camvid_scenes": [{"file": f"images/{s}_{i}.jpg", "mask": f"masks/{s}_{i}.png", "split": s}
                          for s in ("train", "val", "test") for i in range(2)],
        "coco_mini": [{"file": f"images/{s}_{i}.jpg", "coco_split": s, "has_instances": i == 0, "captions": ["a cat"],
                       "labels": ["cat"] if i == 0 else None,
                       "objects": [{"bbox_xywh": [1, 1, 3, 3], "category": "cat"}] if i == 0 else None}
                      for s in ("train2017", "val2017") for i in range(2)],
        "flickr8k_mini": [{"file": f"images/{s}_{i}.jpg", "split": s,
                           "captions": ["a dog runs", "a dog on grass", "grass", "a field", "a dog"] if i == 0
                           else ["a man", "a person", "someone", "a man", "people"]}
                          for s in ("train", "dev", "test") for i in range(2)],
    }
    for name, records in sets.items():
        for r in records:
            (root / name / r["file"]).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / name / r["file"])
        (root / name / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_prepared_sets_keep_every_probe_test_image_out_of_the_pre_training_sets(tmp_path):
    from wildssl.benchmark.prepare import prepare_all

    shared = _fake_shared(tmp_path / "shared")
    specs = prepare_all(shared, tmp_path / "prepared")

    def files(name):
        return [json.loads(line)["file"] for line in Path(specs[name]).read_text().splitlines()]

    held_out = set(files("camvid:test") + files("coco:val") + files("flickr8k:test"))
    assert held_out and not held_out & set(files("scenes") + files("captions"))
    assert all(Path(f).name.startswith("train") for f in files("scenes") + files("captions"))
    assert len(files("scenes")) == 2 + 2 + 2 and len(files("captions")) == 2 + 2  # camvid + coco + flickr train
    assert len(files("coco:train")) == len(files("coco:val")) == 1  # only the images with instances
    # Flickr8k test: dev + test images whose captions name a scene, labelled by its name (first rule wins)
    labels = [json.loads(line)["label"] for line in Path(specs["flickr8k:test"]).read_text().splitlines()]
    assert labels == ["dog", "dog"]
    assert sorted(p.parent.name for p in Path(specs["cifar10:train"]).rglob("*.png")) == \
        ["airplane", "airplane", "automobile", "automobile", "bird", "bird"]
    # converted once: a second call reads the marker and writes nothing
    stamp = Path(specs["scenes"]).stat().st_mtime_ns
    assert prepare_all(shared, tmp_path / "prepared")["scenes"] == specs["scenes"]
    assert Path(specs["scenes"]).stat().st_mtime_ns == stamp


def test_prepared_sets_of_the_real_shared_data_have_the_documented_sizes(tmp_path):
    from conftest import shared_data_dir

    from wildssl.benchmark.prepare import prepare_all

    shared = shared_data_dir()
    if shared is None:
        pytest.skip("no shared data (set WILDSSL_SHARED_DATA)")
    names = ["camvid:train", "camvid:test", "coco:train", "coco:val", "flickr8k:train", "captions", "scenes"]
    specs = prepare_all(shared, tmp_path, names)
    sizes = {name: len(Path(specs[name]).read_text().splitlines()) for name in names}
    # shared/data/README.md: CamVid 367 train / 233 test; COCO mini 80 train2017 + 79 val2017 with instances;
    # Flickr8k mini 753 train
    assert sizes == {"camvid:train": 367, "camvid:test": 233, "coco:train": 80, "coco:val": 79, "flickr8k:train": 753,
                     "captions": 753 + 80, "scenes": 367 + 80 + 753}


def test_resuming_with_other_settings_names_the_run_and_the_change_instead_of_mixing_them(tmp_path, capsys):
    out = tmp_path / "out"
    suite = _small_suite(tmp_path)
    runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    recorded = json.loads((out / "runs" / "dino-s0" / "settings.json").read_text())["config"]
    assert "train.images=8" in recorded and "method.name=dino" in recorded  # the resolved config
    assert [s for s in recorded if s.startswith("data.train=")][0] in ("data.train=train", "data.train=test")
    # the same suite again: every run recorded, nothing trained, no error
    runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    # another budget in images seen: an error naming the first run and both values; nothing recorded changes
    text = Path(suite).read_text().replace("seeds: 2\n", "seeds: 2\nscales: {tiny: {images: 16}}\n")
    Path(suite).write_text(text)
    before = (out / "runs" / "simclr-s0" / "result.json").read_text()
    assert main(["benchmark", "run", str(suite), "--scale", "tiny", "--seeds", "1", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "simclr-s0 was recorded with other settings" in err
    assert "train.images: 8 then, 16 now" in err and "Traceback" not in err
    assert (out / "runs" / "simclr-s0" / "result.json").read_text() == before
    # a run recorded before settings.json existed is checked through its result.json
    (out / "runs" / "simclr-s0" / "settings.json").unlink()
    with pytest.raises(ConfigError, match="simclr-s0 .*train.images: 8 then, 16 now"):
        runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    # deleting the run folder (as the error says) runs it again with the new settings
    shutil.rmtree(out / "runs" / "simclr-s0")
    shutil.rmtree(out / "runs" / "dino-s0")
    runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    assert json.loads((out / "runs" / "simclr-s0" / "result.json").read_text())["images"] == 16


def test_resuming_after_a_recipe_file_was_edited_names_the_changed_key(tmp_path):
    from wildssl.train.config import build_config

    recipe = tmp_path / "my_simclr.yaml"
    recipe.write_text(yaml.safe_dump(build_config("simclr_quick")))
    suite = tmp_path / "mine.yaml"
    suite.write_text(SMALL.replace("name: small", "name: mine").replace("recipe: simclr_quick", "recipe: my_simclr.yaml"))
    out = tmp_path / "out"
    runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    runner.run_benchmark(suite, "tiny", seeds=1, out=out)  # unchanged: resumes without an error
    lr = build_config("simclr_quick")["optim"]["lr"]
    recipe.write_text(recipe.read_text().replace(f"lr: {lr}", f"lr: {lr * 2}"))
    assert build_config(str(recipe))["optim"]["lr"] == lr * 2
    with pytest.raises(ConfigError, match=rf"simclr-s0 .*optim.lr: {lr} then, {lr * 2} now"):
        runner.run_benchmark(suite, "tiny", seeds=1, out=out)


def test_resuming_with_other_probes_names_the_change_instead_of_showing_the_old_figures(tmp_path, capsys,
                                                                                        monkeypatch):
    from wildssl.train import engine

    out = tmp_path / "out"
    suite = _small_suite(tmp_path)
    runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    before = (out / "runs" / "simclr-s0" / "result.json").read_text()
    # the probe's train and test data swapped: an error naming a run and the probe, nothing recorded changes
    Path(suite).write_text(SMALL.replace("knn: {train: train, test: test}", "knn: {train: test, test: train}"))
    assert main(["benchmark", "run", str(suite), "--scale", "tiny", "--seeds", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"random_init-s0 was evaluated with other probes.*probes\.knn: .*then, .* now", err), err
    assert (out / "runs" / "simclr-s0" / "result.json").read_text() == before
    # a probe added: named too
    Path(suite).write_text(SMALL.replace("  knn: {train: train, test: test}\n",
                                         "  knn: {train: train, test: test}\n  linear: {train: train, test: test}\n"))
    with pytest.raises(ConfigError, match=r"probes\.linear: \(unset\) then"):
        runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    # as the error says: without their result.json the recorded encoders are evaluated again, none trained again
    calls = []
    monkeypatch.setattr(engine, "train", lambda *a, **k: calls.append(a) or {})
    for path in out.glob("runs/*/result.json"):
        path.unlink()
    runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    assert calls == []
    rows = table_rows((out / "table.md").read_text())
    assert "linear top1" in (out / "table.md").read_text() and all(len(cells) == 2 for cells in rows.values())


def test_a_resumed_run_records_the_training_time_of_every_session(tmp_path, monkeypatch):
    import time

    from wildssl.train import engine

    real_train = engine.train
    killed = []

    def killed_once(config, out_dir, *args, **kwargs):
        summary = real_train(config, out_dir, *args, **kwargs)
        if Path(out_dir).parent.name == "simclr-s0" and not killed:
            killed.append(1)
            time.sleep(1.5)  # the first session's time, after its last checkpoint was written
            raise KeyboardInterrupt("interrupted at step 1; checkpoint saved")
        return summary

    monkeypatch.setattr(engine, "train", killed_once)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        runner.run_benchmark(_small_suite(tmp_path), "tiny", seeds=1, out=out)
    runner.run_benchmark(_small_suite(tmp_path), "tiny", seeds=1, out=out)
    result = json.loads((out / "runs" / "simclr-s0" / "result.json").read_text())
    assert result["train_seconds"] >= 1.5
    # a session killed outright left only its start: it counts until its last checkpoint was written
    folder = out / "runs" / "dino-s0"
    (folder / "result.json").unlink()
    (folder / "train_done.json").unlink()
    written = max(p.stat().st_mtime for p in (folder / "train").glob("checkpoint.*"))
    (folder / "train_sessions.json").write_text(json.dumps([2.0, {"began": written - 100}]))
    runner.run_benchmark(_small_suite(tmp_path), "tiny", seeds=1, out=out)
    assert json.loads((folder / "result.json").read_text())["train_seconds"] >= 102.0


def test_recorded_seeds_left_out_of_the_table_are_named_in_a_warning_and_the_table(tmp_path, caplog):
    out = tmp_path / "out"
    suite = _small_suite(tmp_path)
    runner.run_benchmark(suite, "tiny", seeds=2, out=out)
    caplog.clear()
    runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(warnings) == 1 and "3 recorded runs" in warnings[0] and "--seeds 2" in warnings[0], warnings
    assert "3 recorded runs" in (out / "table.md").read_text()
    assert all(cells for cells in table_rows((out / "table.md").read_text()).values())


def test_a_corrupt_result_json_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    out = tmp_path / "out"
    suite = _small_suite(tmp_path)
    runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    broken = out / "runs" / "dino-s0" / "result.json"
    broken.write_text(broken.read_text()[:40])
    for argv in (["benchmark", "report", str(out)],
                 ["benchmark", "run", str(suite), "--scale", "tiny", "--seeds", "1", "--out", str(out)]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(broken) in err and "delete" in err and "Traceback" not in err, err


def test_an_interrupted_benchmark_run_says_to_run_the_same_command_again(tmp_path, monkeypatch, capsys):
    from wildssl.train import engine

    def interrupted(config, out_dir, *args, **kwargs):
        raise KeyboardInterrupt(f"interrupted at step 3; checkpoint saved to {out_dir}/checkpoint.pt "
                                "(continue with --resume)")

    monkeypatch.setattr(engine, "train", interrupted)
    suite = _small_suite(tmp_path)
    assert main(["benchmark", "run", str(suite), "--scale", "tiny", "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--resume" not in err and "interrupted at step 3" in err and "same command" in err, err


def test_a_teacher_suite_with_an_entry_without_a_teacher_fails_before_training(tmp_path):
    suite = tmp_path / "teacher.yaml"
    suite.write_text(SMALL.replace("seeds: 2\n", "seeds: 2\nnetwork: teacher\n"))
    with pytest.raises(ConfigError, match=r"entry simclr: .*teacher") as error:
        runner.run_benchmark(suite, "tiny", seeds=1, out=tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "runs").exists()


def test_an_out_folder_that_is_no_benchmark_output_is_refused(tmp_path):
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    (images / "cat" / "1.png").write_bytes(b"not really a png")
    with pytest.raises(ConfigError, match=re.escape(str(images)) + ".*not empty") as error:
        runner.run_benchmark(_small_suite(tmp_path), "tiny", seeds=1, out=images)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in images.iterdir()) == ["cat"]


def test_a_shipped_suite_is_found_by_its_name_from_any_folder_and_a_misspelt_one_is_named(tmp_path, monkeypatch):
    """`wildssl benchmark run object_centric` said "suite file not found: object_centric"; the name of a shipped
    suite now finds benchmarks/suites/object_centric.yaml, from the checkout or any other folder."""
    monkeypatch.chdir(tmp_path)
    by_name = read_suite("object_centric")
    assert by_name == read_suite(next(p for p in SUITES if p.stem == "object_centric"))
    with pytest.raises(ConfigError, match="did you mean object_centric"):
        read_suite("objekt_centric")
    with pytest.raises(ConfigError, match="suite file not found: missing.yaml"):
        read_suite("missing.yaml")
    (tmp_path / "object_centric").mkdir()  # a folder of that name is not a suite file: the shipped one is read
    assert read_suite("object_centric") == by_name


def test_the_teacher_check_builds_the_methods_without_weights(tmp_path, monkeypatch):
    """check_networks built every entry's method with its weights at start-up (I-JEPA's ViT-B: 16 s on this CPU);
    the meta device gives the same answer without allocating them."""
    import torch
    import wildssl.methods

    devices = []
    build = wildssl.methods.build_method

    def recording(config, **kwargs):
        devices.append(torch.empty(1).device.type)
        return build(config, **kwargs)

    monkeypatch.setattr(wildssl.methods, "build_method", recording)
    suite = tmp_path / "teacher.yaml"
    suite.write_text(SMALL.replace("seeds: 2\n", "seeds: 2\nnetwork: teacher\n"))
    with pytest.raises(ConfigError, match=r"entry simclr: .*teacher"):
        runner.run_benchmark(suite, "tiny", seeds=1, out=tmp_path / "out")
    assert devices and set(devices) == {"meta"}


def test_bad_knn_curve_points_are_one_line_errors(tmp_path):
    """`points: 0` was a ZeroDivisionError, `points: "two"` a TypeError, and -1 or 1.5 were taken."""
    for points in ("0", "two", "-1", "1.5", "true"):
        bad = tmp_path / "points.yaml"
        bad.write_text(SMALL.replace("points: 2", f"points: {points}"))
        with pytest.raises(ConfigError, match=r"knn_curve: points must be an integer >= 1") as error:
            read_suite(bad)
        assert "\n" not in str(error.value)


def test_a_data_name_that_points_at_other_data_on_resume_is_refused(tmp_path):
    """A resumed suite whose data name now pointed at other images trained the new seeds on them and tabled them
    with the recorded ones; suite.json was overwritten with the new data."""
    out = tmp_path / "out"
    suite = _small_suite(tmp_path)
    runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    recorded = (out / "suite.json").read_text()
    suite.write_text(SMALL.replace("n=16&size=16&colours=2&num_classes=4&split=train",
                                   "n=24&size=16&colours=3&num_classes=4&split=train"))
    with pytest.raises(ConfigError, match=r"holds runs recorded with data train = 'synthetic:scenes\?n=16.*now "
                                          r"gives 'synthetic:scenes\?n=24") as error:
        runner.run_benchmark(suite, "tiny", seeds=2, out=out)
    assert "\n" not in str(error.value)
    assert not (out / "runs" / "simclr-s1").exists() and (out / "suite.json").read_text() == recorded
    runner.run_benchmark(suite, "tiny", seeds=1, out=tmp_path / "other")  # a new --out takes the new data


def test_the_floor_recorded_for_another_first_entry_is_refused(tmp_path):
    """The floor is the first entry's network at its initial weights; with the entries reordered, the recorded
    floor of the former first entry stayed in the table."""
    out = tmp_path / "out"
    suite = _small_suite(tmp_path)
    runner.run_benchmark(suite, "tiny", seeds=1, out=out)
    lines = SMALL.splitlines(keepends=True)
    simclr, dino = (lines.index(line) for line in lines if line.startswith("  - {label:"))
    lines[simclr], lines[dino] = lines[dino], lines[simclr]
    suite.write_text("".join(lines))
    with pytest.raises(ConfigError, match=r"random_init-s0 was recorded with other settings .*method.name: simclr "
                                          r"then, dino now"):
        runner.run_benchmark(suite, "tiny", seeds=1, out=out)


SEEN = """
name: seen
seeds: 1
data:
  train: synthetic:scenes?n=32&size=16&colours=2&num_classes=4&split=train
  test: synthetic:scenes?n=16&size=16&colours=2&num_classes=4&split=test
scales:
  cpu:
    images: 20
    set: [model.name=tiny, model.depth=1, model.embed_dim=32, model.num_heads=2, model.patch_size=4,
          model.img_size=16, data.load_size=16, data.num_workers=0, train.batch_size=8, train.checkpoint_every=0,
          method.crop_size=16, method.proj_hidden_dim=32, method.proj_dim=16]
entries:
  - {label: eight, recipe: simclr_quick, streams: {train: train}}
  - {label: sixteen, recipe: simclr_quick, streams: {train: train}, set: [train.batch_size=16]}
probes:
  knn: {train: train, test: test}
"""


def test_entries_that_see_different_numbers_of_images_are_named_and_each_records_what_it_saw(tmp_path, caplog):
    """A budget of 20 images is 3 steps of 8 (24 images) and 2 of 16 (32): both result.json said "images": 20."""
    import logging

    suite = tmp_path / "seen.yaml"
    suite.write_text(SEEN)
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        runner.run_benchmark(suite, "cpu", out=tmp_path / "out")
    assert ("suite seen: its entries see different numbers of images, scales.cpu.images=20 rounded up to whole "
            "steps: eight 24 (3 steps of 8), sixteen 32 (2 steps of 16)") in caplog.text
    seen = {label: json.loads((tmp_path / "out" / "runs" / f"{label}-s0" / "result.json").read_text())
            for label in ("eight", "sixteen")}
    assert [(r["images"], r["steps"], r["images_seen"]) for r in seen.values()] == [(20, 3, 24), (20, 2, 32)]
    caplog.clear()
    suite.write_text(SEEN.replace("images: 20", "images: 32"))  # a multiple of both: no warning
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        runner.run_benchmark(suite, "cpu", out=tmp_path / "equal")
    assert "different numbers of images" not in caplog.text


def test_a_caption_entry_on_images_without_captions_fails_before_the_first_run(tmp_path):
    """The floor and the SimCLR entry trained, then the CLIP entry's turn came and failed on its data."""
    from PIL import Image

    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    for k in range(8):
        Image.new("RGB", (16, 16), (30 * k, 10, 90)).save(images / f"{k}.png")
    suite = tmp_path / "captions.yaml"
    suite.write_text(SMALL.replace("  - {label: dino, recipe: dino_quick, streams: {train: train}}",
                                   "  - {label: clip, recipe: clip_quick, streams: {train: folder}}")
                     .replace("data:\n", f"data:\n  folder: {tmp_path / 'images'}\n"))
    with pytest.raises(DataError, match=r"^suite small entry clip: method clip learns from captions, but there are "
                                        r"no captions in image folder") as error:
        runner.run_benchmark(suite, "tiny", seeds=1, out=tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "runs").exists()


def test_a_misspelt_stream_and_a_hand_edited_record_are_one_line_errors_naming_them(tmp_path):
    """A typo'd stream was reported as "unknown config key 'data.trian' in --set"; a suite.json or result.json
    missing a key gave a KeyError traceback in `benchmark report`."""
    typo = tmp_path / "typo.yaml"
    typo.write_text(SMALL.replace("dino_quick, streams: {train: train}", "dino_quick, streams: {trian: train}"))
    with pytest.raises(ConfigError, match=r"^suite small entry dino: streams: 'trian' is not a stream of method dino; "
                                          r"its streams: train$"):
        runner.run_benchmark(typo, "tiny", seeds=1, out=tmp_path / "typo_out")
    out = tmp_path / "out"
    runner.run_benchmark(_small_suite(tmp_path), "tiny", seeds=1, out=out)
    result = out / "runs" / "simclr-s0" / "result.json"
    record = json.loads(result.read_text())
    result.write_text(json.dumps({k: v for k, v in record.items() if k != "seed"}))
    with pytest.raises(DataError, match=rf"^{re.escape(str(result))} has no 'seed' \(not written by wildssl "
                                        r"benchmark run, or edited\); delete it"):
        table.write_outputs(out)
    (out / "suite.json").write_text("{}")
    with pytest.raises(DataError, match=r"suite.json has no 'suite' "):
        table.write_outputs(out)


def test_damaged_shared_data_is_a_one_line_error_naming_the_file(tmp_path):
    """A junk cifar10_carry.npz gave numpy's ValueError traceback about pickled data; a broken annotations line
    a JSONDecodeError."""
    shared = tmp_path / "shared"
    (shared / "camvid_scenes").mkdir(parents=True)
    (shared / "cifar10_carry.npz").write_text("junk")
    (shared / "camvid_scenes" / "annotations.jsonl").write_text('{"file": "a.jpg"}\n{bad\n')
    with pytest.raises(DataError, match=r"cifar10_carry.npz is not an .npz archive \(damaged or another file\); "
                                        r".*sha256"):
        prepare("cifar10:train", shared, tmp_path / "out")
    np.savez(shared / "cifar10_carry.npz", classes=np.array(["cat"]))
    with pytest.raises(DataError, match=r"cifar10_carry.npz has no array 'x_train'"):
        prepare("cifar10:train", shared, tmp_path / "out")
    with pytest.raises(DataError, match=r"annotations.jsonl line 2 is not JSON"):
        prepare("camvid:train", shared, tmp_path / "out")
