"""Hostile and odd input files: bounded memory, right pixel values, one-line errors (issue 7, section 4).

Every file is made here, small on disk: a 12000x12000 PNG of one colour, 16-bit and float images, GNU
and PAX sparse tar members, a non-UTF-8 manifest, a huge brace range, a huge integer label.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import resource
import struct
import tarfile
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

import wildssl.eval.evaluate as evaluate_module
from conftest import tiny_ab_overrides, tiny_overrides
from wildssl.data import open_source
from wildssl.data.decode import DEFAULT_MAX_PIXELS, decode_image
from wildssl.data.folder import ImageFolder
from wildssl.data.manifest import JsonlManifest
from wildssl.data.shards import TarShards
from wildssl.errors import DataError
from wildssl.eval.knn import knn_accuracy
from wildssl.models.loading import CHECKPOINT_NAME
from wildssl.train.config import DEFAULTS, build_config
from wildssl.train.engine import train

S = 16


# -- large images -------------------------------------------------------------------------------------

def write_blank_png(path: Path, width: int, height: int, rows_per_block: int = 100) -> None:
    """An all-black RGB PNG written without holding its pixels: after a full flush, deflate restarts
    with an empty history, so every further block of identical rows compresses to identical bytes."""
    block = (b"\x00" + bytes(3 * width)) * rows_per_block  # filter byte 0, then the row
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)  # with the zlib header
    repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(height // rows_per_block):
        checksum = zlib.adler32(block, checksum)
    final_empty_block = b"\x03\x00"
    stream = first + repeated * (height // rows_per_block - 1) + final_empty_block + struct.pack(">I", checksum)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b""))


def read_in_fresh_child(source, index: int) -> dict:
    """``source[index]`` in a forked child, with what it cost and said: the growth of its peak RSS (a
    forked child's peak starts at its current RSS, whatever the parent's peak was), the Python warnings
    and the ``wildssl.data`` log lines."""
    def child(connection):
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("wildssl.data").addHandler(handler)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample = source[index]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        connection.send({"index": sample["index"], "corrupt": sample["corrupt"], "growth_mib": (after - before) / 1024,
                         "warnings": [w.category.__name__ for w in caught], "log": records})

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=child, args=(sender,))
    process.start()
    result = receiver.recv() if receiver.poll(120) else None
    process.join(10)
    if process.is_alive():  # blocked for good (a read that never returns): the test fails instead of hanging
        process.kill()
        process.join()
    assert result is not None, f"the child reading item {index} died (exit code {process.exitcode})"
    return result


def test_large_canvas_png_is_skipped_before_decoding_with_bounded_memory_and_no_raw_warning(tmp_path):
    write_blank_png(tmp_path / "a_canvas.png", 12000, 12000)  # 144 megapixels, about 0.4 MB on disk
    assert (tmp_path / "a_canvas.png").stat().st_size < 1_000_000
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "b_small.png")
    result = read_in_fresh_child(ImageFolder(tmp_path, 32), 0)
    assert result["index"] == 1 and result["corrupt"] == [0]  # skipped, counted, the next image returned
    # decoding the canvas would hold 144e6 * 4 bytes (Pillow's RGB) = 549 MiB
    assert result["growth_mib"] < 64, f"peak RSS grew by {result['growth_mib']:.0f} MiB reading a skipped image"
    assert result["warnings"] == []  # Pillow's DecompressionBombWarning (above 89 megapixels) stays silent
    assert len(result["log"]) == 1 and "a_canvas.png" in result["log"][0] and "max_pixels" in result["log"][0]


def test_pixel_cap_counts_decoded_pixels_so_a_large_jpeg_is_read_at_reduced_scale(tmp_path):
    pixels = np.zeros((1024, 1024, 3), dtype=np.uint8)
    pixels[:, :512] = (230, 20, 20)
    pixels[:, 512:] = (20, 20, 230)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "b.png")
    source = ImageFolder(tmp_path, S, max_pixels=200_000)  # 1024^2 = 1.05 megapixels per file
    jpeg = source[0]  # DCT-scaled to 128x128 = 16384 pixels: under the cap
    assert jpeg["index"] == 0 and jpeg["corrupt"] == [] and jpeg["aspect"] == 1.0
    image = jpeg["image"].numpy().astype(int)
    assert (image[0, :, : S // 2 - 1] > 200).all() and (image[2, :, S // 2 + 1 :] > 200).all()
    png = source[1]  # no reduced decoding for PNG: 1.05 megapixels is above the cap
    assert png["index"] == 0 and png["corrupt"] == [1]
    assert DEFAULTS["data"]["max_pixels"] == DEFAULT_MAX_PIXELS


# -- high bit depth -----------------------------------------------------------------------------------

def write_pgm16(path: Path, values: np.ndarray) -> None:
    height, width = values.shape
    path.write_bytes(b"P5\n%d %d\n65535\n" % (width, height) + values.astype(">u2").tobytes())


@pytest.mark.parametrize("suffix", ["png", "tif", "pgm"])
def test_sixteen_bit_grayscale_scales_by_the_16_bit_range(tmp_path, suffix):
    values = np.linspace(0, 65535, S * S).round().astype(np.uint16).reshape(S, S)
    path = tmp_path / f"deep.{suffix}"
    if suffix == "pgm":
        write_pgm16(path, values)  # Pillow opens it as mode I (int32)
    else:
        Image.fromarray(values).save(path)  # mode I;16
    image = decode_image(path, S)[0].numpy()
    expected = np.rint(values.astype(np.float64) * 255 / 65535)
    for channel in image:
        np.testing.assert_array_equal(channel, expected)
    assert (image == 255).mean() < 0.01  # a plain 8-bit conversion clips ~99% of these pixels at 255


def test_float_tiff_maps_zero_one_to_0_255_with_clipping_and_nan_as_black(tmp_path):
    values = np.linspace(-0.25, 1.25, S * S, dtype=np.float32).reshape(S, S)
    values[0, 0] = np.nan
    Image.fromarray(values).save(tmp_path / "float.tif")  # mode F
    image = ImageFolder(tmp_path, S)[0]["image"].numpy()
    expected = np.rint(np.clip(np.nan_to_num(values.astype(np.float64), nan=0.0), 0, 1) * 255)
    for channel in image:
        np.testing.assert_array_equal(channel, expected)
    assert len(np.unique(image)) > 150  # a gradient (a plain conversion gives only 0 and 1)


# -- corrupt counts -----------------------------------------------------------------------------------

def test_training_counts_each_unreadable_file_once_across_epochs_and_resume(tmp_path):
    folder = tmp_path / "images"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(7):
            pixels = np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    (folder / "a" / "7.png").write_bytes(b"not an image")  # index 7; requesting it skips 8 too
    (folder / "a" / "8.png").write_bytes(b"")  # index 8
    Image.new("RGB", (40, 40)).save(folder / "b" / "9_large.png")  # index 16; 1600 pixels: above the cap
    overrides = tiny_overrides("simclr", f"data.train={folder}", "train.batch_size=8", "data.max_pixels=1000")
    # 17 items, 2 steps per epoch (16 images each): 4 steps make 8 skip events over the 3 unreadable files
    first = train(build_config("simclr_quick", overrides + ["train.steps=4"]), tmp_path / "run")
    assert first["corrupt_images"] == 3
    # the one step after the resume meets only some of them: the rest come from the checkpoint
    resumed = train(build_config("simclr_quick", overrides + ["train.steps=5"]), tmp_path / "run", resume=True)
    assert resumed["start_step"] == 4 and resumed["corrupt_images"] == 3
    with safe_open(tmp_path / "run" / CHECKPOINT_NAME, "pt") as checkpoint:
        extra = json.loads(checkpoint.metadata()["extra"])
    assert extra["corrupt_files"] == {"train": [7, 8, 16]} and extra["corrupt_images"] == 3


# -- manifests ----------------------------------------------------------------------------------------

def test_non_utf8_manifest_is_one_line_error_naming_file_and_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = tmp_path / "latin1.jsonl"
    manifest.write_bytes(b'{"path": "a.png", "caption": "plain"}\n{"path": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(DataError) as error:
        open_source(str(manifest))
    message = str(error.value)
    assert f"{manifest}:2:" in message and "0xe9" in message and "UTF-8" in message and "\n" not in message


def test_manifest_with_a_byte_order_mark_reads_its_first_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = tmp_path / "bom.jsonl"
    manifest.write_bytes(b'\xef\xbb\xbf{"path": "a.png", "caption": "caf\xc3\xa9"}\n')
    assert JsonlManifest(manifest, S)[0]["caption"] == "caf\u00e9"


# -- sparse tar members -------------------------------------------------------------------------------

def png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def gnu_sparse_member(name: str, data: bytes, real_size: int) -> bytes:
    """A GNU 'S' member (tarfile reads but cannot write them): one data region at offset 0 of a file of
    ``real_size`` bytes, the rest a hole. Header layout: GNU tar's ``struct oldgnu_header``."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[156:157] = b"S"
    header[386:398] = b"%011o\0" % 0  # sparse[0].offset
    header[398:410] = b"%011o\0" % len(data)  # sparse[0].numbytes
    header[483:495] = b"%011o\0" % real_size  # realsize
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def tar_member(info: tarfile.TarInfo, data: bytes, tar_format: int) -> bytes:
    info.size, info.mtime = len(data), 0
    return info.tobuf(tar_format) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def sparse_member(kind: str, name: str, data: bytes, real_size: int) -> bytes:
    """A sparse member in GNU's old format or GNU's PAX formats 0.1 and 1.0 (what ``tar --sparse``
    writes with ``--format=gnu`` / ``--format=pax``)."""
    if kind == "gnu":
        return gnu_sparse_member(name, data, real_size)
    info = tarfile.TarInfo(name)
    if kind == "pax0.1":
        info.pax_headers = {"GNU.sparse.map": f"0,{len(data)}", "GNU.sparse.name": name,
                            "GNU.sparse.size": str(real_size)}
        return tar_member(info, data, tarfile.PAX_FORMAT)
    sparse_map = f"1\n0\n{len(data)}\n".encode()  # 1.0: the map leads the member's data
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(real_size)}
    return tar_member(info, sparse_map + bytes(-len(sparse_map) % tarfile.BLOCKSIZE) + data, tarfile.PAX_FORMAT)


