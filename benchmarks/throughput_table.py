"""The figures of ``THROUGHPUT.md``: ``wildssl bench`` of every method on one set of 256-px JPEGs, the data
pipeline per core with and without draft decoding, and wildssl's encoder against a reference ViT.

Make the 256-px JPEGs once (the shared Flickr8k mini images and captions, shorter side scaled to 256):

    python benchmarks/throughput_table.py make-jpegs /work/shared/data/flickr8k_mini /tmp/jpeg256

CPU table (2 cores; one thread, one loader worker: ``data.num_workers=auto``):

    OMP_NUM_THREADS=1 python benchmarks/throughput_table.py table --jpegs /tmp/jpeg256 --json /tmp/throughput_cpu.json
    python benchmarks/throughput_table.py render /tmp/throughput_cpu.json    # the Markdown tables

GPU (owed; see README.md): the same with ``--scale small16 --device cuda`` (ViT-S/16, 2x224 + 10x96, bf16,
batch 128, 224-px crops from the 256-px JPEGs, ``--reference timm`` where timm imports).

Three parts, each measured in this one process:

- **methods**: :func:`wildssl.train.bench.bench` of each recipe (``<method>_quick`` on the CPU: a ViT of
  depth 4, width 128, 4 heads, patch 8, 32-px crops; ``data.load_size=64``), its data streams all reading
  the JPEGs: (a) pipeline, (b) bare backbone calls, (c) guarded step, (d) peak memory.
- **draft**: read + decode + resize of the JPEGs per CPU-second in this process, with Pillow's reduced-size
  decoding (``draft``, what :func:`wildssl.data.decode.decode_image` does) and without it (``draft``
  replaced by a no-op for the measurement), at several load sizes; and the whole pipeline of DINO (loader
  workers, transfer, views) per CPU-second both ways.
- **encoder**: forward + backward of wildssl's :class:`~wildssl.models.vit.VisionTransformer` against
  :class:`ReferenceViT` (plain PyTorch written here: pre-norm blocks with one qkv projection and
  ``scaled_dot_product_attention``, the same depth, width, heads and patch size), timed alternately so
  that the machine's load falls on both alike; the ratio is wildssl's images/s over the reference's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, JpegImagePlugin
from torch import nn

from wildssl.data.decode import decode_image
from wildssl.methods import get_method_class
from wildssl.models.loading import build_encoder_from_config
from wildssl.train.bench import bench, measure_decode, measure_pipeline
from wildssl.train.config import build_config
from wildssl.train.run import build_run
from wildssl.train.step import autocast_context

# method -> recipe of the CPU table; every stream reads the JPEG manifest
CPU_RECIPES = ("simclr_quick", "dino_quick", "clip_quick", "mae_quick", "ibot_quick", "ijepa_quick", "slip_quick",
               "silc_quick", "simsiam_quick", "slotmim_quick", "ab_simclr_quick", "ab_clip_quick", "ab_dino_quick")
CPU_SETS = ["data.load_size=64", "train.batch_size=64", "data.num_workers=auto", "train.precision=fp32"]
GPU_RECIPES = ("simclr", "dino", "clip", "mae", "ibot", "ijepa", "slip", "silc", "simsiam", "slotmim", "ab_simclr",
               "ab_clip", "ab_dino")
GPU_SETS = ["model.name=small", "train.batch_size=128", "data.num_workers=auto", "train.precision=bf16"]


# ----------------------------------------------------------------------------- the JPEGs

def make_jpegs(source: Path, out: Path, side: int = 256, quality: int = 90) -> int:
    """Every image of ``source/annotations.jsonl`` with its shorter side scaled to ``side`` (bicubic),
    saved as JPEG in ``out`` with a manifest ``out/annotations.jsonl`` holding the captions."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in (source / "annotations.jsonl").read_text().splitlines():
        entry = json.loads(line)
        with Image.open(source / entry["file"]) as image:
            scale = side / min(image.size)
            resized = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                                  Image.BICUBIC)
        name = Path(entry["file"]).name
        resized.save(out / name, quality=quality)
        lines.append(json.dumps({"file": name, "captions": entry.get("captions", [])}))
    (out / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)


# ----------------------------------------------------------------------------- reference ViT

class ReferenceBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + self.proj(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ReferenceViT(nn.Module):
    """A plain ViT (cls token, learned positions, pre-norm blocks, final norm): ``(B, 3, H, W) -> (B, 1 + N, D)``."""

    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, dim))
        self.blocks = nn.ModuleList(ReferenceBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def encoder_ratio(model: dict, image_size: int, batch: int, rounds: int, device: torch.device, precision: str,
                  reference: str = "plain", compile_: bool = False) -> dict:
    """Forward + backward images/s of wildssl's encoder and of the reference, alternating, median of rounds."""
    ours = build_encoder_from_config({**model, "img_size": image_size}).to(device).train()
    if reference == "timm":
        import timm  # only where it imports (not on the CPU machine of this project)

        theirs = timm.create_model("vit_small_patch16_224", num_classes=0).to(device).train()
        run_theirs = theirs.forward_features
    else:
        theirs = ReferenceViT(image_size, ours.patch_size, ours.embed_dim, ours.depth, ours.num_heads).to(device)
        run_theirs = theirs
    run_ours = ours.forward_features
    if compile_:
        run_ours, run_theirs = torch.compile(run_ours), torch.compile(run_theirs)
    images = torch.randn(batch, 3, image_size, image_size, device=device)

    def step(network, forward) -> float:
        start = time.perf_counter()
        with autocast_context(precision, device):
            tokens = forward(images)
        tokens.float().sum().backward()
        network.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(2):  # warm-up (and compilation)
        step(ours, run_ours), step(theirs, run_theirs)
    times = {"wildssl": [], "reference": []}
    for _ in range(rounds):
        times["wildssl"].append(step(ours, run_ours))
        times["reference"].append(step(theirs, run_theirs))
    ours_rate, theirs_rate = (batch / statistics.median(times[k]) for k in ("wildssl", "reference"))
    return {"image_size": image_size, "batch": batch, "depth": ours.depth, "width": ours.embed_dim,
            "heads": ours.num_heads, "patch": ours.patch_size, "reference": reference, "compile": compile_,
            "wildssl_images_per_s": ours_rate, "reference_images_per_s": theirs_rate, "ratio": ours_rate / theirs_rate}


# ----------------------------------------------------------------------------- draft

@contextlib.contextmanager
def draft_disabled():
    """JPEGs decoded at full size: ``draft`` (reduced-size DCT decoding) becomes a no-op. Loader workers
    forked inside the block inherit it."""
    original = JpegImagePlugin.JpegImageFile.draft
    JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None
    try:
        yield
    finally:
        JpegImagePlugin.JpegImageFile.draft = original


def decode_rates(files: list[Path], load_size: int, rounds: int = 3) -> dict:
    """Images per CPU-second of :func:`decode_image` with and without draft, alternating, median of rounds."""
    rates = {"draft": [], "no_draft": []}
    for _ in range(rounds):
        for key in rates:
            with draft_disabled() if key == "no_draft" else contextlib.nullcontext():
                start = time.process_time()
                for path in files:
                    decode_image(path, load_size)
                rates[key].append(len(files) / (time.process_time() - start))
    return {"load_size": load_size, "images": len(files),
            **{f"{k}_images_per_cpu_s": statistics.median(v) for k, v in rates.items()}}


def pipeline_rates(recipe: str, sets: list[str], steps: int) -> dict:
    """DINO's whole pipeline (loader workers, transfer, views) per CPU-second, with and without draft."""
    config = build_config(recipe, sets + [f"train.steps={steps + 1}"])
    import tempfile

    result = {}
    for key in ("draft", "no_draft"):
        with tempfile.TemporaryDirectory() as out, (draft_disabled() if key == "no_draft" else contextlib.nullcontext()):
            run = build_run(config, out)
            figures, _ = measure_pipeline(run, steps)
            decode = measure_decode(run, 128)
        result[key] = {**figures, **decode}
    return result


# ----------------------------------------------------------------------------- the table

def stream_sets(recipe: str, spec: str) -> list[str]:
    method = build_config(recipe)["method"]["name"]
    return [f"data.{stream}={spec}" for stream in get_method_class(method).streams]


def table(args) -> dict:
    device = torch.device(args.device)
    spec = str(Path(args.jpegs) / "annotations.jsonl")
    recipes, sets = (GPU_RECIPES, GPU_SETS) if args.scale == "small16" else (CPU_RECIPES, CPU_SETS)
    recipes = [r for r in recipes if not args.only or r.split("_quick")[0] in args.only]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report = {"command": " ".join([Path(sys.executable).name] + sys.argv), "uptime_before": load,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "methods": {}}
    for recipe in recipes:
        config = build_config(recipe, sets + stream_sets(recipe, spec) + list(args.set))
        result = bench(config, recipe, steps=args.steps, warmup=args.warmup)
        report["methods"][recipe] = result
        print(f"{recipe}: (a) {result['pipeline_images_per_s']:.0f}  (b) {result['bare_images_per_s']:.0f}  "
              f"(c) {result['step_images_per_s']:.0f} images/s  (c)/(b) {result['step_over_bare']:.2f}  "
              f"(a)/(c) {result['pipeline_over_step']:.2f}", flush=True)
    files = sorted(Path(args.jpegs).glob("*.jpg"))[:args.decode_images]
    report["decode"] = [decode_rates(files, size) for size in args.load_sizes]
    print("decode:", json.dumps(report["decode"]), flush=True)
    dino = "dino" if args.scale == "small16" else "dino_quick"
    report["pipeline_draft"] = pipeline_rates(dino, sets + stream_sets(dino, spec) + list(args.set), args.steps)
    print("pipeline:", json.dumps(report["pipeline_draft"]), flush=True)
    model = build_config(dino, sets + list(args.set))["model"]
    image = 224 if args.scale == "small16" else 32
    report["encoder"] = [encoder_ratio(model, image, args.encoder_batch, args.rounds, device, sets[-1].split("=")[1],
                                       args.reference, args.compile)]
    if args.scale != "small16":  # and the ViT-S/16 at 224 px, a few images at a time on the CPU
        report["encoder"].append(encoder_ratio({"name": "small", "patch_size": 16}, 224, 8, args.rounds, device,
                                               "fp32", args.reference, args.compile))
    print("encoder:", json.dumps(report["encoder"]), flush=True)
    report["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return report


def render(report: dict) -> str:
    """The Markdown tables of a ``table`` report."""
    out = ["| recipe | images/step | (a) pipeline img/s | (b) bare img/s | (c) step img/s | (c)/(b) | (a)/(c) | "
           "peak MiB (c) / (b) | encoder calls in (b) |", "|---|---|---|---|---|---|---|---|---|"]
    for recipe, r in report["methods"].items():
        calls = ", ".join(f"{c['network'].replace('.backbone', '')}{'' if c['grad'] else ' (no grad)'} "
                          f"{'x'.join(map(str, c['input']))}" + "".join(f" {k}" for k in c["kwargs"])
                          for c in r["backbone_calls"])
        out.append(f"| {recipe} | {r['images_per_step']} | {r['pipeline_images_per_s']:.0f} | {r['bare_images_per_s']:.0f} "
                   f"| {r['step_images_per_s']:.0f} | {r['step_over_bare']:.2f} | {r['pipeline_over_step']:.2f} "
                   f"| {r['step_peak_mib']:.0f} / {r['bare_peak_mib']:.0f} | {calls} |")
    out += ["", "| load size | images | decode+resize per CPU-s, draft | without draft | draft speed-up |", "|---|---|---|---|---|"]
    for d in report["decode"]:
        out.append(f"| {d['load_size']} | {d['images']} | {d['draft_images_per_cpu_s']:.0f} | "
                   f"{d['no_draft_images_per_cpu_s']:.0f} | {d['draft_images_per_cpu_s'] / d['no_draft_images_per_cpu_s']:.2f}x |")
    out += ["", "| DINO pipeline | workers | images/s | images per CPU-s (all processes) | decode alone per CPU-s |",
            "|---|---|---|---|---|"]
    for key, d in report["pipeline_draft"].items():
        out.append(f"| {key.replace('_', ' ')} | {d['pipeline_workers']} | {d['pipeline_images_per_s']:.0f} | "
                   f"{d['pipeline_images_per_cpu_s']:.0f} | {d['decode_images_per_cpu_s']:.0f} |")
    out += ["", "| encoder (fwd+bwd) | image | batch | wildssl img/s | reference img/s | ratio |", "|---|---|---|---|---|---|"]
    for e in report["encoder"]:
        out.append(f"| depth {e['depth']}, width {e['width']}, {e['heads']} heads, patch {e['patch']} vs {e['reference']}"
                   f"{' (compiled)' if e['compile'] else ''} | {e['image_size']} | {e['batch']} | "
                   f"{e['wildssl_images_per_s']:.1f} | {e['reference_images_per_s']:.1f} | {e['ratio']:.3f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-jpegs", help="256-px JPEGs and a captions manifest from a shared image folder")
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--side", type=int, default=256)
    p = sub.add_parser("table", help="measure every part of THROUGHPUT.md")
    p.add_argument("--jpegs", required=True, help="the make-jpegs folder")
    p.add_argument("--scale", choices=("quick", "small16"), default="quick")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="*", help="methods to bench (default all)")
    p.add_argument("--set", action="append", default=[], help="config override for every method")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="alternating timings of the encoder comparison")
    p.add_argument("--encoder-batch", type=int, default=64)
    p.add_argument("--reference", choices=("plain", "timm"), default="plain")
    p.add_argument("--compile", action="store_true", help="torch.compile both encoders of the comparison")
    p.add_argument("--decode-images", type=int, default=200)
    p.add_argument("--load-sizes", type=int, nargs="*", default=[256, 224, 128, 64, 32])
    p.add_argument("--json", help="write every figure here")
    p = sub.add_parser("render", help="the Markdown tables of a table --json file")
    p.add_argument("report", type=Path)
    args = parser.parse_args()
    if args.command == "render":
        print(render(json.loads(args.report.read_text())), end="")
        return
    if args.command == "make-jpegs":
        print(f"wrote {make_jpegs(args.source, args.out, args.side)} JPEGs to {args.out}")
        return
    report = table(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
