"""Data SPEC strings -> sources: a folder, a ``.jsonl`` manifest, tar shards, or ``synthetic:NAME?k=v``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from wildssl.data.decode import DEFAULT_MAX_PIXELS, EXPECTED_SPEC, check_load_size
from wildssl.data.folder import ImageFolder, is_image_name
from wildssl.data.manifest import JsonlManifest
from wildssl.data.sample import DEFAULT_LOAD_SIZE, Source
from wildssl.data.shards import GLOB_CHARS, TarShards
from wildssl.data.synthetic import SyntheticScenes
from wildssl.errors import DataError


def _is_shard_folder(folder: Path) -> bool:
    """A folder of shards holds ``*.tar`` files and no images at its top level (img2dataset also writes
    ``*.parquet`` and ``*_stats.json`` beside its shards)."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    return any(n.endswith(".tar") for n in names) and not any(is_image_name(n) for n in names)


def _parse_value(text: str, kind: type, name: str, spec: str) -> Any:
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise DataError(f"parameter {name}={text!r} in {spec!r} must be an integer") from None
    return text


def _open_synthetic(spec: str, load_size: int | None) -> Source:
    generators = {"scenes": SyntheticScenes}
    name, _, query = spec[len("synthetic:") :].partition("?")
    if name not in generators:
        raise DataError(f"unknown synthetic source {name!r} in {spec!r} (valid: {', '.join(generators)})")
    generator = generators[name]
    types = generator.QUERY_PARAMETERS
    params: dict[str, Any] = {}
    for part in query.split("&") if query else []:
        key, equals, value = part.partition("=")
        if key not in types:
            raise DataError(f"unknown parameter {key!r} in {spec!r} (valid: {', '.join(types)})")
        if not equals:
            raise DataError(f"parameter {key!r} in {spec!r} has no value (write {key}=...)")
        if key in params:
            raise DataError(f"parameter {key!r} given twice in {spec!r}")
        params[key] = _parse_value(value, types[key], key, spec)
    return generator(**params, load_size=None if load_size is None else check_load_size(load_size))


def open_source(spec: str, load_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
    """Open a data source from a spec string.

    ``spec``: an image folder, a ``.jsonl`` manifest, tar shards (a ``.tar``, a folder of them, a glob
    or a brace pattern such as ``data/{00000..00009}.tar``) or ``synthetic:scenes?n=2000&size=64&seed=0&
    split=train&num_classes=8`` (query values typed; see :class:`~wildssl.data.synthetic.SyntheticScenes`).
    ``load_size``: side of the returned square images; ``None`` means 224 for files and the render
    ``size`` for synthetic scenes. ``max_pixels``: file images with more pixels to decode are skipped
    as unreadable (``data.max_pixels``; see :mod:`wildssl.data.decode`).
    """
    if spec.startswith("synthetic:"):
        return _open_synthetic(spec, load_size)
    size = DEFAULT_LOAD_SIZE if load_size is None else load_size
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return TarShards(path, size, max_pixels) if _is_shard_folder(path) else ImageFolder(path, size, max_pixels)
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return JsonlManifest(path, size, max_pixels)
        if path.suffix.lower() == ".tar":
            return TarShards(path, size, max_pixels)
        raise DataError(f"unsupported data file {spec}: {EXPECTED_SPEC}")
    if "{" in spec or GLOB_CHARS.search(spec):
        return TarShards(os.path.expanduser(spec), size, max_pixels)
    raise DataError(f"data path not found: {spec} ({EXPECTED_SPEC})")
