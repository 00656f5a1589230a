"""WebDataset tar shards in img2dataset's layout, read by seeking into indexed members."""

from __future__ import annotations

import glob
import io
import math
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from wildssl.data.decode import DEFAULT_MAX_PIXELS, EXPECTED_SPEC, IMAGE_EXTENSIONS, FileSource, logger, warn_once
from wildssl.data.sample import DEFAULT_LOAD_SIZE
from wildssl.errors import DataError

_BRACE_GROUP = re.compile(r"\{([^{}]*)\}")
_NUMERIC_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
GLOB_CHARS = re.compile(r"[*?\[]")
_MAX_OPEN_SHARDS = 32  # file handles kept open per process (random access jumps between shards)
# A million shards of 10,000 images (img2dataset's default) is ten billion images, more than any public
# dataset holds: a pattern naming more is a typo in a range bound, refused before anything is expanded.
MAX_SHARD_NAMES = 1_000_000


class _RangeNames(Sequence):
    """The names of a numeric brace range, made on demand: ``{0..99999999}`` costs no memory."""

    def __init__(self, numbers: range, width: int) -> None:
        self.numbers, self.width = numbers, width

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, index: int) -> str:
        return str(self.numbers[index]).zfill(self.width)


def _brace_parts(pattern: str) -> list[str | Sequence[str]]:
    """``pattern`` split into literal text (str) and the choices of each brace group, in order."""
    parts: list[str | Sequence[str]] = []
    rest = pattern
    while True:
        match = _BRACE_GROUP.search(rest)
        if match is None or "{" in rest[: match.start()] or "}" in rest[: match.start()]:
            if "{" in rest or "}" in rest:
                raise DataError(f"unbalanced or nested braces in {pattern!r} "
                                "(expected e.g. shards/{00000..00009}.tar)")
            parts.append(rest)
            return parts
        body = match.group(1)
        numeric = _NUMERIC_RANGE.fullmatch(body)
        if numeric:
            low, high = numeric.groups()
            if int(high) < int(low):
                raise DataError(f"descending range {{{body}}} in {pattern!r} (write the smaller bound first)")
            padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (low, high))
            width = max(len(low), len(high)) if padded else 0
            choices: Sequence[str] = _RangeNames(range(int(low), int(high) + 1), width)
        elif "," in body:
            choices = body.split(",")
        else:
            form = ("a range needs whole-number bounds, e.g. {000..099}" if ".." in body
                    else "give a range such as {000..099} or a list such as {a,b}")
            raise DataError(f"brace group {{{body}}} in {pattern!r}: {form}")
        parts += [rest[: match.start()], choices]
        rest = rest[match.end() :]


def iter_braces(pattern: str) -> Iterator[str]:
    """The names a shell-style brace pattern stands for, one at a time, in order: ``"s{00..02}.tar"`` ->
    ``s00.tar, s01.tar, s02.tar``; ``"{a,b}/x"`` -> ``a/x, b/x``; several groups give their product. A
    range is zero-padded when a bound is written with a leading zero, to the wider bound's width. More
    than :data:`MAX_SHARD_NAMES` names raise :class:`~wildssl.errors.DataError` before the first."""
    parts = _brace_parts(pattern)
    groups = [p for p in parts if not isinstance(p, str)]
    count = math.prod(len(g) for g in groups)
    if count > MAX_SHARD_NAMES:
        raise DataError(f"data pattern {pattern!r} names {count:,} shards, more than {MAX_SHARD_NAMES:,}; "
                        "check the range bounds (e.g. shards/{00000..09999}.tar)")
    yield from _names(parts)


def _names(parts: list[str | Sequence[str]]) -> Iterator[str]:
    # not itertools.product, which turns every group into a tuple first
    if not parts:
        yield ""
        return
    head, rest = parts[0], parts[1:]
    for choice in [head] if isinstance(head, str) else head:
        for tail in _names(rest):
            yield choice + tail


def expand_braces(pattern: str) -> list[str]:
    """All names of :func:`iter_braces` as a list."""
    return list(iter_braces(pattern))


def shard_paths(pattern: str | os.PathLike) -> list[Path]:
    """The shard files a pattern names: a tar file, a folder (its top-level ``*.tar``, sorted), a glob
    (sorted) or a brace pattern (in expansion order; each expanded name may itself be a glob)."""
    text = os.fspath(pattern)
    path = Path(text)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".tar"))
        if not shards:
            raise DataError(f"no .tar shards in folder {path} ({EXPECTED_SPEC})")
        return shards
    if path.is_file():
        return [path]
    shards: list[Path] = []
    for name in iter_braces(text):  # lazily: a missing shard stops it early
        if GLOB_CHARS.search(name):
            matches = sorted(glob.glob(name))
            if not matches:
                raise DataError(f"no files match {name!r} (from data pattern {text!r})")
            shards.extend(Path(m) for m in matches)
        elif Path(name).is_file():
            shards.append(Path(name))
        elif name == text:
            raise DataError(f"data path not found: {text} ({EXPECTED_SPEC})")
        else:
            raise DataError(f"tar shard not found: {name} (from data pattern {text!r})")
    images = [shard for shard in shards if shard.name.lower().endswith(IMAGE_EXTENSIONS)]
    if images:  # photos/*.jpg: the user means the images, which a pattern does not name
        raise DataError(f"data pattern {text!r} matches image files ({images[0]} and {len(images) - 1} more): a glob or "
                        "brace pattern names tar shards; give the folder that holds the images")
    return shards


