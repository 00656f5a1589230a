from __future__ import annotations

import io
import json
import logging
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wildssl.data import collate, open_source
from wildssl.data.folder import ImageFolder
from wildssl.data.manifest import JsonlManifest
from wildssl.data.shards import TarShards, expand_braces
from wildssl.data.synthetic import SyntheticScenes
from wildssl.errors import DataError

S = 8  # load size used throughout: tiny images keep the tests fast


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 9)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def image_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (10, 5), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def mean_colour(sample: dict) -> np.ndarray:
    return sample["image"].double().mean(dim=(1, 2)).numpy()


def shared_data() -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data"]
    if os.environ.get("WILDSSL_SHARED_DATA"):
        candidates.insert(0, Path(os.environ["WILDSSL_SHARED_DATA"]))
    return next((c for c in candidates if c.is_dir()), None)


# --- image folder -----------------------------------------------------------------------------------


def test_folder_with_class_subfolders_gives_sorted_classes_and_labels(tmp_path):
    write_image(tmp_path / "dog" / "b.png", (0, 0, 255))
    write_image(tmp_path / "cat" / "x" / "deep.JPG", (255, 0, 0))  # recursive, extension case-insensitive
    write_image(tmp_path / "cat" / "a.webp", (0, 255, 0))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / "._b.png").write_bytes(b"macOS resource fork")  # hidden: not scanned
    source = ImageFolder(tmp_path, S)
    assert source.classes == ["cat", "dog"]
    assert source.paths == ["cat/a.webp", "cat/x/deep.JPG", "dog/b.png"]
    samples = [source[i] for i in range(len(source))]
    assert [s["label"] for s in samples] == [0, 0, 1]
    assert [s["labels"] for s in samples] == [[0], [0], [1]]
    expected = [(0, 255, 0), (255, 0, 0), (0, 0, 255)]
    for sample, colour in zip(samples, expected):
        assert sample["image"].shape == (3, S, S) and sample["image"].dtype == torch.uint8
        assert np.abs(mean_colour(sample) - colour).max() < 8  # jpeg/webp are lossy
        assert sample["aspect"] == pytest.approx(12 / 9)
        assert sample["caption"] == "" and sample["boxes"].shape == (0, 4) and sample["num_corrupt"] == 0


def test_folder_of_netpbm_images_inside_a_wrapping_folder_has_the_inner_classes(tmp_path):
    """GTSRB's layout: root/Images/<class>/<n>.ppm with a CSV beside them. The wrapping folder is looked through,
    and PPM (colour) and PGM (grey) files are images."""
    root = tmp_path / "Final_Training"
    write_image(root / "Images" / "00000" / "00000_00000.ppm", (200, 10, 10))
    write_image(root / "Images" / "00000" / "00000_00001.PPM", (190, 20, 20))
    write_image(root / "Images" / "00001" / "00001_00000.ppm", (10, 10, 200))
    grey = root / "Images" / "00002" / "a.pgm"
    grey.parent.mkdir(parents=True)
    Image.new("L", (9, 9), 128).save(grey)
    (root / "Images" / "00000" / "GT-00000.csv").write_text("Filename;ClassId\n")
    source = ImageFolder(root, S)
    assert source.classes == ["00000", "00001", "00002"]
    assert [source[i]["label"] for i in range(len(source))] == [0, 0, 1, 2]
    assert np.abs(mean_colour(source[2]) - (10, 10, 200)).max() < 2  # PPM is lossless
    assert np.abs(mean_colour(source[3]) - 128).max() < 2 and source[3]["image"].shape == (3, S, S)
    assert ImageFolder(root / "Images", S).classes == source.classes  # the same classes from one level down


def test_a_wrapping_folder_of_loose_images_stays_unlabelled(tmp_path):
    write_image(tmp_path / "data" / "images" / "a.png", (1, 2, 3))
    write_image(tmp_path / "data" / "images" / "b.png", (1, 2, 3))
    write_image(tmp_path / "data" / "c.png", (1, 2, 3))
    assert ImageFolder(tmp_path, S).classes is None  # data/c.png lies directly in the wrapping folder
    assert ImageFolder(tmp_path / "data" / "images", S).classes is None


