"""The ``wildssl`` command line: train, config, eval knn, export, plot, demo, recipes.

User errors (a missing path, a bad config key, a corrupt checkpoint) print one line and exit with
status 2; an interrupted run saves a checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from wildssl.errors import WildsslError

log = logging.getLogger("wildssl")


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def _device():
    from wildssl.train.engine import pick_device

    return pick_device()


# ----------------------------------------------------------------------------- train

def _config_from_args(args):
    """The resolved config of ``train`` / ``config``: recipe + ``--set`` + ``--data`` + ``--val``."""
    from wildssl.methods import get_method_class
    from wildssl.train.config import build_config

    overrides = list(args.set or [])
    config = build_config(args.recipe, overrides)
    extra = []
    if getattr(args, "data", None):  # --data names the method's first stream (data.train for single-stream methods)
        extra.append(f"data.{get_method_class(config['method']['name']).streams[0]}={args.data}")
    if getattr(args, "val", None):
        extra.append(f"eval.knn_test={args.val}")
    return build_config(args.recipe, overrides + extra) if extra else config


def cmd_train(args) -> int:
    from wildssl import distributed as dist
    from wildssl.eval.evaluate import make_online_knn
    from wildssl.train.engine import train

    config = _config_from_args(args)
    out = Path(args.out or Path("runs") / f"{config['method']['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    dist.setup_distributed()
    main_process = dist.is_main_process()  # asked before the group is gone: afterwards every rank is "rank 0"
    try:
        summary = train(config, out, resume=args.resume, knn_evaluator=make_online_knn(config, _device()))
    finally:
        dist.cleanup_distributed()
    if main_process:
        line = {k: v for k, v in summary.items() if k != "final_metrics"}
        line.update({k: v for k, v in summary["final_metrics"].items() if k.startswith("knn_")})
        for alarm in summary["alarms"]:
            print(f"wildssl: WARNING: {alarm}", file=sys.stderr)
        print(json.dumps(line))
    return 0


# ----------------------------------------------------------------------------- config

def cmd_config(args) -> int:
    from wildssl.train.config import dump_config

    print(dump_config(_config_from_args(args)), end="")
    return 0


# ----------------------------------------------------------------------------- eval knn

def _knn_encoder(args):
    """The encoder to evaluate and its model config: trained weights, or the same architecture at init."""
    import torch

    from wildssl.models.loading import build_encoder_from_config, encoder_state_from_checkpoint, load_encoder

    teacher = None if args.encoder == "auto" else args.encoder == "teacher"
    if args.checkpoint is None:
        if not args.random_init:
            raise WildsslError("give --checkpoint PATH (run directory, checkpoint or export), or --random-init "
                               "with --model")
        model_config = {"name": args.model, "patch_size": args.patch_size, "img_size": args.image_size or 224}
    else:
        _, model_config = encoder_state_from_checkpoint(args.checkpoint, teacher)
    if args.random_init:
        torch.manual_seed(args.seed)
        return build_encoder_from_config(model_config).eval(), model_config
    return load_encoder(args.checkpoint, teacher=teacher), model_config


def cmd_eval_knn(args) -> int:
    from wildssl.eval.evaluate import evaluate_knn
    from wildssl.models.loading import evaluated_network

    encoder, model_config = _knn_encoder(args)
    teacher = None if args.encoder == "auto" else args.encoder == "teacher"
    network = "random-init" if args.random_init else evaluated_network(args.checkpoint, teacher)
    device = _device()
    image_size = args.image_size or model_config.get("img_size", 224)
    result = evaluate_knn(encoder.to(device), args.train, args.test, image_size=image_size,
                          load_size=args.load_size, k=args.k, temperature=args.temperature, pool=args.pool,
                          batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                          progress=not args.json)
    if args.json:
        print(json.dumps({"knn_top1": result["knn_top1"], **{k: v for k, v in result.items() if k != "knn_top1"},
                          "network": network}))
    else:
        print(f"network: {network}")
        for name, value in result.items():
            print(f"{name}: {100 * value:.2f}%")
    return 0


# ----------------------------------------------------------------------------- export

def cmd_export(args) -> int:
    from wildssl.models.export import save_encoder_export

    teacher = None if args.encoder == "auto" else args.encoder == "teacher"
    kwargs = save_encoder_export(Path(args.out), args.checkpoint, teacher=teacher, timm=args.timm)
    print(f"wrote {args.out}")
    if args.timm:
        arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        print("load it in timm with:\n"
              f"  model = timm.create_model('vit_small_patch16_224', pretrained=False, num_classes=0, {arguments})\n"
              f"  model.load_state_dict(safetensors.torch.load_file({str(args.out)!r}))")
    return 0


# ----------------------------------------------------------------------------- plot

def cmd_plot(args) -> int:
    from wildssl.eval.plot import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")
    return 0


# ----------------------------------------------------------------------------- recipes

def cmd_recipes(args) -> int:
    from importlib import resources

    from wildssl.train.config import recipe_names

    for name in recipe_names():
        text = (resources.files("wildssl") / "recipes" / f"{name}.yaml").read_text()
        first = next((line[1:].strip() for line in text.splitlines() if line.startswith("#")), "")
        print(f"{name:16s} {first}")
    return 0


# ----------------------------------------------------------------------------- demo

DEMO_RECIPE = "demo"


def cmd_demo(args) -> int:
    """A short pre-training on the embedded synthetic scenes; the engine's own k-NN measures the encoder
    before the first step (random initialization) and after the last, on the recipe's eval sets."""
    from wildssl.errors import ConfigError
    from wildssl.eval.evaluate import make_online_knn
    from wildssl.train.config import build_config
    from wildssl.train.engine import train

    start = time.perf_counter()
    config = build_config(DEMO_RECIPE, list(args.set or []))
    out = Path(args.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    ecfg = config["eval"]
    if not (ecfg["knn_every"] and ecfg["knn_train"] and ecfg["knn_test"]):
        raise ConfigError("the demo compares k-NN before and after training: eval.knn_every, eval.knn_train and "
                          "eval.knn_test must stay set (the demo recipe sets them; do not --set them to 0 or null)")
    streams = {k: v for k, v in config["data"].items() if isinstance(v, str) and ":" in v}
    log.info("wildssl demo: %s for %d steps on %s -> %s", config["method"]["name"], config["train"]["steps"],
             ", ".join(f"{k}={v}" for k, v in streams.items()), out)
    summary = train(config, out, resume=False, knn_evaluator=make_online_knn(config, _device()))
    metrics = summary["final_metrics"]
    trained, random = metrics["knn_top1"], metrics["knn_top1_random_init"]
    elapsed = time.perf_counter() - start
    for alarm in summary["alarms"]:
        print(f"wildssl: WARNING: {alarm}", file=sys.stderr)
    print(f"k-NN top-1 (k={ecfg['knn_k']}, T={ecfg['knn_temperature']}) on {ecfg['knn_test']}, "
          f"memory {ecfg['knn_train']}:")
    print(f"  trained encoder ({config['method']['name']}, {summary['steps']} steps): {100 * trained:.2f}%")
    print(f"  same encoder at random initialization:  {100 * random:.2f}%")
    print(f"  run directory: {out}   total time: {elapsed:.0f} s")
    if args.json:
        print(json.dumps({"knn_top1_trained": trained, "knn_top1_random": random,
                          "method": config["method"]["name"], "steps": summary["steps"],
                          "seconds": round(elapsed, 1), "run_dir": str(out)}))
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wildssl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method from a recipe name or YAML file")
    p.add_argument("recipe", help="a shipped recipe name (see `wildssl recipes`) or a YAML file")
    p.add_argument("--data", help="training data SPEC: folder, .jsonl, tar shards, or synthetic:scenes?n=..")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<method>-<time>)")
    p.add_argument("--val", help="labelled data SPEC for the online k-NN (default: a held-out split of the "
                                 "training data when it has labels)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print the resolved config (YAML) that train would run")
    p.add_argument("recipe", help="a shipped recipe name (see `wildssl recipes`) or a YAML file")
    p.add_argument("--data", help="as for train: the method's first stream")
    p.add_argument("--val", help="as for train: eval.knn_test")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("eval", help="evaluate an encoder")
    eval_sub = p.add_subparsers(dest="protocol", required=True)
    k = eval_sub.add_parser("knn", help="weighted k-NN on frozen features (DINO protocol)")
    k.add_argument("--checkpoint", help="run directory, checkpoint file or export")
    k.add_argument("--train", required=True, help="data SPEC of the labelled k-NN memory")
    k.add_argument("--test", required=True, help="data SPEC of the labelled test images")
    k.add_argument("--random-init", action="store_true",
                   help="evaluate the same architecture untrained (the baseline to compare with)")
    k.add_argument("--model", default="small", help="architecture for --random-init without --checkpoint")
    k.add_argument("--patch-size", type=int, default=16, help="patch size for --random-init without --checkpoint")
    k.add_argument("--encoder", choices=("auto", "teacher", "student"), default="auto",
                   help="which encoder of a checkpoint (auto: the one the method evaluates: DINO's teacher, "
                        "SimCLR's and CLIP's student, the same for their AB variants)")
    k.add_argument("--pool", choices=("cls", "avg"), default="cls")
    k.add_argument("--image-size", type=int, help="eval resolution (default: the model's img_size)")
    k.add_argument("--load-size", type=int, help="decode size of the sources (default: the eval resolution)")
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--batch-size", type=int, default=256)
    k.add_argument("--num-workers", type=int, default=0)
    k.add_argument("--seed", type=int, default=0, help="seed of the random initialization")
    k.add_argument("--json", action="store_true", help="end with one JSON line {\"knn_top1\": ...}")
    k.set_defaults(func=cmd_eval_knn)

    p = sub.add_parser("export", help="write the encoder alone (timm-compatible with --timm)")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint file")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--timm", action="store_true", help="write exactly the state dict timm's ViT loads")
    p.add_argument("--encoder", choices=("auto", "teacher", "student"), default="auto")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="short pre-training + k-NN vs random init on embedded synthetic scenes")
    p.add_argument("--out", help="run directory (default runs/demo-<time>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plot", help="plot a run's metrics (loss, k-NN, bootstrap agreement per IoU bucket)")
    p.add_argument("run", help="run directory (holding metrics.jsonl)")
    p.add_argument("--out", help="output PNG (default <run>/metrics.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        return args.func(args)
    except WildsslError as error:
        print(f"wildssl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        message = str(interrupt) or "interrupted"
        print(f"wildssl: {message}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