class TarSample(NamedTuple):
    """One indexed sample of a tar shard: where its image and caption bytes lie, and its label."""

    shard: int
    key: str
    image_offset: int
    image_size: int
    text_offset: int  # -1: no caption
    text_size: int
    label: int


def _split_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset convention: the key is the path up to the first dot of the file name, the extension
    is the rest (lower-cased). Hidden files (macOS ``._x.jpg``) and names without a dot are not samples."""
    if name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


_TAR_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


class ShardIndex(NamedTuple):
    """What indexing one shard finds: its samples in member order, and what it skipped."""

    samples: list[TarSample]
    num_missing_image: int
    num_sparse: int


def _end_is_cut(path: Path, end: int, file_size: int) -> str:
    """Why the archive ends early (``""`` when it does not): a complete tar ends with zero blocks after its last
    member (``end``: where the next header would start). Python's tarfile stops without a word at a header cut
    short or at garbage after offset 0, so a shard cut inside a header read as complete."""
    if end + 512 > file_size:
        return "no end-of-archive block after the last member"
    with open(path, "rb") as raw:
        raw.seek(end)
        if raw.read(512).count(0) != 512:
            return f"an unreadable header at byte {end}"
    return ""


def index_shard(path: Path, shard: int) -> ShardIndex:
    """Index one uncompressed tar shard: the image/caption/label members of every key with an image, in
    member order, reading only the tar headers (and the small ``.cls`` members). Keys without an image and
    sparse members are skipped and logged; a shard cut short keeps the keys before the cut."""
    file_size = path.stat().st_size
    members: dict[str, dict[str, tuple[int, int]]] = {}  # key -> extension -> (offset, size)
    num_sparse = num_missing = num_duplicates = 0
    cut_key: str | None = None
    samples: list[TarSample] = []
    try:
        archive = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as error:
        raise DataError(
            f"cannot read tar shard {path}: {error} (expected an uncompressed .tar in WebDataset layout)"
        ) from None
    with archive:
        try:
            for member in archive:
                if not member.isfile():
                    continue
                if member.issparse():
                    # its bytes in the archive are only the data blocks of a file with holes; the
                    # member is skipped rather than reassembled (its real size may be anything)
                    num_sparse += 1
                    logger.warning("tar shard %s: member %s is a sparse file (GNU/PAX sparse format); skipped",
                                   path, member.name)
                    continue
                parts = _split_member_name(member.name)
                if member.offset_data + member.size > file_size:
                    cut_key = parts[0] if parts is not None else None  # the key this member belongs to
                    raise tarfile.ReadError(f"member {member.name} ends past the end of the file")
                if parts is not None:
                    if parts[1] in members.get(parts[0], {}):
                        num_duplicates += 1
                        if num_duplicates == 1:
                            logger.warning("tar shard %s: member %s appears twice; the later one is read (each "
                                           "repeat is counted, this is said once)", path, member.name)
                    members.setdefault(parts[0], {})[parts[1]] = (member.offset_data, member.size)
            cut = _end_is_cut(path, archive.offset, file_size)
        except tarfile.ReadError as error:
            cut = str(error)
        if cut:
            # a shard cut short by an interrupted download: keep the keys before the cut. The key at the cut may
            # have lost members to it (its caption or label), so it goes too: the cut member's own key, or, for a
            # cut in a header, the last key read.
            cut_key = cut_key if cut_key is not None else next(reversed(members), None)
            lost = members.pop(cut_key, None) is not None
            # once per shard and process: the online k-NN, the workers and each epoch index it again
            warn_once(logger, ("truncated shard", str(path), file_size), "tar shard %s is truncated (%s); indexing "
                      "the %d keys before it%s", path, cut, len(members),
                      f" (key {cut_key}, at the cut, is left out)" if lost else "")
    if num_duplicates > 1:
        warn_once(logger, ("repeated members", str(path), file_size), "tar shard %s: %d members repeat an earlier "
                  "one of the same key and extension; the later of each is read", path, num_duplicates)
    with open(path, "rb") as raw:
        for key, parts in members.items():
            image = next((parts[e] for e in _TAR_IMAGE_EXTENSIONS if e in parts), None)
            if image is None:
                num_missing += 1
                names = [f"{key}.{e}" for e in parts]
                shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                dotted = any(e.rpartition(".")[2] in _TAR_IMAGE_EXTENSIONS for e in parts)
                hint = (f"; the key is the name up to its first dot, so names with more dots (img.000.jpg) share "
                        f"key {key}: rename them without inner dots (img_000.jpg)") if dotted else ""
                logger.warning("tar shard %s: key %s has no image (members: %s); skipped%s", path, key, shown, hint)
                continue
            label = -1
            if "cls" in parts:
                offset, size = parts["cls"]
                raw.seek(offset)
                text = raw.read(size).decode("utf-8", errors="replace").strip()
                if not text.isdigit():
                    raise DataError(f"tar shard {path}: {key}.cls holds {text!r}, expected an integer label >= 0")
                label = int(text)
            text_offset, text_size = parts.get("txt", (-1, 0))
            samples.append(TarSample(shard, key, image[0], image[1], text_offset, text_size, label))
    return ShardIndex(samples, num_missing, num_sparse)


class ShardFiles:
    """Read byte ranges of shard files through a small per-process cache of open handles.

    Handles are opened lazily and per process (a forked DataLoader worker reopens its own, so workers never
    share a file offset) and dropped when pickled (spawned workers)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths
        self._handles: OrderedDict[int, BinaryIO] = OrderedDict()
        self._handles_pid = os.getpid()

    def _file(self, shard: int) -> BinaryIO:
        if self._handles_pid != os.getpid():  # forked: the parent's handles share its file offsets
            self._handles = OrderedDict()
            self._handles_pid = os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = open(self.paths[shard], "rb")
            self._handles[shard] = handle
            if len(self._handles) > _MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(shard)
        return handle

    def read(self, shard: int, offset: int, size: int) -> bytes:
        handle = self._file(shard)
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise OSError(f"short read in {self.paths[shard]} at offset {offset}: the shard changed since indexing")
        return data

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # open files cannot be pickled (spawned DataLoader workers)
        state["_handles"] = OrderedDict()
        return state


