"""The GPU throughput harness stays runnable: a tiny CPU smoke run of each recipe it supports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=tiny", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "data.load_size=32",
        "method.global_size=32", "method.local_size=16", "method.n_local=2", "method.out_dim=64",
        "method.hidden_dim=32", "method.bottleneck_dim=16"]
TINY_AB = ["method.ab_crop_size=32", "method.ab_decoder_depth=1", "method.ab_decoder_width=32",
           "method.ab_decoder_heads=2"]


@pytest.mark.parametrize("recipe", ["dino", "ab_dino"])
def test_throughput_harness_runs_and_reports_a_ratio(recipe):
    overrides = TINY + (TINY_AB if recipe == "ab_dino" else [])
    argv = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", "cpu", "--recipe", recipe,
            "--batch", "8", "--steps", "1", "--warmup", "1"]
    for item in overrides:
        argv += ["--set", item]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1",
                            **{k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}})
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["recipe"] == recipe and figures["ratio"] > 0 and figures["method_images_per_s"] > 0


def test_ab_vs_base_harness_smoke_run_reports_equal_images_seen(tmp_path):
    argv = [sys.executable, str(ROOT / "benchmarks" / "ab_vs_base.py"), "--smoke", "--only", "dino",
            "--out", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in records] == ["dino", "ab_dino"]
    assert records[0]["images_seen"] == records[1]["images_seen"]
    assert all(0 <= r["knn_top1"] <= 1 for r in records)


def test_quick_recipes_harness_table_has_one_row_per_run_with_figures_from_its_json(tmp_path):
    """A smoke run of two recipes: the table holds exactly one row per (recipe, data set) run, and its
    trained / random-init / gain cells are those of the run's JSON record (gain = trained - random)."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "quick_recipes.py"), "--smoke", "--recipes", "simclr_quick",
            "dino_quick", "--out", str(tmp_path)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["recipe"], r["dataset"]) for r in runs] == [("simclr_quick", "smoke"), ("dino_quick", "smoke")]
    rows = [line for line in (tmp_path / "table.md").read_text().splitlines()[2:] if line.startswith("|")]
    assert len(rows) == len(runs)
    for row, run in zip(rows, runs):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[:2] == [run["recipe"], run["dataset"]]
        assert cells[2:5] == [f"{100 * run['trained']:.1f}%", f"{100 * run['random']:.1f}%",
                              f"{100 * (run['trained'] - run['random']):+.1f}"]
        assert run["steps"] == 2 and "--val" in run["command"] and run["seconds"] > 0
