"""Data SPEC strings -> sources: a folder, a ``.jsonl`` manifest, tar shards (map-style or streamed),
``video:PATH?fps=F``, or ``synthetic:NAME?k=v``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from wildssl.data.decode import DEFAULT_MAX_PIXELS, EXPECTED_SPEC, check_load_size
from wildssl.data.folder import ImageFolder, is_image_name
from wildssl.data.manifest import JsonlManifest
from wildssl.data.sample import DEFAULT_LOAD_SIZE, Source
from wildssl.data.shard_stream import DEFAULT_SHUFFLE_SHARDS, MAP_STYLE_MAX_SHARDS, STREAM_PREFIX, ShardStream
from wildssl.data.shards import GLOB_CHARS, TarShards, shard_paths
from wildssl.data.synthetic import SyntheticScenes
from wildssl.data.video import VIDEO_EXTENSIONS, VideoFrames  # PyAV itself is imported only to open a video
from wildssl.errors import DataError


def _is_shard_folder(folder: Path) -> bool:
    """A folder of shards holds ``*.tar`` files and no images at its top level (img2dataset also writes
    ``*.parquet`` and ``*_stats.json`` beside its shards)."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    return any(n.endswith(".tar") for n in names) and not any(is_image_name(n) for n in names)


def _parse_value(text: str, kind: type, name: str, spec: str) -> Any:
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise DataError(f"parameter {name}={text!r} in {spec!r} must be {what}") from None
    return text


def _parse_query(query: str, types: dict[str, type], spec: str) -> dict[str, Any]:
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
    return params


def _open_synthetic(spec: str, load_size: int | None) -> Source:
    generators = {"scenes": SyntheticScenes}
    name, _, query = spec[len("synthetic:") :].partition("?")
    if name not in generators:
        raise DataError(f"unknown synthetic source {name!r} in {spec!r} (valid: {', '.join(generators)})")
    generator = generators[name]
    params = _parse_query(query, generator.QUERY_PARAMETERS, spec)
    return generator(**params, load_size=None if load_size is None else check_load_size(load_size))


def _open_video(spec: str, load_size: int, max_pixels: int) -> Source:
    path, question, query = spec[len("video:"):].rpartition("?")
    if not question:  # no query: the whole rest is the path
        path, query = query, ""
    params = _parse_query(query, VideoFrames.QUERY_PARAMETERS, spec)
    return VideoFrames(os.path.expanduser(path), load_size=load_size, max_pixels=max_pixels, **params)


def open_source(spec: str | os.PathLike, load_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                stream: bool = False, shuffle_shards: int = DEFAULT_SHUFFLE_SHARDS) -> Source | ShardStream:
    """Open a data source from a spec string.

    ``spec``: an image folder, a ``.jsonl`` manifest, tar shards (a ``.tar``, a folder of them, a glob
    or a brace pattern such as ``data/{00000..00009}.tar``; prefixed ``stream:`` to stream them), video
    frames ``video:FILE_OR_FOLDER?fps=0.2`` or ``synthetic:scenes?n=2000&size=64&seed=0&split=train&
    num_classes=8`` (query values typed; see :class:`~wildssl.data.synthetic.SyntheticScenes`).
    ``load_size``: side of the returned square images; ``None`` means 224 for files and the render
    ``size`` for synthetic scenes. ``max_pixels``: file images with more pixels to decode are skipped
    as unreadable (``data.max_pixels``; see :mod:`wildssl.data.decode`).

    ``stream``: the caller can train on a streamed source (:class:`~wildssl.data.shard_stream.ShardStream`):
    tar shards prefixed ``stream:``, or naming more than
    :data:`~wildssl.data.shard_stream.MAP_STYLE_MAX_SHARDS` shards, are then streamed, ``shuffle_shards``
    at a time (``data.shuffle_shards``). Otherwise (evaluation) every source is map-style and the prefix
    is ignored.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise DataError(f"a data spec is a string or a path, got {type(spec).__name__} {spec!r} ({EXPECTED_SPEC})")
    if not spec.strip():
        # "" would be the current directory: an unset $DATA in `--data "$DATA"` must not train or evaluate on it
        raise DataError(f"the data spec is empty ({EXPECTED_SPEC})")
    if spec.startswith("synthetic:"):
        return _open_synthetic(spec, load_size)
    size = DEFAULT_LOAD_SIZE if load_size is None else load_size
    if spec.startswith("video:"):
        return _open_video(spec, size, max_pixels)
    forced = spec.startswith(STREAM_PREFIX)
    if forced:
        spec = spec[len(STREAM_PREFIX):]
    path = Path(os.path.expanduser(spec))
    shards: str | Path | None = None
    if path.is_dir():
        if _is_shard_folder(path):
            shards = path
        elif not forced:
            return ImageFolder(path, size, max_pixels)
    elif path.is_file():
        if path.suffix.lower() == ".tar":
            shards = path
        elif path.suffix.lower() == ".jsonl" and not forced:
            return JsonlManifest(path, size, max_pixels)
        elif path.suffix.lower() in VIDEO_EXTENSIONS:
            raise DataError(f"{spec} is a video: write video:{spec}?fps=1 (frames per second to sample)")
        elif not forced and is_image_name(path.name):
            raise DataError(f"{spec} is one image: give the folder that holds the images ({EXPECTED_SPEC})")
        elif not forced:
            raise DataError(f"unsupported data file {spec}: {EXPECTED_SPEC}")
    elif "{" in spec or GLOB_CHARS.search(spec):
        shards = os.path.expanduser(spec)
    elif not forced:
        raise DataError(f"data path not found: {spec} ({EXPECTED_SPEC})")
    if shards is None:
        raise DataError(f"{STREAM_PREFIX}{spec}: only tar shards can be streamed (a .tar, a folder of them, a glob "
                        "or a brace pattern)")
    if stream and (forced or len(shard_paths(shards)) > MAP_STYLE_MAX_SHARDS):
        return ShardStream(shards, size, max_pixels, shuffle_shards)
    return TarShards(shards, size, max_pixels)
