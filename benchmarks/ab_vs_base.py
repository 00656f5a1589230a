"""Each annotation-bootstrapping method against its base method at equal images seen, then k-NN.

For a GPU run (the figures issue 3 asks for), with the shared data copied into a git-ignored folder
that travels with the run (``.carry/``, named in the device tool's ``carry``):

    python benchmarks/ab_vs_base.py --cifar .carry/cifar10_carry.npz --captions .carry/coco_mini/annotations.jsonl \
        --bootstrap .carry/camvid_scenes/annotations.jsonl --images 640000 --out $OUT/ab_vs_base

CPU smoke run (tiny models, seconds): ``python benchmarks/ab_vs_base.py --smoke --out /tmp/abvb``.

Streams: the base method trains on the annotation images (CIFAR-10 train images for SimCLR/DINO,
captioned images for CLIP), AB on the same images as its annotation stream plus ``--bootstrap``
(unlabeled scene images) as its bootstrap stream. The recipes ab_X and X are equal but for the ab_* keys
and the streams (``wildssl config`` shows it), and both runs get the same overrides here, so a pair
differs in one thing. "Equal images seen": both runs get ``train.images`` = the budget, rounded to a
multiple of both runs' images per step (B for the base, B + B/n for AB: B annotation images and B/n
bootstrap images of n crops each), so AB runs fewer steps and both see exactly the budget. k-NN:
CIFAR-10 train/test images of the carry file. Prints one JSON line per method and writes
``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

PAIRS = (("simclr", "ab_simclr"), ("dino", "ab_dino"), ("clip", "ab_clip"))
SMOKE = ["model.name=tiny", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
         "model.img_size=32", "data.load_size=32", "data.num_workers=0", "train.progress=false",
         "train.tensorboard=false", "eval.knn_every=0", "train.checkpoint_every=0"]
SMOKE_METHOD = {
    "simclr": ["method.crop_size=32", "method.proj_hidden_dim=32", "method.proj_dim=16"],
    "dino": ["method.global_size=32", "method.local_size=16", "method.n_local=2", "method.out_dim=64",
             "method.hidden_dim=32", "method.bottleneck_dim=16"],
    "clip": ["method.crop_size=32", "method.embed_dim=32", "method.text_size=null", "method.text_depth=1",
             "method.text_width=32", "method.text_heads=2", "method.tokenizer=byte", "method.vocab_size=259",
             "method.context_length=32"],
}
SMOKE_AB = ["method.ab_crop_size=32", "method.ab_decoder_depth=1", "method.ab_decoder_width=32",
            "method.ab_decoder_heads=2"]


def cifar_folders(npz: Path, out: Path, limit: int | None) -> tuple[str, str]:
    """Write the carry file's train and test images as class-folder PNGs (an image-folder source)."""
    data = np.load(npz)
    for split in ("train", "test"):
        images, labels = data[f"x_{split}"], data[f"y_{split}"]
        count = len(images) if limit is None else min(limit, len(images))
        for index in range(count):
            folder = out / split / str(data["classes"][labels[index]])
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{index:05d}.png"
            if not path.exists():
                Image.fromarray(images[index]).save(path)
    return str(out / "train"), str(out / "test")


def crop_keys(base: str, crop: int) -> list[str]:
    """The recipes crop at 224 px; on 32-px CIFAR images every view is cropped at ``crop`` instead."""
    if base == "dino":
        return [f"method.global_size={crop}", f"method.local_size={crop // 2}"]
    return [f"method.crop_size={crop}"]


def wildssl(*argv: str) -> str:
    """``wildssl ARGV`` in this process (its log shows as it runs; no torch import per run); its last line of
    stdout, the JSON summary."""
    from wildssl.cli import main as cli_main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_main(list(argv))
    if code:
        raise SystemExit(f"wildssl {' '.join(argv[:3])} failed with status {code} (its error is above)")
    return stdout.getvalue().strip().splitlines()[-1]