def test_folder_without_subfolders_has_no_labels(tmp_path):
    write_image(tmp_path / "a.png", (1, 2, 3))
    write_image(tmp_path / "b.bmp", (4, 5, 6))
    source = ImageFolder(tmp_path, S)
    assert source.classes is None
    assert [source[i]["label"] for i in range(2)] == [-1, -1]
    assert source[0]["labels"] == []


def test_folder_with_images_at_the_root_and_in_subfolders_has_no_labels_and_names_the_loose_images(tmp_path, caplog):
    # A photo dump with some folders in it is an unlabelled pool; so is cat/ + dog/ with a stray cover.png, which
    # dropped every label without a word. The loose images that decided it are named, once per folder and process.
    write_image(tmp_path / "a.png", (1, 2, 3))
    write_image(tmp_path / "one" / "b.png", (4, 5, 6))
    write_image(tmp_path / "two" / "c.png", (4, 5, 6))
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        source = ImageFolder(tmp_path, S)
        ImageFolder(tmp_path, S)
    assert source.classes is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 image (a.png) lies beside its subfolders" in warnings[0], warnings
    assert "one, two are not read as classes" in warnings[0]
    assert source.describe().endswith("no labels (1 image (a.png) lies beside its subfolders)")
    caplog.clear()
    write_image(tmp_path / "pool" / "a.png", (1, 2, 3))  # loose images without two subfolders: nothing to say
    write_image(tmp_path / "pool" / "only" / "b.png", (1, 2, 3))
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        assert ImageFolder(tmp_path / "pool", S).describe().endswith("2 images, no labels")
    assert not caplog.records


def test_an_empty_data_spec_is_an_error_and_a_path_object_is_a_spec(tmp_path, monkeypatch):
    # "" was the current directory (an unset $DATA in --data "$DATA" evaluated or trained on it).
    write_image(tmp_path / "cat" / "a.png", (1, 2, 3))
    write_image(tmp_path / "dog" / "b.png", (1, 2, 3))
    monkeypatch.chdir(tmp_path)
    for spec in ("", "  "):
        with pytest.raises(DataError, match="the data spec is empty"):
            open_source(spec, S)
    assert open_source(tmp_path, S).classes == ["cat", "dog"]  # a pathlib.Path: AttributeError before
    with pytest.raises(DataError, match="a data spec is a string or a path, got int 3"):
        open_source(3, S)


def test_folder_with_a_single_subfolder_is_not_one_class(tmp_path):
    write_image(tmp_path / "images" / "a.png", (1, 2, 3))
    write_image(tmp_path / "images" / "b.png", (1, 2, 3))
    source = ImageFolder(tmp_path, S)
    assert source.classes is None and source[1]["label"] == -1


def test_a_folder_of_split_folders_is_refused_naming_the_split_folders_to_pass(tmp_path):
    """root/train/<class>/ beside root/test/<class>/ (looked through a wrapping folder): read as classes, every
    image would be labelled by its split and the test images trained on. The error names the folders to pass."""
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            write_image(tmp_path / "cifar" / split / cls / "a.png", (1, 2, 3))
    expected = (f"holds the splits test, train, not classes: pass a split folder itself \\({tmp_path}/cifar/train to "
                f"train on, {tmp_path}/cifar/test to evaluate on\\)")
    with pytest.raises(DataError, match=expected):
        ImageFolder(tmp_path, S)
    write_image(tmp_path / "loose" / "Train" / "a.png", (1, 2, 3))  # loose images, names in any case
    write_image(tmp_path / "loose" / "Validation" / "b.png", (1, 2, 3))
    with pytest.raises(DataError, match=f"holds the splits Train, Validation, not classes: pass a split folder itself "
                                        f"\\({tmp_path}/loose/Train to train on, {tmp_path}/loose/Validation to"):
        ImageFolder(tmp_path / "loose", S)
    write_image(tmp_path / "held_out" / "val" / "a.png", (1, 2, 3))  # no training split: the generic hint
    write_image(tmp_path / "held_out" / "test" / "b.png", (1, 2, 3))
    with pytest.raises(DataError, match="pass a split folder itself \\(one to train on, another to evaluate on\\)"):
        ImageFolder(tmp_path / "held_out", S)
    assert ImageFolder(tmp_path / "cifar" / "train", S).classes == ["cat", "dog"]
    write_image(tmp_path / "cifar" / "loose.png", (1, 2, 3))  # an image beside the splits: an unlabelled pool
    assert ImageFolder(tmp_path / "cifar", S).classes is None
    # a real class that happens to be named like a split, among others, stays a class (COCO has "train")
    write_image(tmp_path / "objects" / "train" / "a.png", (1, 2, 3))
    write_image(tmp_path / "objects" / "bus" / "a.png", (1, 2, 3))
    assert ImageFolder(tmp_path / "objects", S).classes == ["bus", "train"]


