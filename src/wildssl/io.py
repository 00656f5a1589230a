"""safetensors (and small text) files written atomically, safetensors read with one-line errors (no pickle).

Writes go to ``<name>.tmp`` first, are flushed to the disk and are then renamed over the old file: an
interrupted write (Ctrl-C, a killed job) or a failed one (a full disk, a read-only place) leaves the
previous file intact; a failed write also removes its ``.tmp`` and ends in one line.

Reading is in two stages so that a hostile or damaged file costs nothing: :func:`read_header` gives the
metadata and each tensor's shape without reading any tensor data, and :func:`read_tensors` then reads the
named tensors only.

A run's ``metrics.jsonl`` is read here as well (:func:`read_metrics`), so that evaluation and plots do not
import the training shell (``wildssl.train``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from wildssl.errors import CheckpointError, DataError

log = logging.getLogger("wildssl")


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file via a temporary file and an atomic rename.

    On failure the previous ``path`` (if any) is unchanged, the temporary file is removed and a one-line
    :class:`CheckpointError` says why (e.g. "No space left on device")."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    blocking = next((folder for folder in (path.parent, *path.parent.parents) if folder.exists()), None)
    if blocking is not None and not blocking.is_dir():  # "File exists" from mkdir, and advice about free space
        raise CheckpointError(f"cannot write {path}: {blocking} is a file, not a folder; nothing was written (choose "
                              "a path in a folder)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(contiguous, str(tmp), metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the place is not writable at all: there is no tmp to remove
            pass
        kept = "the previous file is unchanged" if path.is_file() else "nothing was written"
        raise CheckpointError(f"cannot write {path}: {write_error_reason(error)}; {kept} (free some space or "
                              "choose a writable place)") from None
    _sync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) via ``<name>.tmp`` and a rename: a write killed half-way leaves the previous
    file (or none), never a truncated one. For small files that are rewritten whole (JSON records, manifests,
    a tokenizer); errors propagate unchanged."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def output_file(path: str | os.PathLike, option: str = "--out", suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` checked as a file a command is about to write, its folder created: a folder or a suffix outside
    ``suffixes`` (when given; none given: any) is a one-line DataError naming ``option``, as is a folder that
    cannot be made. A name without a suffix gets the first of ``suffixes``."""
    written, path = os.fspath(path), Path(path)  # Path("out/") drops the slash that says "a folder"
    if path.is_dir() or written.endswith(("/", os.sep)):
        raise DataError(f"{option} {path} is a folder; give a file name, e.g. "
                        f"{path / ('out' + (suffixes[0] if suffixes else ''))}")
    if suffixes and not path.suffix:
        path = path.with_name(path.name + suffixes[0])
    if suffixes and path.suffix.lower() not in suffixes:
        raise DataError(f"{option} {path}: cannot write a {path.suffix} file; use one of {', '.join(suffixes)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{option} {path}: cannot make its folder {path.parent}: {write_error_reason(error)}") from None
    return path


def write_error_reason(error: BaseException) -> str:
    """The operating system's reason in a failed write, e.g. "No space left on device" (safetensors wraps
    it as ``I/O error: <reason> (os error 28)``)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    message = str(error)
    found = re.search(r"I/O error: (.*?) \(os error \d+\)", message)
    return found.group(1) if found else (message.splitlines() or [type(error).__name__])[0]


def _sync_directory(folder: Path) -> None:
    # The rename is durable once the directory entry is on the disk; file systems that cannot sync a
    # directory (some network mounts) refuse, which loses nothing but that guarantee.
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CheckpointError(f"cannot read checkpoint {path}: {reason} (is it a complete .safetensors file "
                           "written by wildssl?)")


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The metadata and the shape of every tensor of a safetensors file, without reading tensor data."""
    path = Path(path)
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None
    return metadata, shapes


def read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of a safetensors file (the others are not read)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the metadata of a safetensors file, with one-line errors."""
    path = Path(path)
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None
    return tensors, metadata


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity, in order."""
    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def metrics_step(line: str) -> float:
    """The ``step`` of one ``metrics.jsonl`` line; inf for a line cut short by a kill."""
    try:
        return json.loads(line).get("step", math.inf)
    except json.JSONDecodeError:  # a line cut short by a kill
        return math.inf


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's ``metrics.jsonl``, a ``null`` read as NaN. A line that is not a JSON record (the
    last one of a run killed while writing it) is left out with a warning naming the file and the line, as a resumed run drops it
    (:func:`metrics_step`)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records, cut = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):  # a non-finite figure is written as null (strict JSON): NaN again here
            records.append({name: math.nan if value is None else value for name, value in record.items()})
        else:
            cut.append(number)
    if cut:
        log.warning("%s: left out line%s %s, not a JSON record (a run killed while writing it)", path,
                    "s" if len(cut) > 1 else "", ", ".join(map(str, cut)))
    return records