def write_shard_with_sparse_member(path: Path, kind: str, real_size: int = 10_000_000) -> None:
    """Samples 00..19 (key.png + key.txt), with a sparse ``sparse.png`` member between 09 and 10."""
    members = []
    for i in range(20):
        if i == 10:
            members.append(sparse_member(kind, "sparse.png", png_bytes((255, 255, 0)), real_size))
        for name, data in ((f"{i:02d}.png", png_bytes((10 * i, 0, 0))), (f"{i:02d}.txt", f"caption {i}".encode())):
            members.append(tar_member(tarfile.TarInfo(name), data, tarfile.GNU_FORMAT))
    path.write_bytes(b"".join(members) + bytes(2 * tarfile.BLOCKSIZE))  # two zero blocks end an archive


@pytest.mark.parametrize("kind", ["gnu", "pax0.1", "pax1.0"])
def test_sparse_tar_member_is_skipped_with_one_line_and_every_other_sample_kept(tmp_path, caplog, kind):
    shard = tmp_path / "shard.tar"
    write_shard_with_sparse_member(shard, kind)
    with tarfile.open(shard) as archive:  # the shard really holds a sparse member of that kind
        assert [m.name for m in archive.getmembers() if m.issparse()] == ["sparse.png"]
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        source = TarShards(shard, S)
    assert [s.key for s in source.samples] == [f"{i:02d}" for i in range(20)] and source.num_sparse == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "wildssl.data"]
    assert len(warnings) == 1 and "sparse.png" in warnings[0] and "sparse" in warnings[0]
    after = source[15]
    assert after["index"] == 15 and after["caption"] == "caption 15" and after["corrupt"] == []
    assert (after["image"][0] == 150).all() and (after["image"][1:] == 0).all()


