"""Frozen features extracted once per (encoder, dataset, preprocessing) and cached on disk.

A :class:`FeatureStore` serves every probe of a suite: the first probe that asks for a dataset at a
resolution runs the encoder over it, the others (and later runs) read the cache. The cache key is a
sha256 over

- the encoder: its class, architecture (patch size, heads, registers, class token) and the bytes of
  every tensor of its state dict, so a retrained, re-exported or differently initialized encoder never
  reads another's features, whatever the file is called;
- the data: the spec string, the source's own description and length, the size and modification
  time of the file or folder the spec names (an edited manifest is a new dataset), and the path, size
  and modification time of every image file or shard (an image moved to another class folder, or
  replaced, is a new dataset);
- the preprocessing: eval resolution, decode size, ImageNet normalization, and which tokens and
  annotations were kept (:data:`FEATURE_FORMAT` bumps when the extraction itself changes).

Files are safetensors (``<key>.safetensors``), written atomically; an unreadable one is extracted again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from wildssl.data import open_source
from wildssl.data.decode import FileSource
from wildssl.data.views import IMAGENET_MEAN, IMAGENET_STD
from wildssl.errors import CheckpointError
from wildssl.eval.features import FeatureSet, extract_feature_set
from wildssl.io import atomic_save, read_safetensors

log = logging.getLogger("wildssl")

# Bump when the extraction changes what it stores (old cache entries then stop matching).
FEATURE_FORMAT = "wildssl-features-2"  # 2: an unreadable image is left out, no longer its neighbour again


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/wildssl/features`` (``~/.cache/wildssl/features`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "wildssl" / "features"


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 of the encoder's architecture and of every tensor in its state dict (names, dtypes,
    shapes, bytes). Two encoders share a fingerprint only if they compute the same function."""
    digest = hashlib.sha256()
    architecture = {name: getattr(encoder, name, None) for name in
                    ("patch_size", "num_heads", "num_register_tokens", "class_token", "mlp_ratio")}
    digest.update(json.dumps([type(encoder).__name__, architecture], sort_keys=True).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def data_fingerprint(spec: str, source) -> str:
    """What names the data: spec, description, length, the stat of the file or folder named, and the path,
    size and modification time of every file the images are read from."""
    parts = [spec, source.describe(), str(len(source))]
    path = Path(os.path.expanduser(spec))
    if not spec.startswith("synthetic:") and path.exists():
        stat = path.stat()
        parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    # An image moved from cat/ to dog/ changes no count and no folder's stat, but its path; a manifest's or a
    # shard's labels change the file that holds them.
    for file in _image_files(source):
        try:
            stat = os.stat(file)
            parts.append(f"{file}:{stat.st_size}:{stat.st_mtime_ns}")
        except OSError:  # unreadable: extraction leaves it out (and says so)
            parts.append(f"{file}:missing")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _image_files(source) -> list[str]:
    """The files ``source`` reads its images from (its shards, or one file per image), or none (rendered
    scenes, video frames)."""
    if hasattr(source, "shards"):
        return [str(shard) for shard in source.shards]
    if isinstance(source, FileSource) and source.image_files:
        return [str(source._open(index)) for index in range(len(source))]
    return []


def feature_key(encoder_print: str, data_print: str, image_size: int, load_size: int, with_patch: bool,
                with_masks: bool) -> str:
    """The cache key of one extraction (hex sha256)."""
    record = {"format": FEATURE_FORMAT, "encoder": encoder_print, "data": data_print, "image_size": image_size,
              "load_size": load_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "patch": with_patch,
              "masks": with_masks}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _ragged(tensors: list[torch.Tensor], width: tuple[int, ...], dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image tensors ``(M_i, *width)`` -> concatenated ``(sum M_i, *width)`` and offsets ``(N + 1,)``."""
    counts = torch.tensor([0] + [len(t) for t in tensors], dtype=torch.long)
    if not tensors:
        return torch.zeros(0, *width, dtype=dtype), counts
    flat = torch.cat([t.reshape(-1, *width).to(dtype) for t in tensors])
    return flat, counts.cumsum(0)


def _split(flat: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    return [flat[start:stop] for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def save_feature_set(path: Path, features: FeatureSet, description: dict) -> None:
    """Write ``features`` as one safetensors file (ragged annotations as values + offsets)."""
    multi, multi_offsets = _ragged([torch.tensor(v, dtype=torch.long) for v in features.multi_labels], (), torch.long)
    boxes, box_offsets = _ragged(features.boxes, (4,), torch.float32)
    box_labels, _ = _ragged(features.box_labels, (), torch.long)
    tensors = {"cls": features.cls, "avg": features.avg, "labels": features.labels, "indices": features.indices,
               "multi_labels": multi, "multi_label_offsets": multi_offsets, "boxes": boxes,
               "box_offsets": box_offsets, "box_labels": box_labels}
    if features.patch is not None:
        tensors["patch"] = features.patch
    if features.masks is not None:
        # int16: class maps are small integers; a quarter of the disk of int64
        tensors["masks"] = torch.cat([m.reshape(-1).to(torch.int16) for m in features.masks])
        tensors["mask_shapes"] = torch.tensor([list(m.shape) for m in features.masks], dtype=torch.long)
    metadata = {"format": FEATURE_FORMAT, "grid": json.dumps(list(features.grid)),
                "classes": json.dumps(features.classes), "description": json.dumps(description)}
    atomic_save(tensors, metadata, path)


def load_feature_set(path: Path) -> FeatureSet:
    """Read a file written by :func:`save_feature_set`."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FEATURE_FORMAT:
        raise CheckpointError(f"{path} is not a wildssl feature cache of format {FEATURE_FORMAT}")
    masks = None
    if "masks" in tensors:
        sizes = tensors["mask_shapes"].prod(dim=1)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        masks = [flat.long().reshape(*shape) for flat, shape in
                 zip(_split(tensors["masks"], offsets), tensors["mask_shapes"].tolist())]
    box_offsets = tensors["box_offsets"]
    return FeatureSet(
        cls=tensors["cls"], avg=tensors["avg"], patch=tensors.get("patch"), grid=tuple(json.loads(metadata["grid"])),
        labels=tensors["labels"],
        multi_labels=[v.tolist() for v in _split(tensors["multi_labels"], tensors["multi_label_offsets"])],
        boxes=_split(tensors["boxes"], box_offsets), box_labels=_split(tensors["box_labels"], box_offsets),
        masks=masks, classes=json.loads(metadata["classes"]), indices=tensors["indices"])


class FeatureStore:
    """The features of one encoder, extracted once per (dataset, preprocessing), cached on disk.

    ``cache_dir=None`` keeps them in memory only (for this process). ``extractions`` counts the passes
    of the encoder over a dataset (what the cache saves)."""

    def __init__(self, encoder: nn.Module, device: torch.device | str = "cpu", cache_dir: str | Path | None = None,
                 batch_size: int = 256, num_workers: int = 0, progress: bool = False) -> None:
        self.encoder = encoder.to(device).eval()
        self.device = torch.device(device)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.fingerprint = encoder_fingerprint(encoder)
        self.extractions = 0
        self._memory: dict[str, FeatureSet] = {}

    def features(self, spec: str, image_size: int, load_size: int | None = None, with_patch: bool = False,
                 with_masks: bool = False) -> FeatureSet:
        """The :class:`FeatureSet` of the data ``spec`` at eval resolution ``image_size`` (decoded at
        ``load_size``, default ``image_size``), with patch tokens and masks when asked for."""
        load_size = load_size or image_size
        source = open_source(spec, load_size=load_size)
        data_print = data_fingerprint(spec, source)
        # an entry that holds more (patch tokens, masks) serves a request for less
        variants = dict.fromkeys((wp, wm) for wp in (with_patch, True) for wm in (with_masks, True))
        keys = [feature_key(self.fingerprint, data_print, image_size, load_size, wp, wm) for wp, wm in variants]
        for key in keys:
            if key in self._memory:
                return self._memory[key]
            path = self._path(key)
            if path is not None and path.is_file():
                try:
                    features = load_feature_set(path)
                except CheckpointError as error:
                    log.warning("feature cache %s is unreadable (%s); extracting again", path, error)
                    continue
                self._memory[key] = features
                return features
        features = extract_feature_set(self.encoder, source, self.device, image_size, with_patch, with_masks,
                                       self.batch_size, self.num_workers, self.progress)
        self.extractions += 1
        self._memory[keys[0]] = features
        path = self._path(keys[0])
        if path is not None:
            try:
                save_feature_set(path, features, {"spec": spec, "image_size": image_size, "load_size": load_size,
                                                  "patch": with_patch, "masks": with_masks})
            except CheckpointError as error:  # a full or read-only cache (a cluster's ~/.cache quota): keep going
                log.warning("cannot keep the features in the cache (%s); they stay in memory for this command (give "
                            "--cache-dir a writable folder, or --no-cache)", error)
                self.cache_dir = None  # one warning, not one per feature set
        return features

    def _path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.safetensors"