def equal_budget(images: int, batch: int, n_crops: int) -> tuple[int, int, int]:
    """(budget rounded up to a multiple of both runs' images per step, base per step, AB per step)."""
    base_step, ab_step = batch, batch + max(1, batch // n_crops)
    multiple = math.lcm(base_step, ab_step)
    return max(1, math.ceil(images / multiple)) * multiple, base_step, ab_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", help="cifar10_carry.npz (k-NN memory/test; SimCLR/DINO annotation stream)")
    parser.add_argument("--captions", help="captioned .jsonl for the CLIP pair (e.g. coco_mini/annotations.jsonl)")
    parser.add_argument("--bootstrap", help="unlabeled images for AB's bootstrap stream (a data SPEC)")
    parser.add_argument("--images", type=int, default=640_000,
                        help="images seen by each run, all streams together (train.images); the default is "
                             "2000 AB steps at the default batch")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--n-crops", type=int, default=4)
    parser.add_argument("--model", default="small")
    parser.add_argument("--patch-size", type=int, default=4, help="4 suits 32-px CIFAR images")
    parser.add_argument("--crop", type=int, default=32, help="crop size (DINO locals: half of it)")
    parser.add_argument("--only", choices=[base for base, _ in PAIRS], action="append")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic CPU run to check the harness")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.smoke:
        synthetic = "synthetic:scenes?n=64&size=32&colours=2"
        memory, test, images, captions = (f"{synthetic}&split=train", f"{synthetic}&split=test",
                                          f"{synthetic}&split=train", f"{synthetic}&split=train")
        bootstrap, budget, batch, n_crops = f"{synthetic}&seed=1&split=train", 48, 16, 2
    else:
        memory, test = cifar_folders(Path(args.cifar), out / "cifar", None)
        images, captions, bootstrap = memory, args.captions, args.bootstrap
        budget, batch, n_crops = args.images, args.batch, args.n_crops
    budget, base_step, ab_step = equal_budget(budget, batch, n_crops)
    common = [] if args.smoke else [f"model.name={args.model}", f"model.patch_size={args.patch_size}",
                                    "model.img_size=32", "data.load_size=32", "train.progress=false"]
    results = []
    for base, ab in PAIRS:
        if args.only and base not in args.only:
            continue
        annotation = captions if base == "clip" else images
        if annotation is None or bootstrap is None:
            print(json.dumps({"pair": base, "skipped": "give --captions / --bootstrap"}))
            continue
        # Everything both runs share, then what only one of them has: its data streams and the ab_* keys.
        shared = common + ((SMOKE + SMOKE_METHOD[base]) if args.smoke else crop_keys(base, args.crop)) + [
            f"train.batch_size={batch}", f"train.images={budget}"]
        runs = {
            base: [f"data.train={annotation}"],
            # the paper's bootstrap batch, B / n images (ab_dino_quick's own is smaller, for the CPU's time)
            ab: [f"data.annotation={annotation}", f"data.bootstrap={bootstrap}", f"method.ab_n_crops={n_crops}",
                 f"data.bootstrap_batch_size={ab_step - base_step}"]
                + (SMOKE_AB if args.smoke else [f"method.ab_crop_size={args.crop}"]),
        }
        for name, extra in runs.items():
            argv = ["train", f"{name}_quick" if args.smoke else name, "--out", str(out / name)]
            for item in shared + extra:
                argv += ["--set", item]
            summary = json.loads(wildssl(*argv))
            images_seen = summary["total_steps"] * (base_step if name == base else ab_step)
            if images_seen != budget:
                raise SystemExit(f"{name} saw {images_seen} images, not the budget {budget}")
            knn = json.loads(wildssl("eval", "knn", "--checkpoint", str(out / name), "--train", memory, "--test",
                                     test, "--json"))
            record = {"method": name, "images_seen": images_seen, "steps": summary["total_steps"], **knn}
            print(json.dumps(record), flush=True)
            results.append(record)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
