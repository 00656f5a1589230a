"""The benchmark harnesses stay runnable: tiny CPU smoke runs (``wildssl bench`` is tested in test_bench.py)."""

import importlib.util
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module(name: str):
    """``benchmarks/<name>.py`` loaded as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_vs_base_harness_smoke_run_reports_equal_images_seen(tmp_path):
    _benchmark_module("ab_vs_base").main(["--smoke", "--only", "dino", "--out", str(tmp_path)])  # in this process
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in records] == ["dino", "ab_dino"]
    # 48 images: the base at 16 per step runs 3 steps, AB at 16 + 16 / 2 per step runs 2.
    assert [(r["images_seen"], r["steps"]) for r in records] == [(48, 3), (48, 2)]
    assert [r["network"] for r in records] == ["teacher", "teacher"]  # the same network of both


def test_mae_speed_harness_times_both_encoder_paths_on_the_same_step(capsys):
    tiny = ["model.name=tiny", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
            "model.img_size=32", "data.load_size=32", "method.crop_size=32", "method.decoder_dim=32",
            "method.decoder_depth=1", "method.decoder_heads=2"]
    argv = ["--device", "cpu", "--threads", "1", "--batch", "4", "--rounds", "1", "--warmup", "0"]
    for item in tiny:
        argv += ["--set", item]
    _benchmark_module("mae_speed").main(argv)  # in this process: no torch import of its own
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["patches"] == 16 and figures["visible_patches"] == 4
    assert figures["visible_only_s_per_step"] > 0 and figures["all_patches_s_per_step"] > 0


def test_reference_vit_of_the_throughput_table_computes_what_wildssls_encoder_computes():
    """The encoder ratio compares like with like: with wildssl's weights the plain-torch reference gives the
    same tokens (float64), so a speed difference is the implementation's, not the architecture's."""
    from wildssl.models.vit import VisionTransformer

    table = _benchmark_module("throughput_table")
    torch.manual_seed(0)
    ours = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4).double().eval()
    reference = table.ReferenceViT(16, 4, 32, 2, 4).double()
    renamed = {"patch_embed.proj.": "patch.", "cls_token": "cls", "pos_embed": "pos", "attn.": "", "mlp.": ""}
    state = {}
    for name, value in ours.state_dict().items():
        if name == "mask_token":
            continue
        for old, new in renamed.items():
            name = name.replace(old, new)
        state[name] = value
    reference.load_state_dict(state)  # strict: every parameter of the reference has its counterpart
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(reference(images), ours.forward_features(images), rtol=1e-10, atol=1e-10)



@pytest.mark.slow
def test_quick_recipes_harness_table_has_one_row_per_run_with_figures_from_its_json(tmp_path, monkeypatch):
    """A smoke run of two recipes: the table holds exactly one row per (recipe, data set) run, and its
    trained / random-init / gain cells are those of the run's JSON record (gain = trained - random)."""
    # the harness in this process; each run in its own, as the harness times the whole command a user types
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _benchmark_module("quick_recipes").main(["--smoke", "--recipes", "simclr_quick", "dino_quick",
                                                    "--out", str(tmp_path)]) == 0
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