# -- brace ranges -------------------------------------------------------------------------------------

def test_brace_range_beyond_the_shard_name_bound_is_one_line_error_before_expanding(tmp_path):
    write_shard_with_sparse_member(tmp_path / "0.tar", "pax0.1")
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as error:
            open_source(str(tmp_path / "{0..1999999}.tar"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(error.value)
    assert "2,000,000 shards" in message and "1,000,000" in message and "\n" not in message
    assert peak < 1_000_000


def test_brace_pattern_is_expanded_lazily_and_stops_at_the_first_missing_shard(tmp_path):
    for i in range(2):
        write_shard_with_sparse_member(tmp_path / f"{i}.tar", "pax0.1")
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"tar shard not found: .*2\.tar"):
            open_source(str(tmp_path / "{0..999999}.tar"))  # a million names, two shards on disk
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # the names eagerly would take tens of MB


# -- k-NN labels --------------------------------------------------------------------------------------

class MeanColour(nn.Module):
    def forward(self, x):
        return {"cls": x.mean(dim=(2, 3))}


def test_knn_with_a_huge_integer_label_votes_over_the_classes_present(tmp_path, monkeypatch):
    colours = {0: (240, 10, 10), 100_000_000: (10, 10, 240)}
    for split, count in (("train", 3), ("test", 2)):
        lines = []
        for label, colour in colours.items():
            for i in range(count):
                name = f"{split}_{label}_{i}.png"
                Image.new("RGB", (8, 8), tuple(c + 3 * i for c in colour)).save(tmp_path / name)
                lines.append(json.dumps({"path": name, "label": label}))
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    seen = []
    real_knn_accuracy = evaluate_module.knn_accuracy

    def recording_knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, **kwargs):
        seen.append((num_classes, sorted(set(train_labels.tolist()) | set(test_labels.tolist()))))
        assert num_classes <= 2, f"{num_classes} vote columns for 2 classes"
        return real_knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, **kwargs)

    monkeypatch.setattr(evaluate_module, "knn_accuracy", recording_knn_accuracy)
    result = evaluate_module.evaluate_knn(MeanColour(), str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl"),
                                          image_size=8, k=3)
    assert seen == [(2, [0, 1])] and result == {"knn_top1": 1.0}


