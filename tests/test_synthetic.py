from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from wildssl.data.synthetic import (
    NOISE,
    PALETTE,
    SHAPES,
    Scene,
    SceneObject,
    SyntheticScenes,
    render_scene,
    scene_caption,
)
from wildssl.errors import DataError


def test_same_index_gives_identical_sample_and_seeds_and_splits_differ():
    first, again = SyntheticScenes(n=20, size=32, seed=3), SyntheticScenes(n=20, size=32, seed=3)
    other_seed = SyntheticScenes(n=20, size=32, seed=4)
    test_split = SyntheticScenes(n=20, size=32, seed=3, split="test")
    for i in range(20):
        a, b = first[i], again[i]
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["boxes"], b["boxes"]) and a["caption"] == b["caption"]
        assert not torch.equal(a["image"], other_seed[i]["image"])
    train_images = {first[i]["image"].numpy().tobytes() for i in range(20)}
    assert not train_images & {test_split[i]["image"].numpy().tobytes() for i in range(20)}
    # reading out of order or twice does not change a sample (nothing carried between calls)
    assert torch.equal(first[7]["image"], SyntheticScenes(n=20, size=32, seed=3)[7]["image"])


def test_sample_types_labels_in_range_and_boxes_normalized():
    source = SyntheticScenes(n=60, size=32, num_classes=5)
    assert source.classes == list(SHAPES[:5])
    for i in range(60):
        sample = source[i]
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.uint8
        assert sample["aspect"] == 1.0 and sample["index"] == i and sample["num_corrupt"] == 0
        assert 0 <= sample["label"] < 5
        boxes, box_labels = sample["boxes"], sample["box_labels"]
        assert boxes.dtype == torch.float32 and box_labels.dtype == torch.long
        assert 2 <= len(boxes) <= 4 and len(box_labels) == len(boxes)
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert int(box_labels[0]) == sample["label"]
        assert sample["labels"] == sorted(set(box_labels.tolist()))
        assert ((box_labels >= 0) & (box_labels < 5)).all()


def test_main_object_is_large_and_distractors_small_and_disjoint():
    source = SyntheticScenes(n=100, size=32)
    for i in range(100):
        boxes = source[i]["boxes"].double()
        sides = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))  # geometric mean side
        assert 0.35 - 1e-6 <= sides[0] <= 0.60 + 1e-6
        assert ((sides[1:] >= 0.12 - 1e-6) & (sides[1:] <= 0.20 + 1e-6)).all()
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                overlap_w = min(boxes[a, 2], boxes[b, 2]) - max(boxes[a, 0], boxes[b, 0])
                overlap_h = min(boxes[a, 3], boxes[b, 3]) - max(boxes[a, 1], boxes[b, 1])
                assert overlap_w < 0 or overlap_h < 0


@pytest.mark.parametrize("size", [32, 64])
def test_main_box_tightly_contains_the_main_objects_pixels(size):
    source = SyntheticScenes(n=40, size=size, seed=1)
    for i in range(40):
        scene = source.scene(i)
        image, masks = render_scene(scene, size)
        assert np.array_equal(image, source[i]["image"].permute(1, 2, 0).numpy())
        main = scene.objects[0]
        rows, cols = np.nonzero(masks[0])
        # pixel centres of the main object lie inside its box ...
        x0, y0, x1, y1 = main.box
        assert ((cols + 0.5) / size >= x0).all() and ((cols + 0.5) / size <= x1).all()
        assert ((rows + 0.5) / size >= y0).all() and ((rows + 0.5) / size <= y1).all()
        # ... and reach all four sides of it (within a pixel): the box is tight
        assert cols.min() / size <= x0 + 1.5 / size and (cols.max() + 1) / size >= x1 - 1.5 / size
        assert rows.min() / size <= y0 + 1.5 / size and (rows.max() + 1) / size >= y1 - 1.5 / size
        # those pixels have the object's colour (up to noise) and stand out from the background colour
        pixels = image[masks[0]].astype(np.int64)
        assert (np.abs(pixels - np.asarray(main.rgb)) <= NOISE).all()
        background = image[~masks.any(axis=0)].astype(np.float64).mean(axis=0)
        assert np.linalg.norm(pixels.mean(axis=0) - background) > 40


def test_every_shape_draws_a_distinct_silhouette():
    def silhouette(shape: int) -> np.ndarray:
        obj = SceneObject(shape=shape, colour=0, rgb=(255, 255, 255), box=(0.0, 0.0, 1.0, 1.0))
        scene = Scene(objects=(obj,), background=10, background_rgb=(0, 0, 0), gradient=(0.0, 0.0), noise_seed=0)
        return render_scene(scene, 32)[1][0]

    silhouettes = [silhouette(shape) for shape in range(len(SHAPES))]
    for a in range(len(SHAPES)):
        assert silhouettes[a].mean() > 0.15
        for b in range(a + 1, len(SHAPES)):
            assert (silhouettes[a] != silhouettes[b]).mean() > 0.1, (SHAPES[a], SHAPES[b])


def test_caption_names_the_main_shape_and_colour_and_every_object():
    source = SyntheticScenes(n=30, size=32)
    for i in range(30):
        sample, scene = source[i], source.scene(i)
        main = scene.objects[0]
        assert sample["caption"].startswith(f"a large {PALETTE[main.colour][0]} {SHAPES[main.shape]}")
        assert sample["caption"] == scene_caption(scene) and sample["captions"] == [sample["caption"]]
        assert sample["caption"].count("a small ") == len(scene.objects) - 1
        assert sample["caption"].endswith(f"{PALETTE[scene.background][0]} background")