def test_maws_fsdp_harness_smoke_run_times_mae_and_wsp_engine_steps_under_fsdp(tmp_path):
    """benchmarks/maws_fsdp.py --smoke (in this process): both MAWS stages through the engine with
    train.sharding=fsdp and activation checkpointing in a one-rank gloo group; the JSON has the fields the
    GPU run reports."""
    out = tmp_path / "maws_fsdp.json"
    _benchmark_module("maws_fsdp").main(["--smoke", "--batch-size", "4", "--steps", "1", "--warmup", "1", "--precision", "fp32",
                               "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["fits"] and report["sharding"] == "fsdp" and report["activation_checkpointing"]
    assert report["world_size"] == 1 and report["precision"] == "fp32" and report["batch_size"] == 4
    assert set(report["methods"]) == {"mae", "wsp"}
    for name, figures in report["methods"].items():
        assert figures["recipe"] == f"maws_{name}" and figures["steps_timed"] == 1 and figures["warmup_steps"] == 1
        assert figures["images_per_s"] > 0 and figures["step_s_median"] > 0
        assert figures["max_memory_allocated_bytes"] is None  # CUDA's peak; none on the CPU
        assert figures["final_loss"] > 0


def test_maws_fsdp_largest_tries_sizes_smallest_first_and_stops_at_the_first_that_does_not_fit(monkeypatch):
    """--largest without a GPU: each size's process is replaced by one that writes what a GPU run would
    (base, large fit; huge runs out of memory); the report names large and tried nothing after huge."""
    harness = _benchmark_module("maws_fsdp")
    launched = []

    def fake_run(command, **kwargs):
        model, out = command[command.index("--model") + 1], Path(command[command.index("--out") + 1])
        launched.append(model)
        assert command[command.index("--batch-size") + 1] == "16" and "--largest" not in command
        out.write_text(json.dumps({"model": model, "fits": model in ("base", "large")}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    report = harness.run_largest(harness.parse_args(["--largest", "--batch-size", "16"]))
    assert launched == ["base", "large", "huge"]
    assert report["largest_that_fits"] == "large" and [t["model"] for t in report["tried"]] == launched


def test_folded_knn_script_ends_in_one_line_naming_a_folder_that_is_not_a_run(tmp_path, capsys):
    knn_folds = _benchmark_module("knn_folds")
    assert knn_folds.main(["--data", "synthetic:scenes?n=8&size=16", "--val", "synthetic:scenes?n=8&size=16",
                           str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(tmp_path) in error and "config.yaml" in error


def test_cifar10_preparation_writes_the_first_images_of_each_split_and_all_of_them_for_the_folded_knn(tmp_path):
    quick = _benchmark_module("quick_recipes")
    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for s, n in (("train", 7), ("test", 5))}
    arrays.update(y_train=np.array([0, 1, 2, 0, 1, 2, 0], np.uint8), y_test=np.array([2, 1, 0, 2, 1], np.uint8),
                  classes=np.array(["cat", "dog", "ship"]))
    np.savez(tmp_path / "cifar10_carry.npz", **arrays)

    def written(folder: str) -> dict[str, tuple[int, np.ndarray]]:
        return {p.name: (arrays["classes"].tolist().index(p.parent.name), np.asarray(Image.open(p)))
                for p in Path(folder).glob("*/*.png")}

    first = quick.prepare_cifar10(tmp_path, tmp_path / "out" / "cifar10", 3, 2)
    every = quick.prepare("cifar10_all", tmp_path, tmp_path / "out")
    for folders, counts in ((first, (3, 2)), (every, (7, 5))):
        for folder, split, count in zip(folders, ("train", "test"), counts):
            files = written(folder)
            assert sorted(files) == [f"{i:05d}.png" for i in range(count)]
            for i in range(count):
                label, pixels = files[f"{i:05d}.png"]
                assert label == arrays[f"y_{split}"][i] and np.array_equal(pixels, arrays[f"x_{split}"][i])


def test_cifar10_fresh_draws_are_disjoint_and_hold_no_image_of_the_carry_file(tmp_path):
    quick = _benchmark_module("quick_recipes")
    rng = np.random.default_rng(1)
    full, seen = {}, {"train": np.array([0, 3, 4, 9, 10], np.int32), "test": np.array([1, 2], np.int32)}
    for split, n in (("train", 20), ("test", 8)):
        # Each image a flat grey whose level is its index (JPEG keeps a flat patch to within a level or two).
        encoded = []
        for i in range(n):
            handle = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(handle, format="JPEG", quality=95)
            encoded.append(np.frombuffer(handle.getvalue(), np.uint8))
        full[f"jpeg_{split}"] = np.concatenate(encoded)
        full[f"offsets_{split}"] = np.cumsum([0] + [len(e) for e in encoded])
        full[f"y_{split}"] = rng.integers(0, 3, n).astype(np.uint8)
    np.savez(tmp_path / "cifar10_jpeg_full.npz", classes=np.array(["cat", "dog", "ship"]), **full)
    np.savez(tmp_path / "cifar10_carry.npz", train_index=seen["train"], test_index=seen["test"])

    def images(folder: str) -> list[tuple[int, int]]:  # (label, index recovered from the grey level)
        return [(["cat", "dog", "ship"].index(p.parent.name), round(float(np.asarray(Image.open(p)).mean()) / 10))
                for p in sorted(Path(folder).glob("*/*.png"))]

    draws = [quick.prepare_cifar10_fresh(tmp_path, tmp_path / f"fresh{d}", d, train_images=4, test_images=3)
             for d in range(3)]
    trains = [images(train) for train, _ in draws]
    tests = [images(test) for _, test in draws]
    chosen = [index for train in trains for _, index in train]
    assert len(chosen) == len(set(chosen)) == 12 and not set(chosen) & set(seen["train"].tolist())
    assert tests[0] == tests[1] == tests[2] and len(tests[0]) == 3
    assert not {index for _, index in tests[0]} & set(seen["test"].tolist())
    for split, listed in (("train", [pair for train in trains for pair in train]), ("test", tests[0])):
        assert all(label == full[f"y_{split}"][index] for label, index in listed)
    with pytest.raises(ValueError, match="unseen"):
        quick.prepare_cifar10_fresh(tmp_path, tmp_path / "big", 0, train_images=6, test_images=3)


def test_camvid_objects_are_4_connected_components_of_object_classes_cut_as_squares_inside_the_frame():
    quick = _benchmark_module("quick_recipes")
    mask = np.full((40, 60), 3, dtype=np.uint8)  # Road: not an object class
    mask[5:15, 10:22] = 8  # a car, 10 x 12: square of 12 centred on it
    mask[20:40, 0:5] = 9  # a pedestrian 20 x 5: narrower than 8 px, left out
    mask[30:40, 50:60] = 6  # a sign, 10 x 10, at the corner
    mask[30:40, 40:49] = 6  # another sign, 10 x 9, apart from the first by one column of road
    mask[0:9, 51:60] = 10  # a bicyclist, 9 x 9, touching the top and right edges
    mask[9:20, 42:51] = 10  # diagonal neighbour only: a separate component, 11 x 9
    mask[0:8, 25:41] = 2  # a pole lying at the top edge, 8 x 16: its centred square would start at y = -4
    objects = quick.camvid_objects(mask)
    assert sorted(objects) == sorted([
        ((10, 4, 22, 16), 8),  # centre (16, 10): x 10-22, y 4-16
        ((50, 30, 60, 40), 6),
        ((39, 30, 49, 40), 6),  # side 10 centred at x 44.5 -> 39-49
        ((51, 0, 60, 9), 10),
        ((41, 9, 52, 20), 10),  # side 11 centred at x 46.5 -> 41-52
        ((25, 0, 41, 16), 2),  # shifted down into the frame
    ])
    for (x0, y0, x1, y1), _ in objects:
        assert 0 <= x0 and 0 <= y0 and x1 <= 60 and y1 <= 40 and x1 - x0 == y1 - y0
