"""The benchmark harnesses stay runnable: tiny CPU smoke runs (``wildssl bench`` is tested in test_bench.py)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ab_vs_base_harness_smoke_run_reports_equal_images_seen(tmp_path):
    argv = [sys.executable, str(ROOT / "benchmarks" / "ab_vs_base.py"), "--smoke", "--only", "dino",
            "--out", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in records] == ["dino", "ab_dino"]
    # 48 images: the base at 16 per step runs 3 steps, AB at 16 + 16 / 2 per step runs 2.
    assert [(r["images_seen"], r["steps"]) for r in records] == [(48, 3), (48, 2)]
    assert [r["network"] for r in records] == ["teacher", "teacher"]  # the same network of both


def test_mae_speed_harness_times_both_encoder_paths_on_the_same_step():
    tiny = ["model.name=tiny", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
            "model.img_size=32", "data.load_size=32", "method.crop_size=32", "method.decoder_dim=32",
            "method.decoder_depth=1", "method.decoder_heads=2"]
    argv = [sys.executable, str(ROOT / "benchmarks" / "mae_speed.py"), "--device", "cpu", "--threads", "1",
            "--batch", "4", "--rounds", "1", "--warmup", "0"]
    for item in tiny:
        argv += ["--set", item]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["patches"] == 16 and figures["visible_patches"] == 4
    assert figures["visible_only_s_per_step"] > 0 and figures["all_patches_s_per_step"] > 0