def test_knn_accuracy_refuses_an_oversized_label_space_in_one_line():
    generator = torch.Generator().manual_seed(0)
    train_features, labels = torch.randn(30, 6, generator=generator), torch.randint(0, 6, (30,), generator=generator)
    test_features = torch.randn(10, 6, generator=generator)
    test_labels = torch.randint(0, 6, (10,), generator=generator)
    with pytest.raises(DataError, match=r"1,000,000,000 classes") as error:
        knn_accuracy(train_features, labels, test_features, test_labels, num_classes=10**9)
    assert "\n" not in str(error.value)
    # a large allowed label space runs in smaller chunks (8 test rows of 2^21 votes) with the same result
    small = knn_accuracy(train_features, labels, test_features, test_labels, num_classes=6, k=30, chunk_size=1024)
    large = knn_accuracy(train_features, labels, test_features, test_labels, num_classes=2**21, k=30, chunk_size=1024)
    assert small == large and set(small) == {"top1", "top5"}


def _noise_folder(root: Path, unreadable: dict[str, int], drop: bool) -> Path:
    """Class folders a_red / b_blue of 10 noise PNGs each (a colour cast per class); the first ``unreadable[c]``
    files of class c are emptied to 0 bytes, or left out with ``drop``."""
    generator = np.random.default_rng(0)
    for name, channel in (("a_red", 0), ("b_blue", 2)):
        (root / name).mkdir(parents=True)
        for i in range(10):
            pixels = generator.integers(0, 160, (16, 16, 3), dtype=np.uint8)
            pixels[..., channel] += 90
            path = root / name / f"{i:02d}.png"
            if i < unreadable.get(name, 0):
                if not drop:
                    path.write_bytes(b"")
                continue
            Image.fromarray(pixels).save(path)
    return root


def test_evaluation_leaves_an_unreadable_image_out_instead_of_counting_its_neighbour_again(tmp_path):
    """A file-backed source answers an unreadable item with the next readable one (training keeps its batch size).
    The k-NN and the probes' feature sets used to keep those copies: 6 empty files of a_red became 7 copies of its
    seventh image, and the figure differed from the folder without those files. Now each image counts once."""
    from wildssl.eval.evaluate import evaluate_knn
    from wildssl.eval.features import extract_feature_set
    from wildssl.models.vit import VisionTransformer

    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    damaged = _noise_folder(tmp_path / "damaged", {"a_red": 6, "b_blue": 1}, drop=False)
    cleaned = _noise_folder(tmp_path / "cleaned", {"a_red": 6, "b_blue": 1}, drop=True)
    test = _noise_folder(tmp_path / "test", {}, drop=False)
    figures = [evaluate_knn(encoder, str(memory), str(test), image_size=16, k=5, batch_size=4)
               for memory in (damaged, cleaned)]
    assert figures[0] == figures[1]
    # a pathlib.Path is a spec too (it ended in "object of type 'PosixPath' has no len()")
    assert evaluate_knn(encoder, cleaned, test, image_size=16, k=5, batch_size=4) == figures[1]
    features = extract_feature_set(encoder, open_source(str(damaged), 16), "cpu", 16, with_patch=False, batch_size=4)
    assert len(features) == 13 and sorted(features.indices.tolist()) == sorted(set(features.indices.tolist()))
    assert (features.labels == 0).sum() == 4 and (features.labels == 1).sum() == 9


