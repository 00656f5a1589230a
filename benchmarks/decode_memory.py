"""Peak memory of decoding one large image, per image mode: what ``data.max_pixels`` bounds.

    python benchmarks/decode_memory.py [--width 6600 --height 6000] [--load-size 224] [--json OUT.json]

Writes one image per mode (gray, RGB, RGBA, palette, 16-bit, 32-bit integer, float) of the given size
into a temporary folder, plus a 12000x12000 PNG canvas above the default cap, then decodes each with
:func:`wildssl.data.decode.decode_image` in a forked process and reports the growth of that process's
peak RSS (``resource.getrusage``) and the time. The default size, 39.6 megapixels, is just under the
default cap (40 megapixels), the largest image a worker decodes. CPU only; one line of JSON per file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def measure(path: Path, load_size: int, connection) -> None:
    """Decode ``path`` in this (forked) process and send what it cost. A forked child's peak RSS starts
    at its current RSS; a process started with exec would inherit its parent's peak instead."""
    from wildssl.data.decode import ImageTooLarge, decode_image

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    try:
        decode_image(path, load_size)
        outcome = "decoded"
    except ImageTooLarge:
        outcome = "skipped (above data.max_pixels)"
    seconds = time.perf_counter() - start
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    connection.send({"outcome": outcome, "peak_rss_growth_mib": round(growth, 1), "seconds": round(seconds, 2)})


def write_files(folder: Path, width: int, height: int) -> dict[str, Path]:
    files = {
        "L": (np.full((height, width), 90, np.uint8), "gray.png", {}),
        "RGB": (np.full((height, width, 3), 90, np.uint8), "rgb.png", {}),
        "RGBA": (np.full((height, width, 4), 90, np.uint8), "rgba.png", {}),
        "I;16": (np.full((height, width), 30000, np.uint16), "gray16.png", {}),
        "I": (np.full((height, width), 30000, np.int32), "int32.tif", {"compression": "tiff_deflate"}),
        "F": (np.full((height, width), 0.5, np.float32), "float.tif", {"compression": "tiff_deflate"}),
    }
    paths = {}
    for mode, (pixels, name, options) in files.items():
        Image.fromarray(pixels).save(folder / name, **options)
        paths[mode] = folder / name
    palette = Image.new("P", (width, height), 0)
    palette.putpalette([90, 90, 90] * 256)
    palette.save(folder / "palette.png")
    paths["P"] = folder / "palette.png"
    canvas = Image.new("L", (12000, 12000), 0)  # written as L: 144 MB while writing, 0.1 MB on disk
    canvas.save(folder / "canvas.png", optimize=True)
    paths["canvas 12000x12000"] = folder / "canvas.png"
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=6600)
    parser.add_argument("--height", type=int, default=6000)
    parser.add_argument("--load-size", type=int, default=224)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    import wildssl.data.decode  # noqa: F401  imported once, before the children fork

    context = multiprocessing.get_context("fork")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for mode, path in write_files(Path(folder), args.width, args.height).items():
            receiver, sender = context.Pipe(duplex=False)
            child = context.Process(target=measure, args=(path, args.load_size, sender))
            child.start()
            figures = receiver.recv()
            child.join()
            width, height = (12000, 12000) if mode.startswith("canvas") else (args.width, args.height)
            result = {"mode": mode, "width": width, "height": height, **figures}
            result["bytes_per_pixel"] = round(result["peak_rss_growth_mib"] * 2**20 / (width * height), 1)
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