def test_resize_is_anisotropic_and_keeps_original_aspect(tmp_path):
    # 40x10: left half red, right half blue; squashed to SxS the halves must stay halves
    pixels = np.zeros((10, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    sample = ImageFolder(tmp_path, S)[0]
    assert sample["aspect"] == pytest.approx(4.0)
    image = sample["image"].numpy()
    assert (image[0, :, : S // 2 - 1] > 240).all() and (image[2, :, : S // 2 - 1] < 15).all()
    assert (image[2, :, S // 2 + 1 :] > 240).all() and (image[0, :, S // 2 + 1 :] < 15).all()


def test_transparent_pixels_are_white(tmp_path):
    Image.new("RGBA", (6, 6), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (ImageFolder(tmp_path, S)[0]["image"] == 255).all()


def test_corrupt_image_is_skipped_counted_and_logged_once(tmp_path, caplog):
    write_image(tmp_path / "a.png", (10, 10, 10))
    bad = tmp_path / "b.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    write_image(tmp_path / "c.png", (200, 200, 200))
    source = ImageFolder(tmp_path, S)
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        sample = source[1]
        again = source[1]
    assert sample["index"] == 2 and sample["num_corrupt"] == 1
    assert np.allclose(mean_colour(sample), 200)
    assert again["index"] == 2 and again["num_corrupt"] == 1
    warnings = [r for r in caplog.records if r.name == "wildssl.data"]
    assert len(warnings) == 1 and str(bad) in warnings[0].getMessage()
    assert source[0]["num_corrupt"] == 0


def _counting_decodes(source, monkeypatch):
    calls = []
    decode = type(source)._decode
    monkeypatch.setattr(type(source), "_decode", lambda self, index: calls.append(index) or decode(self, index))
    return calls


def test_a_small_source_decodes_each_image_once_and_hands_out_copies(tmp_path, monkeypatch):
    for k, colour in enumerate([(10, 10, 10), (120, 60, 30), (200, 200, 200)]):
        write_image(tmp_path / f"{k}.png", colour)
    source = ImageFolder(tmp_path, S)
    fresh = [ImageFolder(tmp_path, S)[k]["image"] for k in range(3)]
    calls = _counting_decodes(source, monkeypatch)
    first = [source[k]["image"] for k in range(3)]
    first[1].zero_()  # a view that writes into its sample must not reach the cache
    second = [source[k]["image"] for k in (2, 1, 0)][::-1]
    assert sorted(calls) == [0, 1, 2]
    assert all(torch.equal(a, b) for a, b in zip(second, fresh))


def test_a_source_too_large_for_the_cache_decodes_every_time(tmp_path, monkeypatch):
    import wildssl.data.decode as decode

    for k in range(3):
        write_image(tmp_path / f"{k}.png", (10 * k, 0, 0))
    monkeypatch.setattr(decode, "DECODED_CACHE_BYTES", 3 * 3 * S * S - 1)  # one byte short of the whole source
    source = ImageFolder(tmp_path, S)
    calls = _counting_decodes(source, monkeypatch)
    for _ in range(2):
        [source[k] for k in range(3)]
    assert calls == [0, 1, 2, 0, 1, 2]


def test_skipping_wraps_around_to_the_first_item(tmp_path):
    write_image(tmp_path / "a.png", (10, 10, 10))
    (tmp_path / "z.png").write_bytes(b"truncated")
    sample = ImageFolder(tmp_path, S)[1]
    assert sample["index"] == 0 and sample["num_corrupt"] == 1


def test_all_images_unreadable_raises_data_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match="no readable image"):
        ImageFolder(tmp_path, S)[0]


def test_empty_folder_raises_data_error_naming_it(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"no images in folder {tmp_path}"):
        open_source(str(tmp_path), S)


# --- JSONL manifest ---------------------------------------------------------------------------------


def write_manifest(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_manifest_reads_paths_captions_labels_and_both_box_kinds(tmp_path):
    write_image(tmp_path / "img" / "a.png", (255, 0, 0), size=(20, 10))
    absolute = write_image(tmp_path / "elsewhere" / "b.png", (0, 255, 0), size=(10, 10))
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        [
            {
                "path": "img/a.png",
                "captions": ["first", "second", "third"],
                "label": "zebra",
                "labels": ["zebra", "apple"],
                "boxes": [[0.1, 0.2, 0.5, 0.6]],
                "box_labels": ["apple"],
                "objects": [{"bbox_xywh": [2, 1, 8, 4], "category": "zebra"}, {"bbox_xywh": [15, 5, 10, 10]}],
                "license": "ignored",
            },
            "",
            {"file": str(absolute), "caption": "only", "labels": None, "objects": None},
        ],
    )
    source = JsonlManifest(manifest, S)
    assert len(source) == 2 and source.classes == ["apple", "zebra"]
    first, second = source[0], source[1]
    assert first["label"] == 1 and first["labels"] == [1, 0]
    assert first["captions"] == ["first", "second", "third"] and first["caption"] == "first"  # 0 % 3
    assert second["caption"] == "only" and second["label"] == -1 and second["labels"] == []
    expected = torch.tensor(
        [
            [0.1, 0.2, 0.5, 0.6],
            [2 / 20, 1 / 10, 10 / 20, 5 / 10],  # pixels of the 20x10 original, normalized
            [15 / 20, 5 / 10, 1.0, 1.0],  # clipped at the image border
        ]
    )
    assert torch.allclose(first["boxes"], expected)
    assert first["box_labels"].tolist() == [0, 1, -1]
    assert np.allclose(mean_colour(second), (0, 255, 0))
    assert "2 images" in source.describe()


def test_manifest_caption_choice_depends_only_on_the_index(tmp_path):
    for name in "abcd":
        write_image(tmp_path / f"{name}.png", (0, 0, 0))
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"path": f"{n}.png", "captions": ["x", "y", "z"]} for n in "abcd"]
    )
    source = JsonlManifest(manifest, S)
    assert [source[i]["caption"] for i in range(4)] == ["x", "y", "z", "x"]
    assert [source[i]["caption"] for i in range(4)] == ["x", "y", "z", "x"]


def test_manifest_integer_labels_have_no_class_names(tmp_path):
    write_image(tmp_path / "a.png", (0, 0, 0))
    source = JsonlManifest(write_manifest(tmp_path / "m.jsonl", [{"path": "a.png", "label": 3}]), S)
    assert source.classes is None and source[0]["label"] == 3


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"path": "a.png", ', "invalid JSON"),
        ('["a.png"]', "expected a JSON object"),
        ('{"caption": "no image"}', 'missing image path'),
        ('{"path": "a.png", "captions": "not a list"}', '"captions" must be a list of strings'),
        ('{"path": "a.png", "boxes": [[0.5, 0.1, 0.2, 0.9]]}', '"boxes" must be a list of normalized'),
        ('{"path": "a.png", "boxes": [[10, 10, 50, 50]]}', '"boxes" must be a list of normalized'),
        ('{"path": "a.png", "objects": [{"bbox_xywh": [1, 2, -3, 4]}]}', "objects\\[0\\] needs"),
        ('{"path": "a.png", "objects": [{"bbox_xywh": [1, 2, Infinity, 4]}]}', "objects\\[0\\] needs"),
        ('{"path": "a.png", "objects": [{"bbox_xywh": [-60, 2, 50, 4]}]}', "lies left of or above the image"),
        ('{"path": "a.png", "label": -2}', '"label" must be a class name or an integer'),
        ('{"path": "a.png", "label": 4}', "label 4 is an integer but line 1 used a class name"),
    ],
)
def test_manifest_bad_line_raises_data_error_with_file_and_line_number(tmp_path, bad_line, message):
    manifest = write_manifest(
        tmp_path / "m.jsonl", [{"path": "a.png", "label": "cat"}, {"path": "b.png"}, bad_line]
    )
    with pytest.raises(DataError, match=message) as error:
        JsonlManifest(manifest, S)
    assert f"{manifest}:3:" in str(error.value)


def test_object_boxes_wholly_outside_their_image_are_left_out_with_one_warning(tmp_path, caplog):
    """Boxes a pixel past the border are clipped (annotation tools round outwards); a box wholly right of or below
    its image used to become a zero-area box at the border, labelled, and fed to the box probes."""
    write_image(tmp_path / "a.png", (0, 0, 0), size=(32, 32))
    objects = [{"bbox_xywh": [100, 100, 50, 50], "category": "far"},
               {"bbox_xywh": [-1, 0, 17, 16], "category": "cat"},
               {"bbox_xywh": [0, 40, 8, 8], "category": "below"}]
    source = JsonlManifest(write_manifest(tmp_path / "m.jsonl", [{"path": "a.png", "objects": objects}]), S)
    with caplog.at_level(logging.INFO, logger="wildssl"):
        first, again = source[0], source[0]
    assert [list(b) for b in first["boxes"].tolist()] == [[0.0, 0.0, 0.5, 0.5]]
    assert [source.classes[v] for v in first["box_labels"].tolist()] == ["cat"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of its object boxes lie outside its 32x32 pixels" in warnings[0]
    assert again["boxes"].tolist() == first["boxes"].tolist()


def test_manifest_with_missing_image_files_counts_them_as_corrupt(tmp_path):
    write_image(tmp_path / "present.png", (9, 9, 9))
    manifest = write_manifest(tmp_path / "m.jsonl", [{"path": "gone.png"}, {"path": "present.png"}])
    sample = JsonlManifest(manifest, S)[0]
    assert sample["index"] == 1 and sample["num_corrupt"] == 1


def test_empty_manifest_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="has no records"):
        JsonlManifest(write_manifest(tmp_path / "m.jsonl", [""]), S)


@pytest.mark.parametrize("name", ["coco_mini", "flickr8k_mini", "camvid_scenes"])
def test_shared_manifests_load_directly(name):
    root = shared_data()
    manifest = root / name / "annotations.jsonl" if root else None
    if manifest is None or not manifest.is_file():
        pytest.skip(f"shared data {name} not available")
    source = open_source(str(manifest), 32)
    assert isinstance(source, JsonlManifest)
    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    assert len(source) == len(records)
    for i in (0, len(source) - 1):
        sample, record = source[i], records[i]
        assert sample["num_corrupt"] == 0 and sample["image"].shape == (3, 32, 32)
        assert sample["aspect"] == pytest.approx(record["width"] / record["height"])
        assert sample["captions"] == record["captions"]
        assert [source.classes[k] for k in sample["labels"]] == list(record.get("labels") or [])
        objects = record.get("objects") or []
        assert len(sample["boxes"]) == len(objects)
        assert ((sample["boxes"] >= 0) & (sample["boxes"] <= 1)).all()
        for box, obj in zip(sample["boxes"].double(), objects):
            x, y, w, h = obj["bbox_xywh"]
            expected = torch.tensor([x / record["width"], y / record["height"], (x + w) / record["width"],
                                     (y + h) / record["height"]], dtype=torch.float64).clamp(0, 1)
            assert torch.allclose(box, expected, atol=1e-6)
        assert [source.classes[k] for k in sample["box_labels"]] == [o["category"] for o in objects]


# --- tar shards -------------------------------------------------------------------------------------


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(folder: Path) -> list[Path]:
    """Two shards in img2dataset layout; shard 1 holds a key with a caption and metadata but no image."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as archive:
        for k, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
            add_member(archive, f"0000{k}.jpg", image_bytes(colour, fmt="JPEG"))
            add_member(archive, f"0000{k}.txt", f"caption {k}".encode())
            add_member(archive, f"0000{k}.json", json.dumps({"key": f"0000{k}"}).encode())
        add_member(archive, "00001.cls", b"7\n")
    with tarfile.open(folder / "00001.tar", "w") as archive:
        add_member(archive, "10000.txt", b"orphan caption")
        add_member(archive, "10000.json", b"{}")
        add_member(archive, "10001.png", image_bytes((0, 0, 255)))
        add_member(archive, "10001.json", b"{}")
    return [folder / "00000.tar", folder / "00001.tar"]


def test_tar_shards_index_keys_captions_labels_and_count_missing_images(tmp_path, caplog):
    shards = write_shards(tmp_path / "shards")
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        source = TarShards(tmp_path / "shards", S)
    assert len(source) == 3 and source.num_missing_image == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "wildssl.data"]
    assert len(warnings) == 1 and str(shards[1]) in warnings[0] and "10000" in warnings[0]
    samples = [source[i] for i in range(3)]
    assert [s["caption"] for s in samples] == ["caption 0", "caption 1", ""]
    assert [s["label"] for s in samples] == [-1, 7, -1] and samples[1]["labels"] == [7]
    for sample, colour in zip(samples, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        assert np.abs(mean_colour(sample) - colour).max() < 10
        assert sample["aspect"] == pytest.approx(2.0)
    assert "1 keys without image" in source.describe()


def test_tar_pattern_forms_find_the_same_shards(tmp_path):
    shards = write_shards(tmp_path / "shards")
    forms = [
        str(tmp_path / "shards" / "{00000..00001}.tar"),
        str(tmp_path / "shards" / "0000{0,1}.tar"),
        str(tmp_path / "shards" / "*.tar"),
        str(tmp_path / "shards"),
    ]
    for form in forms:
        source = open_source(form, S)
        assert isinstance(source, TarShards) and source.shards == shards, form
    single = open_source(str(shards[1]), S)
    assert len(single) == 1 and single.shards == [shards[1]]


def test_tar_pattern_naming_a_missing_shard_raises_data_error(tmp_path):
    write_shards(tmp_path / "shards")
    with pytest.raises(DataError, match="tar shard not found: .*00002.tar"):
        TarShards(str(tmp_path / "shards" / "{00000..00002}.tar"), S)


def test_a_glob_of_image_files_or_one_image_file_is_refused_pointing_to_their_folder(tmp_path):
    """photos/*.jpg and photos/a.jpg name images, not tar shards or a folder: one line that says to give the
    folder, not a tar header error on the first image."""
    for name in ("a.jpg", "b.jpg", "c.PNG"):
        write_image(tmp_path / "photos" / name, (1, 2, 3))
    with pytest.raises(DataError, match=f"matches image files \\({tmp_path}/photos/a.jpg and 1 more\\): a glob or "
                                        "brace pattern names tar shards; give the folder that holds the images"):
        open_source(str(tmp_path / "photos" / "*.jpg"), S)
    with pytest.raises(DataError, match="photos/a.jpg is one image: give the folder that holds the images"):
        open_source(str(tmp_path / "photos" / "a.jpg"), S)
    assert len(open_source(str(tmp_path / "photos"), S)) == 3


def test_compressed_or_non_tar_shard_raises_data_error(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"definitely not a tar archive" * 30)
    with pytest.raises(DataError, match="cannot read tar shard"):
        TarShards(tmp_path / "x.tar", S)


def test_shard_cut_short_keeps_its_complete_members_and_logs_one_line(tmp_path, caplog):
    with tarfile.open(tmp_path / "s.tar", "w") as archive:
        for k in range(4):
            add_member(archive, f"{k}.png", image_bytes((40 * k, 0, 0)))
    data = (tmp_path / "s.tar").read_bytes()
    with tarfile.open(tmp_path / "s.tar") as archive:
        last = archive.getmember("3.png")
    (tmp_path / "s.tar").write_bytes(data[: last.offset_data + 10])  # an interrupted download
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        source = TarShards(tmp_path / "s.tar", S)
    assert [s.key for s in source.samples] == ["0", "1", "2"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "wildssl.data"]
    assert len(warnings) == 1 and "truncated" in warnings[0]
    assert np.abs(mean_colour(source[2]) - (80, 0, 0)).max() < 2


def test_corrupt_image_inside_a_shard_is_skipped(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as archive:
        add_member(archive, "a.jpg", b"\xff\xd8\xff not really a jpeg")
        add_member(archive, "b.png", image_bytes((50, 60, 70)))
    sample = TarShards(tmp_path / "s.tar", S)[0]
    assert sample["index"] == 1 and sample["num_corrupt"] == 1


def test_tar_source_survives_pickling_and_reopens_files(tmp_path):
    write_shards(tmp_path / "shards")
    source = TarShards(tmp_path / "shards", S)
    before = source[2]["image"]
    clone = pickle.loads(pickle.dumps(source))  # what a spawned DataLoader worker receives
    assert torch.equal(clone[2]["image"], before) and torch.equal(clone[0]["image"], source[0]["image"])
    source.close()
    assert torch.equal(source[2]["image"], before)


def test_a_brace_group_that_is_no_range_or_list_says_what_it_needs():
    # the former message said "{a..b} is neither a range a..b nor a list a,b"
    with pytest.raises(DataError, match=r"brace group \{a\.\.b\} in 's\{a\.\.b\}\.tar': a range needs whole-number"):
        expand_braces("s{a..b}.tar")
    with pytest.raises(DataError, match=r"brace group \{x\}.*give a range such as \{000\.\.099\} or a list"):
        expand_braces("s{x}.tar")


def test_expand_braces_ranges_lists_padding_and_products():
    assert expand_braces("s{00000..00002}.tar") == ["s00000.tar", "s00001.tar", "s00002.tar"]
    assert expand_braces("s{8..11}.tar") == ["s8.tar", "s9.tar", "s10.tar", "s11.tar"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ["s{0..}.tar", "s{3..1}.tar", "s{0..2.tar", "s{x}.tar", "s{{0..1}}.tar"]:
        with pytest.raises(DataError):
            expand_braces(bad)


# --- specs and collate ------------------------------------------------------------------------------


def test_open_source_dispatches_on_the_kind_of_path(tmp_path):
    write_image(tmp_path / "folder" / "a.png", (0, 0, 0))
    write_image(tmp_path / "m" / "a.png", (0, 0, 0))
    manifest = write_manifest(tmp_path / "m" / "list.jsonl", [{"path": "a.png"}])
    assert isinstance(open_source(str(tmp_path / "folder"), S), ImageFolder)
    assert isinstance(open_source(str(manifest), S), JsonlManifest)
    assert open_source(str(tmp_path / "folder")).load_size == 224


def test_missing_path_raises_data_error_with_the_expected_kinds(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError) as error:
        open_source(missing)
    assert str(error.value) == (
        f"data path not found: {missing} (expected an image folder, a .jsonl manifest, tar shards or synthetic:scenes)"
    )


def test_synthetic_spec_parses_typed_parameters():
    source = open_source("synthetic:scenes?n=12&size=16&seed=5&split=test&num_classes=4")
    assert isinstance(source, SyntheticScenes)
    assert (source.n, source.size, source.seed, source.split, source.num_classes) == (12, 16, 5, "test", 4)
    assert source.load_size == 16 and source[0]["image"].shape == (3, 16, 16)
    assert open_source("synthetic:scenes?size=16", load_size=8)[0]["image"].shape == (3, 8, 8)
    assert len(open_source("synthetic:scenes")) == 2000


@pytest.mark.parametrize(
    "spec, message",
    [
        ("synthetic:scenes?colour=red", "unknown parameter 'colour'.*valid: n, size, seed, split, num_classes"),
        ("synthetic:scenes?n=ten", "parameter n='ten'.*must be an integer"),
        ("synthetic:scenes?n", "parameter 'n'.*has no value"),
        ("synthetic:scenes?n=1&n=2", "given twice"),
        ("synthetic:faces?n=3", "unknown synthetic source 'faces'.*valid: scenes"),
        ("synthetic:scenes?split=val", "split must be one of train, test"),
    ],
)
def test_bad_synthetic_spec_raises_data_error(spec, message):
    with pytest.raises(DataError, match=message):
        open_source(spec)


def test_collate_stacks_fixed_size_fields_and_lists_the_rest():
    source = SyntheticScenes(n=5, size=16)
    batch = collate([source[i] for i in (4, 0, 2)])
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert batch["aspect"].dtype == torch.float32 and batch["aspect"].tolist() == [1.0, 1.0, 1.0]
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [source[i]["label"] for i in (4, 0, 2)]
    assert batch["index"].tolist() == [4, 0, 2] and batch["num_corrupt"] == 0
    assert batch["caption"] == [source[i]["caption"] for i in (4, 0, 2)]
    assert len(batch["boxes"]) == 3 and all(b.shape[1] == 4 for b in batch["boxes"])
    assert [len(b) for b in batch["box_labels"]] == [len(b) for b in batch["boxes"]]
    assert batch["labels"][1] == source[0]["labels"] and batch["captions"][2] == source[2]["captions"]


def test_collate_counts_each_skipped_file_once(tmp_path):
    write_image(tmp_path / "a.png", (0, 0, 0))
    (tmp_path / "b.png").write_bytes(b"junk")
    (tmp_path / "c.png").write_bytes(b"junk")
    source = ImageFolder(tmp_path, S)
    samples = [source[1], source[2], source[0]]
    assert [s["corrupt"] for s in samples] == [[1, 2], [2], []]  # three skip events, two files
    assert [s["num_corrupt"] for s in samples] == [2, 1, 0]
    batch = collate(samples)
    assert batch["corrupt"] == [1, 2] and batch["num_corrupt"] == 2


def test_a_folder_with_one_class_subfolder_says_why_its_images_are_unlabelled(tmp_path, caplog):
    """A probe on onecls/cat/ said "10 of 10 unlabelled (use an image folder with class subfolders)", which it was."""
    import logging

    write_image(tmp_path / "cat" / "a.png", (1, 2, 3))
    write_image(tmp_path / "cat" / "b.png", (1, 2, 3))
    with caplog.at_level(logging.INFO, logger="wildssl"):
        assert ImageFolder(tmp_path, S).classes is None
    assert "every image is in its one subfolder cat/" in caplog.text


def test_a_shard_cut_in_a_header_is_named_and_its_last_key_left_out(tmp_path, caplog):
    """tarfile stops without a word at a header cut short: the shard read as complete, and the key at the cut
    kept its image but lost its label and caption (label -1)."""
    with tarfile.open(tmp_path / "s.tar", "w") as archive:
        for k in range(4):
            add_member(archive, f"{k}.png", image_bytes((40 * k, 0, 0)))
            add_member(archive, f"{k}.cls", str(k % 2).encode())
    data = (tmp_path / "s.tar").read_bytes()
    with tarfile.open(tmp_path / "s.tar") as archive:
        header = archive.getmember("2.cls").offset
    for cut in (header, header + 100):  # at the header of 2.cls, inside it
        (tmp_path / "s.tar").write_bytes(data[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wildssl.data"):
            source = TarShards(tmp_path / "s.tar", S)
        assert [(s.key, s.label) for s in source.samples] == [("0", 0), ("1", 1)]
        (warning,) = [r.getMessage() for r in caplog.records if r.name == "wildssl.data"]
        assert "is truncated (no end-of-archive block after the last member); indexing the 2 keys before it (key 2, " \
               "at the cut, is left out)" in warning


def test_repeated_members_and_keys_with_inner_dots_are_named(tmp_path, caplog):
    """A key added twice to one shard was dropped without a word; names like img.000.jpg all became key "img"
    with no image, and the warning listed every member."""
    with tarfile.open(tmp_path / "dup.tar", "w") as archive:
        for _ in range(2):
            for k in range(3):
                add_member(archive, f"k{k}.png", image_bytes((10, 20, 30)))
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        assert len(TarShards(tmp_path / "dup.tar", S)) == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "wildssl.data"]
    assert any("member k0.png appears twice; the later one is read" in m for m in messages)
    assert any("3 members repeat an earlier one of the same key and extension" in m for m in messages)
    caplog.clear()
    with tarfile.open(tmp_path / "dots.tar", "w") as archive:
        add_member(archive, "ok.png", image_bytes((10, 20, 30)))
        for k in range(6):
            add_member(archive, f"img.{k:03d}.jpg", image_bytes((10, 20, 30), fmt="JPEG"))
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        assert [s.key for s in TarShards(tmp_path / "dots.tar", S).samples] == ["ok"]
    (message,) = [r.getMessage() for r in caplog.records if "has no image" in r.getMessage()]
    assert "members: img.000.jpg, img.001.jpg, img.002.jpg, img.003.jpg and 2 more" in message
    assert "rename them without inner dots (img_000.jpg)" in message


def test_a_manifest_whose_paths_resolve_nowhere_says_where_they_are_read_from(tmp_path, monkeypatch):
    """Paths written relative to the current folder gave one "skipping unreadable image" warning per image, then
    "all 30 items failed to decode": they were missing, not undecodable."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "lists").mkdir()
    for k in range(3):
        (tmp_path / "photos" / f"{k}.png").write_bytes(image_bytes((10, 20, 30)))
    manifest = tmp_path / "lists" / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"photos/{k}.png"}) + "\n" for k in range(3)))
    monkeypatch.chdir(tmp_path)  # the paths are right from here, not from the manifest's folder
    with pytest.raises(DataError, match=rf"^manifest {manifest}: none of its first 3 images exists \(e.g. "
                                        rf"{tmp_path / 'lists' / 'photos' / '0.png'}\); relative paths in a manifest "
                                        rf"are read from the manifest's folder"):
        JsonlManifest(manifest, S)
    manifest.write_text("".join(json.dumps({"path": f"../photos/{k}.png"}) + "\n" for k in range(3)))
    assert len(JsonlManifest(manifest, S)) == 3