# -- what a folder holds besides images (helper-30's hunt, 2026-12-04) ----------------------------------

def _classes(root: Path, names=("birds", "cats", "dogs"), count=2) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(root / name / f"{i}.png")


@pytest.mark.parametrize("holder", ["cats", "dogs", "aardvarks"])
def test_a_link_to_another_class_folder_does_not_take_that_class(tmp_path, holder):
    """``cats/also_birds -> ../birds`` made the bird images cats (and the birds class vanished) when the file system
    listed cats/ before birds/: the folders were deduplicated in os.walk's unsorted order."""
    _classes(tmp_path, ("birds", "cats", "dogs", "aardvarks"))
    (tmp_path / holder / "also_birds").symlink_to("../birds")
    source = ImageFolder(tmp_path, S)
    assert source.classes == ["aardvarks", "birds", "cats", "dogs"]
    assert sorted(source.labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert not any("also_birds" in path for path in source.paths)


def test_a_linked_folder_outside_the_root_is_read_once_under_its_link(tmp_path):
    _classes(tmp_path / "elsewhere", ("birds",))
    _classes(tmp_path / "root", ("cats",))
    (tmp_path / "root" / "birds").symlink_to(tmp_path / "elsewhere" / "birds")
    (tmp_path / "root" / "cats" / "loop").symlink_to("..")  # a loop: read once
    source = ImageFolder(tmp_path / "root", S)
    assert source.classes == ["birds", "cats"] and source.paths == ["birds/0.png", "birds/1.png", "cats/0.png",
                                                                    "cats/1.png"]


def test_a_folder_that_cannot_be_read_is_named_not_dropped_silently(tmp_path, monkeypatch, caplog):
    """A chmod-000 class folder vanished with its class and no word (os.walk's errors were ignored). Simulated by the
    system's refusal: the tests run as root, which reads through permissions."""
    import os

    _classes(tmp_path, ("a", "b", "c"))
    real_scandir = os.scandir

    def refusing_scandir(path="."):
        if Path(path).name == "c":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        source = ImageFolder(tmp_path, S)
    assert source.classes == ["a", "b"]
    assert any(f"cannot read {tmp_path / 'c'} (Permission denied), so its images are left out" in r.getMessage()
               for r in caplog.records), caplog.text


def test_a_named_pipe_with_an_image_name_is_skipped_not_waited_on_forever(tmp_path):
    """``mkfifo a/stuck.png``: Pillow's open() of the pipe blocked the run forever, with no output."""
    import os

    _classes(tmp_path, ("a", "b"))
    os.mkfifo(tmp_path / "a" / "2_stuck.png")
    source = ImageFolder(tmp_path, S)
    assert source.paths[2] == "a/2_stuck.png"
    result = read_in_fresh_child(source, 2)  # in a child: on the former code the read never returned
    assert result["index"] == 3 and result["corrupt"] == [2]
    assert "not a regular file" in result["log"][0]


def test_photos_of_kinds_not_read_are_named_and_jpe_is_read(tmp_path, caplog):
    _classes(tmp_path, ("a", "b"))
    for name in ("x.heic", "y.HEIC", "z.avif"):
        (tmp_path / "a" / name).write_bytes(b"")
    (tmp_path / "b" / "notes.txt").write_text("not a photo")
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "w.jpe", format="JPEG")
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        source = ImageFolder(tmp_path, S)
    assert "b/w.jpe" in source.paths and len(source) == 5
    said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(said) == 1 and "3 photos of kinds wildssl does not read are left out (.heic x2, .avif x1)" in said[0]