def test_colour_does_not_predict_the_class():
    source = SyntheticScenes(n=1200, size=16, num_classes=6)
    pairs = [(obj.colour, obj.shape) for obj in (source.scene(i).objects[0] for i in range(1200))]
    by_colour: dict[int, Counter] = {}
    for colour, shape in pairs:
        by_colour.setdefault(colour, Counter())[shape] += 1
    # best possible classifier from the colour alone: the majority class of each colour
    accuracy = sum(c.most_common(1)[0][1] for c in by_colour.values()) / len(pairs)
    assert accuracy < 1 / 6 + 0.1
    assert len(by_colour) >= len(PALETTE) - 1  # every colour is used for the main object


def test_load_size_resizes_the_render():
    source = SyntheticScenes(n=4, size=64, load_size=32)
    small = source[0]["image"]
    assert small.shape == (3, 32, 32)
    full = torch.from_numpy(render_scene(source.scene(0), 64)[0]).permute(2, 0, 1).double()
    pooled = full.reshape(3, 32, 2, 32, 2).mean(dim=(2, 4))
    assert (small.double() - pooled).abs().mean() < 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "val"}, "split must be one of train, test"),
        ({"num_classes": 1}, "num_classes must be in 2..8"),
        ({"num_classes": 9}, "num_classes must be in 2..8"),
        ({"n": 0}, "n must be >= 1"),
        ({"size": 4}, "size must be >= 8"),
    ],
)
def test_invalid_arguments_raise_data_error(kwargs, message):
    with pytest.raises(DataError, match=message):
        SyntheticScenes(**kwargs)


def test_index_out_of_range_raises_index_error():
    with pytest.raises(IndexError):
        SyntheticScenes(n=3, size=16)[3]


def test_distractors_caps_the_small_objects_and_keeps_the_rest_of_each_scene():
    from wildssl.data import open_source

    default = SyntheticScenes(n=30, size=32)
    assert default.distractors == 3
    for cap in (0, 1):
        capped = open_source(f"synthetic:scenes?n=30&size=32&distractors={cap}")
        for i in range(30):
            full, fewer = default.scene(i), capped.scene(i)
            assert len(fewer.objects) == min(cap + 1, len(full.objects))
            assert fewer.objects == full.objects[: len(fewer.objects)]  # the same main object and first ones
            assert fewer.background == full.background and capped[i]["label"] == default[i]["label"]
    alone = open_source("synthetic:scenes?n=5&size=32&distractors=0&colours=2")
    for i in range(5):
        sample = alone[i]
        assert sample["labels"] == [sample["label"]] and " with " not in sample["caption"]
    with pytest.raises(DataError, match="distractors must be in 0..3, got 4"):
        SyntheticScenes(n=5, distractors=4)


def test_rendered_scenes_are_kept_and_a_changed_sample_leaves_the_next_one_alone(monkeypatch):
    from wildssl.data import open_source, synthetic

    source = open_source("synthetic:scenes?n=4&size=16", load_size=16)
    first = source[2]
    first["image"].zero_()  # a caller changing its sample in place
    def render_again(*args):
        raise AssertionError("a kept scene was rendered again")

    monkeypatch.setattr(synthetic, "render_scene", render_again)
    again = source[2]  # from the kept pixels: no render
    assert again["image"].sum() > 0
    monkeypatch.undo()
    synthetic._KEPT.clear()  # rendered again, not read from the kept pixels
    fresh = open_source("synthetic:scenes?n=4&size=16", load_size=16)[2]
    assert torch.equal(again["image"], fresh["image"]) and again["captions"] == fresh["captions"]
    monkeypatch.setattr(synthetic, "RENDER_CACHE_BYTES", 0)  # too large to keep: rendered every time
    assert not open_source("synthetic:scenes?n=4&size=16", load_size=16)._cache


def test_a_scene_rendered_by_one_source_is_read_by_another_of_the_same_scenes_within_the_budget(monkeypatch):
    from wildssl.data import open_source, synthetic

    synthetic._KEPT.clear()
    train = open_source("synthetic:scenes?n=8&size=16&colours=2", load_size=16)
    first = [train[i]["image"] for i in range(4)]
    other_seed = open_source("synthetic:scenes?n=8&size=16&colours=2&seed=1", load_size=16)[0]["image"]

    def render_again(*args):
        raise AssertionError("a kept scene was rendered again")

    monkeypatch.setattr(synthetic, "render_scene", render_again)
    memory = open_source("synthetic:scenes?n=3&size=16&colours=2", load_size=16)  # scene i of a set of 3 is the same
    assert all(torch.equal(memory[i]["image"], first[i]) for i in range(3))
    with pytest.raises(IndexError):  # kept for the set of 8, still out of range for the set of 3
        memory[3]
    assert not torch.equal(other_seed, first[0])
    with pytest.raises(AssertionError, match="rendered again"):  # other parameters: other pixels, not kept ones
        open_source("synthetic:scenes?n=3&size=16&colours=3", load_size=16)[0]
    monkeypatch.undo()

    # Two sets whose pixels do not fit the budget together: the one extended least recently is dropped.
    one_scene = first[0].numel()
    monkeypatch.setattr(synthetic, "RENDER_CACHE_BYTES", 4 * one_scene)
    synthetic._KEPT.clear()
    a = open_source("synthetic:scenes?n=4&size=16", load_size=16)
    b = open_source("synthetic:scenes?n=4&size=16&seed=5", load_size=16)
    [a[i] for i in range(3)]
    [b[i] for i in range(2)]
    assert sum(len(scenes) for scenes in synthetic._KEPT.values()) * one_scene <= synthetic.RENDER_CACHE_BYTES
    assert list(synthetic._KEPT.values())[-1].keys() == {0, 1}  # the newest set stays whole