def sample_annotations(sample: TarSample, files: ShardFiles) -> dict[str, Any]:
    """``make_sample`` keyword arguments of an indexed tar sample: its label and its ``.txt`` caption."""
    captions = []
    if sample.text_offset >= 0:
        text = files.read(sample.shard, sample.text_offset, sample.text_size)
        captions.append(text.decode("utf-8", errors="replace").strip())
    labels = [sample.label] if sample.label >= 0 else []
    return {"label": sample.label, "labels": labels, "captions": captions}


class TarShards(FileSource):
    """WebDataset tar shards as img2dataset writes them: ``key.jpg`` (or png, webp, ...), ``key.txt``
    (caption), ``key.json`` (metadata, not read), optional ``key.cls`` (integer label).

    ``pattern``: a tar file, a folder of ``*.tar``, a glob or a brace pattern ``data/{00000..00009}.tar``.
    Every shard is indexed once at construction (member offsets from ``tarfile``); samples are then read
    by seeking into the shard. Shards must be uncompressed. Keys without an image (for instance a
    failed download that kept its .txt/.json) are skipped, counted in ``num_missing_image`` and logged;
    so are sparse members (GNU or PAX sparse format, ``num_sparse``), whose other members stay.
    File handles are opened lazily and per process, so DataLoader workers never share a file offset.
    """

    def __init__(self, pattern: str | os.PathLike, load_size: int = DEFAULT_LOAD_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(load_size, max_pixels)
        self.pattern = os.fspath(pattern)
        self.shards = shard_paths(pattern)
        self.samples: list[TarSample] = []
        self.num_missing_image = 0
        self.num_sparse = 0
        for shard in range(len(self.shards)):
            self._index_shard(shard)
        if not self.samples:
            raise DataError(f"no images in tar shards {self.pattern} ({len(self.shards)} shards, no key with an image)")
        self.files = ShardFiles(self.shards)

    def _index_shard(self, shard: int) -> None:
        index = index_shard(self.shards[shard], shard)
        self.samples.extend(index.samples)
        self.num_missing_image += index.num_missing_image
        self.num_sparse += index.num_sparse

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        return self.files.read(shard, offset, size)

    def close(self) -> None:
        """Close this process's shard file handles (reopened on the next read)."""
        self.files.close()

    def __len__(self) -> int:
        return len(self.samples)

    def class_labels(self) -> list[int]:
        return [sample.label for sample in self.samples]

    def captioned_count(self) -> int:
        return sum(1 for sample in self.samples if sample.text_offset >= 0)

    def _open(self, index: int) -> BinaryIO:
        sample = self.samples[index]
        return io.BytesIO(self._read(sample.shard, sample.image_offset, sample.image_size))

    def _name(self, index: int) -> str:
        sample = self.samples[index]
        return f"{self.shards[sample.shard]}:{sample.key}"

    def _annotations(self, index: int, width: int, height: int) -> dict[str, Any]:
        return sample_annotations(self.samples[index], self.files)

    def describe(self) -> str:
        missing = f", {self.num_missing_image} keys without image skipped" if self.num_missing_image else ""
        sparse = f", {self.num_sparse} sparse members skipped" if self.num_sparse else ""
        return f"tar shards {self.pattern}: {len(self)} samples in {len(self.shards)} shards{missing}{sparse}"