def test_pillows_bomb_limit_no_longer_overrides_the_pixel_cap(tmp_path, monkeypatch):
    """Images above Pillow's limit (2 x MAX_IMAGE_PIXELS, 179 megapixels) were refused at open: a JPEG it would have
    read at 1/8 scale, and any image under a data.max_pixels set above that limit. The cap alone decides now, and
    Pillow's own setting is left as it was. (Pillow's limit is lowered here, so that small files stand for huge ones.)"""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # refused above 2000 pixels at open
    Image.new("RGB", (256, 256), (200, 30, 30)).save(tmp_path / "a.jpg")  # 65,536 pixels; 1/8 scale: 32 x 32
    Image.new("RGB", (64, 64), (30, 30, 200)).save(tmp_path / "b.png")  # 4,096 pixels
    image, width, height = decode_image(tmp_path / "a.jpg", 32, max_pixels=2000)
    assert (width, height) == (256, 256) and image[0].float().mean() > 150
    image, width, height = decode_image(tmp_path / "b.png", 32, max_pixels=10_000)
    assert (width, height) == (64, 64) and image[2].float().mean() > 150
    with pytest.raises(Exception, match="above data.max_pixels=4000"):  # the cap still refuses what it should
        decode_image(tmp_path / "b.png", 32, max_pixels=4000)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_manifest_label_above_the_id_range_and_backslash_paths_are_one_line_errors(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"path": "a.png", "label": 10**30}) + "\n")  # a hash id: int64 overflowed in collate
    with pytest.raises(DataError, match=r"big.jsonl:1: \"label\" must be a class name or an integer id in "
                                        r"\[0, 2147483647\] \(give a larger id as a string\)"):
        JsonlManifest(big)
    windows = tmp_path / "windows.jsonl"
    windows.write_text(json.dumps({"path": "imgs\\a.png", "label": 0}) + "\n")
    with pytest.raises(DataError, match=r"backslashes .* write them with forward slashes"):
        JsonlManifest(windows)


def test_labelled_records_that_repeat_an_image_are_warned_about(tmp_path, caplog):
    """24 noise images listed 4 times each read 100% on a k-NN at random initialization (each found itself)."""
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    lines = [{"path": f"{i % 3}.png", "label": i % 2} for i in range(5)]
    captions = [{"path": "0.png", "caption": "one of several captions of one image"}] * 3
    (tmp_path / "labelled.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in captions))
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        JsonlManifest(tmp_path / "captions.jsonl")
        assert not caplog.records  # an image per caption is how caption sets come
        JsonlManifest(tmp_path / "labelled.jsonl")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "2 labelled records name an image an earlier one named (e.g. " in said[0]


def test_an_ab_run_on_its_own_images_counts_each_unreadable_file_once_and_raises_a_data_alarm(tmp_path):
    """ab_simclr bootstrapping on its training folder reported 6 unreadable images for 3 files (once per stream); a
    folder with most images unreadable trained without an alarm, drawing the few readable ones over and over."""
    folder = tmp_path / "images"
    _classes(folder, ("a", "b"), count=3)
    for i in range(3):
        (folder / "a" / f"bad{i}.png").write_bytes(b"not an image")
    overrides = tiny_ab_overrides("simclr", f"data.annotation={folder}", f"data.bootstrap={folder}",
                                  "train.batch_size=8", "train.steps=3", "train.log_every=1")
    summary = train(build_config(None, overrides), tmp_path / "run")
    assert summary["corrupt_images"] == 3
    # their names are kept in the run folder (the checkpoint holds indices, and the log may be gone)
    listed = (tmp_path / "run" / "unreadable_files.txt").read_text().splitlines()
    assert {line.split("\t")[1] for line in listed} == {str(folder / "a" / f"bad{i}.png") for i in range(3)}
    assert {line.split("\t")[0] for line in listed} <= {"data.annotation", "data.bootstrap"}
    alarms = [a for a in summary["alarms"] if a.startswith("data alarm")]
    assert alarms and "of the 9 images of data.annotation are unreadable" in alarms[0], summary["alarms"]


def test_a_tar_members_unreadable_message_names_no_python_object(caplog):
    from wildssl.data.decode import warn_unreadable

    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        try:
            Image.open(io.BytesIO(b"junk"))
        except Exception as error:  # Pillow's UnidentifiedImageError names the BytesIO object
            warn_unreadable("shard.tar:key.jpg\nsecond line", error)
    message = caplog.records[-1].getMessage()
    assert "BytesIO" not in message and "\n" not in message and "key.jpg\\nsecond line" in message
