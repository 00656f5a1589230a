"""``data.decode: gpu``: the workers read JPEG bytes, the training process decodes them on the device.

No GPU here: the device decoder (``gpu_decode.decode_jpegs``, nvJPEG through torchvision) is replaced by a
Pillow decoder on the CPU that fails the whole list when one file fails, as decode_jpeg does. With it, the
loader path (bytes in the workers, decode in the training process) must give the CPU path's batches
pixel for pixel on images already at the load size (both resizes are then the identity), and count the
same unreadable files.
"""

import io
import sys
import types

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from safetensors.torch import load_file

from wildssl.data import decode, gpu_decode
from wildssl.data.decode import decode_image
from wildssl.errors import ConfigError
from wildssl.train.bench import measure_decode
from wildssl.train.engine import train
from wildssl.train.run import build_run, make_loaders
from wildssl.train.step import device_batches

SIZE = 16  # the tiny configs' data.load_size


def _smooth(height, width, seed):
    """A photo-like RGB image (H, W, 3) uint8: low-frequency colour waves, which JPEG keeps well."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [127.5 + 120 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform()))
                for _ in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def _jpeg(array, mode=None):
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _folder(root):
    """Two classes of 16x16 images, 12 files: RGB JPEGs, a grayscale and a CMYK JPEG, a PNG, and in sorted
    order three damaged JPEGs: x1 cut half-way through its scan (its header parses; it lacks its end
    marker), x2 with a broken Huffman table (its header parses, it ends well, no decoder can read it) and x3
    cut like x1 with its end marker appended (decoders read it, the missing rows grey). Returns the files."""
    files = {f"a/{i}.jpg": _jpeg(_smooth(SIZE, SIZE, i)) for i in range(4)}
    files.update({f"b/{i}.jpg": _jpeg(_smooth(SIZE, SIZE, i)) for i in range(4, 6)})
    files["a/gray.jpg"] = _jpeg(_smooth(SIZE, SIZE, 7), "L")
    files["a/cmyk.jpg"] = _jpeg(_smooth(SIZE, SIZE, 8), "CMYK")
    whole = _jpeg(_smooth(SIZE, SIZE, 9))
    scan = whole.index(b"\xff\xda")  # start of the entropy-coded data: cut half-way through it
    cut = whole[: scan + (len(whole) - scan) // 2]
    huffman = whole.index(b"\xff\xc4") + 5  # the 16 code-length counts of the first Huffman table
    files["b/x1_cut.jpg"], files["b/x3_cut_with_end.jpg"] = cut, cut + b"\xff\xd9"
    files["b/x2_bad_huffman.jpg"] = whole[:huffman] + b"\xff" * 16 + whole[huffman + 16:]
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    buffer = io.BytesIO()
    Image.fromarray(_smooth(SIZE, SIZE, 10)).save(buffer, "PNG")
    (root / "b/png.png").write_bytes(buffer.getvalue())
    return files


def _pillow_rgb(data: torch.Tensor) -> torch.Tensor:
    with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


@pytest.fixture
def fake_device(monkeypatch):
    """torchvision and CUDA present, as far as wildssl can tell; the JPEGs "decoded on the device" are
    decoded by Pillow, every list in one call that fails as a whole. Returns the bytes of every file given,
    and the number of files of each call in ``calls``."""
    given: list[bytes] = []
    calls: list[int] = []

    def decode(data, device):
        calls.append(len(data))
        given.extend(t.numpy().tobytes() for t in data)
        return [_pillow_rgb(t).to(device) for t in data]  # the first unreadable file fails the whole list

    decode.calls = calls

    monkeypatch.setattr(gpu_decode, "missing", lambda device: [])
    monkeypatch.setattr(gpu_decode, "decode_jpegs", decode)
    decode.given = given
    return decode


def _config(folder, decode, *extra):
    return tiny_config("simclr", f"data.train={folder}", "train.batch_size=4", f"data.decode={decode}", *extra)


def test_gpu_decode_without_torchvision_or_cuda_is_a_one_line_config_error_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    with pytest.raises(ConfigError) as error:
        build_run(tiny_config("simclr", "data.decode=gpu"), tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith("data.decode=gpu needs")
    assert "torchvision does not import" in message and "no CUDA device" in message and "data.decode=cpu" in message


def test_gpu_decode_names_only_what_is_missing_and_auto_stays_on_the_cpu_saying_so_once(monkeypatch, caplog):
    torchvision = types.ModuleType("torchvision")
    torchvision.__version__ = "0.24.0+cu126"
    torchvision.io = types.ModuleType("torchvision.io")
    torchvision.io.decode_jpeg = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.io", torchvision.io)
    cpu = torch.device("cpu")
    assert gpu_decode.missing(cpu) == [gpu_decode.missing(cpu)[0]] and "no CUDA device" in gpu_decode.missing(cpu)[0]
    with pytest.raises(ConfigError, match="no CUDA device") as error:
        gpu_decode.resolve_decode("gpu", cpu)
    assert "torchvision" not in str(error.value).split("but:")[1]  # torchvision is not what is missing
    assert gpu_decode.missing(torch.device("cuda", 0)) == []  # the device is all that decides here
    torchvision.__version__ = "0.18.1"  # decodes one JPEG per call: not enough
    assert ">= 0.19" in gpu_decode.missing(torch.device("cuda", 0))[0]

    monkeypatch.setattr(decode, "_warned", set())  # the process's once-only warnings (data.decode.warn_once)
    with caplog.at_level("WARNING", logger="wildssl.data"):
        assert gpu_decode.resolve_decode("auto", cpu) == "cpu"
        assert gpu_decode.resolve_decode("auto", cpu) == "cpu"
    said = [r.getMessage() for r in caplog.records if "data.decode=auto" in r.getMessage()]
    assert len(said) == 1 and "decoded on the CPU" in said[0] and "no CUDA device" in said[0]
    assert gpu_decode.resolve_decode("cpu", cpu) == "cpu"


def test_device_path_through_a_worker_gives_the_cpu_paths_batches_pixel_exact_and_counts_the_same_corrupt_files(
        tmp_path, fake_device, monkeypatch):
    monkeypatch.setattr(gpu_decode, "PIXELS_PER_CALL", 2 * SIZE * SIZE)  # 2 images per decode call at most
    files = _folder(tmp_path / "images")
    runs = {"cpu": build_run(_config(tmp_path / "images", "cpu", "train.steps=3"), tmp_path / "cpu"),
            "gpu": build_run(_config(tmp_path / "images", "gpu", "train.steps=3", "data.num_workers=1"),
                             tmp_path / "gpu")}
    assert not runs["cpu"].decoders and set(runs["gpu"].decoders) == {"train"}
    batches = {}
    for kind, run in runs.items():  # 3 steps of 4: every one of the 12 items is drawn once
        batches[kind] = [device_batches(run, step)["train"] for step in zip(*make_loaders(run, 0, 3).values())]
    corrupt = set()
    for cpu, gpu in zip(batches["cpu"], batches["gpu"], strict=True):
        assert "jpeg" not in gpu and gpu["image"].dtype == torch.uint8 and gpu["image"].shape == (4, 3, SIZE, SIZE)
        for key in ("image", "aspect", "label", "index"):
            assert torch.equal(cpu[key], gpu[key]), key
        assert cpu["corrupt"] == gpu["corrupt"] and cpu["num_corrupt"] == gpu["num_corrupt"]
        assert cpu["caption"] == gpu["caption"] and cpu["labels"] == gpu["labels"]
        corrupt.update(cpu["corrupt"])
    paths = runs["cpu"].sources["train"].paths
    assert {paths[i] for i in corrupt} == {"b/x1_cut.jpg", "b/x2_bad_huffman.jpg"}  # both paths skip both

    # what reached the "device": every JPEG with a whole header and an end marker (x2 is refused there, then
    # by Pillow on the CPU path, so it is skipped and counted); never the PNG, the CMYK JPEG or x1, which the
    # worker decoded (or skipped) itself
    named = {data: name for name, data in files.items()}
    assert {named[data] for data in fake_device.given} == set(files) - {"a/cmyk.jpg", "b/x1_cut.jpg"}
    assert max(fake_device.calls) == 2  # batches of 4 were decoded 2 images per call, rows kept in place
    decoder = runs["gpu"].decoders["train"]
    # 6 RGB, 1 grayscale JPEG and x3 decoded there, each drawn once; x2 refused when drawn and when x1 was
    assert decoder.decoded == 8 and decoder.refused == 2


def test_decode_calls_hold_at_most_the_pixel_budget_in_order_and_a_larger_image_alone(monkeypatch):
    monkeypatch.setattr(gpu_decode, "PIXELS_PER_CALL", 20)
    assert gpu_decode._calls([(0, 10), (1, 10), (3, 25), (4, 5), (6, 14), (7, 2)]) == [[0, 1], [3], [4, 6], [7]]
    assert gpu_decode._calls([]) == []


def test_device_resize_is_pillows_bilinear_within_one_level_and_close_to_the_cpu_paths_draft_decode(tmp_path):
    """The device path decodes at full size and resizes with PyTorch: equal to Pillow's BILINEAR resize of
    the same full-size image up to rounding, and near the CPU path, which decodes at a reduced DCT scale."""
    for height, width in ((40, 48), (96, 72), (12, 10)):  # reductions by 3 and 6 (draft halves), an enlargement
        path = tmp_path / f"{height}x{width}.jpg"
        path.write_bytes(_jpeg(_smooth(height, width, height)))
        full = _pillow_rgb(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))
        device = gpu_decode.resize_square(full[None], SIZE)[0].int()
        with Image.open(path) as image:
            pillow = torch.from_numpy(np.array(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)))
        assert (device - pillow.permute(2, 0, 1).int()).abs().max() <= 1
        cpu_path, _, _ = decode_image(path, SIZE)
        assert (device - cpu_path.int()).abs().float().mean() < 2.0


def test_training_with_device_decoding_ends_with_the_same_weights_and_corrupt_count_as_cpu_decoding(
        tmp_path, fake_device):
    _folder(tmp_path / "images")
    summaries, weights = {}, {}
    for kind in ("cpu", "gpu"):
        summaries[kind] = train(_config(tmp_path / "images", kind, "train.steps=3"), tmp_path / kind)
        weights[kind] = load_file(tmp_path / kind / "checkpoint.safetensors")
    assert summaries["gpu"]["steps"] == summaries["cpu"]["steps"] == 3
    assert summaries["gpu"]["corrupt_images"] == summaries["cpu"]["corrupt_images"] == 2
    assert fake_device.given  # the engine's loop decoded on the "device"
    assert weights["cpu"].keys() == weights["gpu"].keys()
    for name, tensor in weights["cpu"].items():
        assert torch.equal(tensor, weights["gpu"][name]), name


def test_bench_decode_figure_uses_the_device_decoder_when_selected(tmp_path, fake_device):
    _folder(tmp_path / "images")
    result = measure_decode(build_run(_config(tmp_path / "images", "gpu"), tmp_path / "run"), 12)
    assert result["decode_backend"] == "gpu" and len(fake_device.given) >= 8  # the JPEGs went to the device decoder
    assert result["decode_images_per_s"] > 0 and result["decode_images_per_cpu_s"] > 0
