"""MAE's visible-only encoder against the same step with the encoder on all patches, in one run.

    python benchmarks/mae_speed.py --device cpu --set model.depth=6 --set model.embed_dim=192 ...
    python benchmarks/mae_speed.py --device cuda --batch 256            # ViT-B/16 at 224, the mae recipe

Both steps are the whole MAE training step on the same batch: views built on the device, masks drawn
(75% hidden), encoder, decoder (8 x 512 by default: it always sees all N patches), the loss on the
hidden patches, backward, AdamW. They differ in one thing only: (a) the encoder runs on the ``K``
visible patches (``keep_indices`` of the kept set, the method's own path); (b) it runs on all ``N``
patches (``keep_indices`` = every patch) and the decoder receives all ``N`` encoder tokens instead of
``K`` tokens plus mask tokens. The steps alternate, (a) then (b), for ``--rounds`` rounds, and the
median time per step of each is reported, so that a change of load on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext

import torch

from wildssl.data.views import make_views
from wildssl.losses.mae_loss import mae_loss, patchify
from wildssl.methods import build_method
from wildssl.train.config import build_config
from wildssl.train.optim import apply_schedules, build_optimizer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10, help="timed (a, b) pairs")
    parser.add_argument("--warmup", type=int, default=3, help="untimed (a, b) pairs first")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--set", action="append", default=[], help="config override of the mae recipe")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    config = build_config("mae", [f"train.batch_size={args.batch}"] + args.set)
    method = build_method(config).to(device).train()
    optimizer = build_optimizer(method.parameter_groups(), config["optim"]["betas"])
    apply_schedules(optimizer, 1.5e-4, 0.05, freeze_last_layer=False)
    load = config["data"]["load_size"]
    images = torch.randint(0, 256, (args.batch, 3, load, load), dtype=torch.uint8, device=device)
    aspect = torch.ones(args.batch, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    every_patch = torch.arange(method.num_patches, device=device).expand(args.batch, -1)

    def step(visible_only: bool) -> float:
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            (view,) = make_views(images, method.specs, generator, aspect=aspect)
            keep, mask = method.draw_masks(args.batch, generator, device)
            predictions = method.predict_pixels(view.images, keep if visible_only else every_patch)
            loss = mae_loss(predictions, patchify(view.images, method.patch_size), mask,
                            config["method"]["norm_pix_loss"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step(True), step(False)
    visible, full = [], []
    for _ in range(args.rounds):
        visible.append(step(True))
        full.append(step(False))
    model = config["model"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "encoder": f"{model['name']} depth={model['depth']} width={model['embed_dim']} patch={model['patch_size']}",
        "decoder": f"depth={config['method']['decoder_depth']} width={config['method']['decoder_dim']}",
        "image": config["method"]["crop_size"], "patches": method.num_patches, "batch": args.batch,
        "visible_patches": method.num_patches - int(round(method.num_patches * config["method"]["mask_ratio"])),
        "visible_only_s_per_step": statistics.median(visible), "all_patches_s_per_step": statistics.median(full),
    }
    result["speedup"] = result["all_patches_s_per_step"] / result["visible_only_s_per_step"]
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
