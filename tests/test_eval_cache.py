import json

import torch

from wildssl.eval.cache import FeatureStore, load_feature_set, save_feature_set
from wildssl.eval.features import extract_feature_set
from wildssl.io import atomic_save
from wildssl.models.loading import EXPORT_FORMAT, load_encoder
from wildssl.models.vit import build_encoder
from wildssl.data import open_source

DATA = "synthetic:scenes?n=12&size=16&split=test"
MODEL = {"name": "tiny", "depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 4, "img_size": 16}


def _export(path, seed):
    torch.manual_seed(seed)
    encoder = build_encoder(**MODEL)
    atomic_save(dict(encoder.state_dict()), {"format": EXPORT_FORMAT, "config": json.dumps({"model": MODEL})}, path)


def test_cache_serves_a_second_store_without_running_the_encoder(tmp_path):
    _export(tmp_path / "encoder.safetensors", seed=0)
    first = FeatureStore(load_encoder(tmp_path / "encoder.safetensors"), cache_dir=tmp_path / "cache")
    features = first.features(DATA, 16, with_patch=True, with_masks=True)
    assert first.extractions == 1 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    second = FeatureStore(load_encoder(tmp_path / "encoder.safetensors"), cache_dir=tmp_path / "cache")
    again = second.features(DATA, 16, with_patch=True, with_masks=True)
    less = second.features(DATA, 16)  # an entry with patch tokens and masks serves a request for less
    assert second.extractions == 0
    assert torch.equal(again.cls, features.cls) and torch.equal(again.patch, features.patch)
    assert torch.equal(less.avg, features.avg)


def test_cache_invalidates_when_the_checkpoint_changes(tmp_path):
    path = tmp_path / "encoder.safetensors"
    _export(path, seed=0)
    before = FeatureStore(load_encoder(path), cache_dir=tmp_path / "cache").features(DATA, 16)
    _export(path, seed=1)  # the same file name, retrained weights
    store = FeatureStore(load_encoder(path), cache_dir=tmp_path / "cache")
    after = store.features(DATA, 16)
    assert store.extractions == 1 and not torch.allclose(before.cls, after.cls)
    encoder = load_encoder(path)
    with torch.no_grad():
        encoder.blocks[0].mlp.fc2.bias[0] += 1e-3  # one weight, slightly
    changed = FeatureStore(encoder, cache_dir=tmp_path / "cache")
    changed.features(DATA, 16)
    assert changed.extractions == 1


def test_cache_invalidates_when_the_preprocessing_or_the_data_changes(tmp_path):
    _export(tmp_path / "encoder.safetensors", seed=0)
    store = FeatureStore(load_encoder(tmp_path / "encoder.safetensors"), cache_dir=tmp_path / "cache")
    store.features(DATA, 16)
    store.features(DATA, 8)  # eval resolution
    store.features(DATA, 16, load_size=32)  # decode size
    store.features(DATA.replace("n=12", "n=13"), 16)  # other data
    store.features(DATA, 16, with_patch=True)  # more tokens kept
    assert store.extractions == 5
    store.features(DATA, 8)
    assert store.extractions == 5


def test_feature_set_round_trips_through_the_cache_file_with_its_annotations(tmp_path):
    torch.manual_seed(0)
    source = open_source(DATA)
    features = extract_feature_set(build_encoder(**MODEL), source, "cpu", 16, with_patch=True, with_masks=True,
                                   batch_size=5)
    save_feature_set(tmp_path / "f.safetensors", features, {"spec": DATA})
    loaded = load_feature_set(tmp_path / "f.safetensors")
    for name in ("cls", "avg", "patch", "labels", "indices"):
        assert torch.equal(getattr(loaded, name), getattr(features, name))
    assert loaded.grid == (4, 4) and loaded.classes == source.classes
    assert loaded.multi_labels == features.multi_labels == [source[i]["labels"] for i in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(loaded.boxes, features.boxes))
    assert all(torch.equal(a, b) for a, b in zip(loaded.box_labels, features.box_labels))
    assert all(torch.equal(a, source.mask(i)) for i, a in enumerate(loaded.masks))


def test_an_unreadable_cache_file_is_extracted_again(tmp_path):
    _export(tmp_path / "encoder.safetensors", seed=0)
    store = FeatureStore(load_encoder(tmp_path / "encoder.safetensors"), cache_dir=tmp_path / "cache")
    store.features(DATA, 16)
    (cached,) = (tmp_path / "cache").glob("*.safetensors")
    cached.write_bytes(b"not a safetensors file")
    fresh = FeatureStore(load_encoder(tmp_path / "encoder.safetensors"), cache_dir=tmp_path / "cache")
    fresh.features(DATA, 16)
    assert fresh.extractions == 1 and load_feature_set(cached).cls.shape == (12, 16)


def test_cache_invalidates_when_an_image_moves_to_another_class_folder_or_is_replaced(tmp_path):
    """Moving an image from a/ to b/ changes no count, no description and no stat of the folder named, and the
    probes read the former labels and features from the cache (a few-shot figure of the former split)."""
    import os
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a0", "a1", "a2", "b0", "b1", "b2"):
        folder = tmp_path / "data" / name[0]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    spec = str(tmp_path / "data")
    _export(tmp_path / "encoder.safetensors", seed=0)

    def labels():
        store = FeatureStore(load_encoder(tmp_path / "encoder.safetensors"), cache_dir=tmp_path / "cache")
        return store.features(spec, 16).labels.tolist(), store.extractions

    stat = os.stat(spec)
    assert labels() == ([0, 0, 0, 1, 1, 1], 1)
    os.rename(tmp_path / "data" / "a" / "a2.png", tmp_path / "data" / "b" / "a2.png")
    os.utime(spec, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the folder named looks untouched
    assert labels() == ([0, 0, 1, 1, 1, 1], 1)
    assert labels()[1] == 0  # unchanged again: read from the cache
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / "b" / "b0.png")
    os.utime(tmp_path / "data" / "b" / "b0.png", ns=(1, 10**18))  # another image under the same name
    assert labels()[1] == 1


def test_a_cache_that_cannot_be_written_keeps_the_features_in_memory_with_one_warning(tmp_path, caplog):
    """An unwritable cache (a read-only or full ~/.cache on a cluster) ended `eval linear` after the extraction, with
    advice about free space: the features are kept in memory for the command, and one warning says how to cache."""
    import logging

    _export(tmp_path / "encoder.safetensors", 0)
    (tmp_path / "a-file").write_text("")
    store = FeatureStore(load_encoder(tmp_path / "encoder.safetensors"), cache_dir=tmp_path / "a-file" / "cache")
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        first = store.features(DATA, 16)
        store.features(DATA.replace("n=", "n=1"), 16)  # another set: no second warning
        again = store.features(DATA, 16)
    said = [r.getMessage() for r in caplog.records if "cannot keep the features" in r.getMessage()]
    assert len(said) == 1 and "--cache-dir a writable folder, or --no-cache" in said[0]
    assert again is first and store.extractions == 2
