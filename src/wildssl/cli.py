"""The ``wildssl`` command line: train, config, bench, benchmark, eval, export, plot, demo, vocab, recipes.

User errors (a missing path, a bad config key, a corrupt checkpoint) print one line and exit with
status 2; an interrupted run saves a checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from wildssl.errors import WildsslError

log = logging.getLogger("wildssl")


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # Under torchrun every process runs this: the processes after the first say only warnings and errors, so that
    # an information line (the online k-NN's set-up, a resume) is printed once, not once per process.
    if int(os.environ.get("RANK", "0") or 0) > 0:
        logging.getLogger("wildssl").setLevel(logging.WARNING)


def _first_process() -> bool:
    """False in the processes after the first under torchrun (``RANK`` > 0): a note every process would print
    the same is printed once."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _one_line(error: BaseException) -> str:
    """The error's message; for one raised in a DataLoader worker, which PyTorch re-raises with the worker's whole
    traceback as its message ("Caught DataError in DataLoader worker process 1. Original Traceback ..."), the
    original message alone."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        for prefix in (f"{type(error).__module__}.{type(error).__name__}: ", f"{type(error).__name__}: "):
            if last.startswith(prefix):
                return last[len(prefix):]
        return last
    return text


# What gloo says on a rank whose peer exited (an error there, a kill); NCCL raises DistBackendError.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _a_peer_stopped(error: BaseException) -> bool:
    """True for the error a torchrun process meets when another process of the launch stopped: its own one-line
    error is the one to read, and this one's is the communication library's traceback."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2 or not isinstance(error, RuntimeError):
        return False
    return type(error).__name__ == "DistBackendError" or any(text in str(error) for text in PEER_GONE)


def _device():
    from wildssl.train.engine import pick_device

    return pick_device()


# ----------------------------------------------------------------------------- train

def _config_from_args(args):
    """The resolved config of ``train`` / ``config``: recipe + ``--set`` + ``--data`` + ``--val``."""
    from wildssl.methods import get_method_class
    from wildssl.train.config import build_config

    for flag in ("data", "val"):
        value = getattr(args, flag, None)
        if value is not None and not value.strip():  # an unset $DATA in --data "$DATA": not the recipe's data
            raise WildsslError(f"--{flag} is empty: give a data SPEC (a folder, a .jsonl manifest, tar shards or "
                               f"synthetic:scenes?...), or leave --{flag} out for the recipe's own")
    overrides = list(args.set or [])
    config = build_config(args.recipe, overrides)
    extra = []
    if getattr(args, "data", None):  # --data names the method's first stream (data.train for single-stream methods)
        streams = get_method_class(config["method"]["name"]).streams
        extra.append(f"data.{streams[0]}={args.data}")
        if _bootstrap_follows_data(config, streams, overrides, args.data):
            extra.append(f"data.bootstrap={args.data}")
            if _first_process():
                print(f"wildssl: data.bootstrap follows --data ({args.data}) instead of the recipe's synthetic "
                      "scenes; --set data.bootstrap=SPEC bootstraps on other images", file=sys.stderr)
    if getattr(args, "val", None):
        extra.append(f"eval.knn_test={args.val}")
    if getattr(args, "data", None):
        extra += _knn_follows_data(config, overrides, args.data, getattr(args, "val", None))
    return build_config(args.recipe, overrides + extra) if extra else config


def _knn_follows_data(config: dict, overrides: list[str], data: str, val: str | None) -> list[str]:
    """A recipe's own k-NN sets (``eval.knn_train``/``knn_test`` on synthetic scenes: wsp_quick's, the demo's) left
    out when the run trains on the user's ``--data``: the online k-NN then measures that data (its labelled images in
    folds, or against ``--val``), not the scenes. Keys set on the command line stay."""
    from wildssl.train.config import parse_overrides

    given = {key for key, _ in parse_overrides(overrides)}
    cleared = [key for key in ("knn_train", "knn_test")
               if f"eval.{key}" not in given and str(config["eval"][key] or "").startswith("synthetic:")
               and not (key == "knn_test" and val) and not data.startswith("synthetic:")]
    if cleared and _first_process():
        print(f"wildssl: the online k-NN measures --data ({data}){' against --val' if val else ''}, not the recipe's "
              f"synthetic scenes ({', '.join('eval.' + k for k in cleared)} left out)", file=sys.stderr)
    return [f"eval.{key}=null" for key in cleared]


def _bootstrap_follows_data(config: dict, streams: tuple, overrides: list[str], data: str) -> bool:
    """Whether an annotation-bootstrapping run on a user's ``--data`` also bootstraps on it: when the bootstrap
    stream is still the recipe's synthetic placeholder and was not set on the command line. Real photos as the
    base stream with synthetic scenes as the unlabeled one is never what a run on one's own folder means."""
    if "bootstrap" not in streams or data.startswith("synthetic:"):
        return False
    from wildssl.train.config import parse_overrides

    if any(key == "data.bootstrap" for key, _ in parse_overrides(overrides)):
        return False
    return str(config["data"].get("bootstrap") or "").startswith("synthetic:")


POOL_NAMES = {"cls": "class token", "avg": "mean patch token"}  # what eval.pool reads, in words


def cmd_train(args) -> int:
    from wildssl import distributed as dist
    from wildssl.eval.evaluate import make_online_knn
    from wildssl.methods import build_meta_method
    from wildssl.train.engine import train
    from wildssl.train.run import check_out_dir, check_out_is_new_or_a_run

    if args.resume and not args.out:
        raise WildsslError("--resume needs --out RUN: the run directory to continue")
    config = _config_from_args(args)
    out = Path(args.out or Path("runs") / f"{config['method']['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_out_dir(config, out, args.resume)  # before the online k-NN opens its data
    check_out_is_new_or_a_run(config, out)
    build_meta_method(config)  # a value the method checks itself fails here, before the online k-NN opens data
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
        if "knn_top1" in line and "knn_top1_random_init" in line:
            trained, floor = 100 * line["knn_top1"], 100 * line["knn_top1_random_init"]
            read = f"; the {line['knn_network']}, {POOL_NAMES.get(line.get('knn_pool'), line.get('knn_pool'))}" \
                if "knn_network" in line else ""
            print(f"wildssl: k-NN top-1 {trained:.1f}% trained, {floor:.1f}% for the same encoder at random "
                  f"initialization ({trained - floor:+.1f} points{read})", file=sys.stderr)
        print(json.dumps(line))
    return 0


# ----------------------------------------------------------------------------- config

def cmd_config(args) -> int:
    from wildssl.methods import build_meta_method
    from wildssl.train.config import dump_config

    config = _config_from_args(args)
    build_meta_method(config)  # the values the method checks itself (model.name, ...): what train would refuse
    print(dump_config(config), end="")
    return 0


# ----------------------------------------------------------------------------- bench

def cmd_bench(args) -> int:
    from wildssl.io import output_file
    from wildssl.train.bench import bench, summary_lines

    if args.json:
        args.json = output_file(args.json, "--json")  # before the bench runs: a bad path is no reason to run it
    config = _config_from_args(args)
    result = bench(config, args.recipe, steps=args.steps, warmup=args.warmup, pipeline_steps=args.pipeline_steps)
    for line in summary_lines(result):
        print(line)
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        except OSError as error:
            raise WildsslError(f"cannot write --json {args.json}: {error.strerror or error}; "
                               "choose a writable path") from None
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------- eval knn

def _run_initial_encoder(checkpoint, teacher: bool | None, seed: int | None):
    """The encoder a wildssl run of ``checkpoint`` started from, at ``seed`` (None: the run's ``train.seed``): its
    method rebuilt as the engine builds it (so MAE's and I-JEPA's fixed sine-cosine positions are those of the run,
    not a random table), the network its evaluations read. None for a file that holds no method config (an export):
    the caller builds the bare architecture."""
    from wildssl.methods import build_initial_method
    from wildssl.models.loading import read_checkpoint_config
    from wildssl.train.config import build_config

    stored = read_checkpoint_config(checkpoint)
    if "method" not in stored or "train" not in stored:
        return None
    config = build_config(stored)
    if seed is not None:
        config["train"]["seed"] = seed
    return build_initial_method(config, load_init_from=False).encoder(teacher).eval()


def _knn_encoder(args):
    """The encoder to evaluate, its model config and what it is (``"wildssl"``, a peer's layout, or
    ``"random-init"`` without a checkpoint): trained weights, or the same architecture at init."""
    import torch

    from wildssl.models.loading import build_encoder_from_config, checkpoint_model_config, load_encoder
    from wildssl.models.peers import load_peer_encoder, random_like, reads_as_wildssl

    teacher = None if args.encoder == "auto" else args.encoder == "teacher"
    if args.seed is not None and not args.random_init:
        raise WildsslError("--seed only seeds --random-init's weights; a trained encoder's k-NN draws nothing at random")
    seed = args.seed or 0
    if args.checkpoint is None:
        if not args.random_init:
            raise WildsslError("give a checkpoint (run directory, checkpoint or export: as the first argument or "
                               "--checkpoint PATH), or --random-init with --model")
        model_config = {"name": args.model or "small", "patch_size": args.patch_size or 16,
                        "img_size": args.image_size or 224}
        torch.manual_seed(seed)
        return build_encoder_from_config(model_config).eval(), model_config, "random-init"
    if args.model is not None or args.patch_size is not None:
        given = " and ".join(f for f, v in (("--model", args.model), ("--patch-size", args.patch_size)) if v is not None)
        raise WildsslError(f"{given} only {'build' if ' and ' in given else 'builds'} an architecture for --random-init "
                           f"without a checkpoint; the checkpoint {args.checkpoint} has its own (leave {given} out)")
    path = Path(args.checkpoint)
    if not reads_as_wildssl(path, args.layout):
        encoder, layout = load_peer_encoder(path, args.layout, teacher, args.num_heads)  # a peer's file, as eval all
        if args.random_init:
            torch.manual_seed(seed)
            encoder = random_like(encoder)
        return encoder, {"img_size": encoder.img_size}, layout
    _refuse_num_heads(args)
    model_config = checkpoint_model_config(args.checkpoint, teacher)  # header only: no weights read
    if args.random_init:  # the run's own floor (its seed unless --seed says otherwise), else the architecture's
        encoder = _run_initial_encoder(args.checkpoint, teacher, args.seed)
        if encoder is None:
            torch.manual_seed(seed)
            encoder = build_encoder_from_config(model_config).eval()
        return encoder, model_config, "wildssl"
    return load_encoder(args.checkpoint, teacher=teacher), model_config, "wildssl"


def _knn_pool(args, kind: str) -> str:
    """--pool, else the pooling the run's own k-NN used (its config's ``eval.pool``: a run trained on the mean
    patch token is read the same way, and so is its random-init floor), else the class token (a peer's file too)."""
    if args.pool is not None:
        return args.pool
    if kind != "wildssl":
        return "cls"
    from wildssl.models.loading import evaluated_pool

    return evaluated_pool(args.checkpoint) or "cls"


# eval knn options -> the config keys whose type and range they share (wildssl.schema)
KNN_OPTION_KEYS = {"k": "eval.knn_k", "temperature": "eval.knn_temperature", "batch_size": "eval.batch_size",
                   "image_size": "eval.image_size", "load_size": "data.load_size",
                   "num_workers": "data.num_workers", "patch_size": "model.patch_size"}


def _check_options(args, option_keys: dict[str, str]) -> None:
    """Each numeric option against its config key's rule: a one-line error naming the option."""
    from wildssl.errors import ConfigError
    from wildssl.schema import CORE_RULES, check_value

    for name, key in option_keys.items():
        value, rule = getattr(args, name), CORE_RULES[key]
        if value is None:
            continue  # not given: the default applies
        try:
            check_value(key, value, rule)
        except ConfigError:
            raise ConfigError(f"--{name.replace('_', '-')} {value} is invalid: it must be {rule.describe()}") from None


def cmd_eval_knn(args) -> int:
    from wildssl.eval.evaluate import evaluate_knn
    from wildssl.models.loading import evaluated_network

    _check_options(args, KNN_OPTION_KEYS)

    encoder, model_config, kind = _knn_encoder(args)
    teacher = None if args.encoder == "auto" else args.encoder == "teacher"
    if args.random_init:
        network = "random-init"
    else:
        network = evaluated_network(args.checkpoint, teacher) if kind == "wildssl" else f"{kind} layout"
    device = _device()
    image_size = args.image_size or model_config.get("img_size", 224)
    pool = _knn_pool(args, kind)
    result = evaluate_knn(encoder.to(device), args.train, args.test, image_size=image_size,
                          load_size=args.load_size, k=args.k, temperature=args.temperature, pool=pool,
                          batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                          progress=not args.json, max_pixels=args.max_pixels)
    if args.json:
        print(json.dumps({"knn_top1": result["knn_top1"], **{k: v for k, v in result.items() if k != "knn_top1"},
                          "network": network, "pool": pool}))
    else:
        print(f"network: {network}, features: {pool}")
        for name, value in result.items():
            print(f"{name}: {100 * value:.2f}%")
    return 0


# ----------------------------------------------------------------------------- eval suite and probes

def _refuse_num_heads(args) -> None:
    """``--num-heads`` builds a peer's ViT; a wildssl file's config names its heads, so the option would be dropped."""
    if args.num_heads is not None:
        raise WildsslError(f"--num-heads applies to a peer's file; {args.checkpoint} is wildssl's and its config "
                           "names its attention heads")


def _suite_encoder(args):
    """The encoder of ``eval all`` and the probe verbs, and what it is: a wildssl run/checkpoint/export or a
    peer's file; with --random-init the same architecture at its initial weights."""
    import torch

    from wildssl.models.loading import evaluated_network
    from wildssl.models.peers import load_any_encoder, random_like

    teacher = None if args.encoder == "auto" else args.encoder == "teacher"
    encoder, kind = load_any_encoder(args.checkpoint, args.layout, teacher, args.num_heads)
    if kind == "wildssl":
        _refuse_num_heads(args)
    network = evaluated_network(args.checkpoint, teacher) if kind == "wildssl" else f"{kind} layout"
    if args.random_init:  # wildssl runs: the run's initial weights when --seed is its train.seed
        initial = _run_initial_encoder(args.checkpoint, teacher, args.seed) if kind == "wildssl" else None
        if initial is None:
            torch.manual_seed(args.seed)
            initial = random_like(encoder)
        return initial, "random-init"
    return encoder, network


# the probes with one pooled feature (the others sweep both, or read the patch tokens)
POOLED_PROBES = ("knn", "fewshot")


def _pool_as_the_run(suite: dict, checkpoint: str) -> dict:
    """``suite`` with the run's own ``eval.pool`` as the default pool of its k-NN and few-shot probes, as
    ``eval knn RUN`` reads it (a run trained on the mean patch token is read the same way, and so is its
    random-init floor); a peer's file, or a probe that names its pool, keeps the probe's default."""
    from wildssl.eval.report import probe_kind
    from wildssl.models.loading import evaluated_pool

    try:
        pool = evaluated_pool(checkpoint)
    except WildsslError:  # a peer's file: no wildssl config
        return suite
    if pool is None:
        return suite
    probes = {name: ({"pool": pool, **options} if probe_kind(name) in POOLED_PROBES else options)
              for name, options in suite["probes"].items()}
    return {**suite, "probes": probes}


def _suite_runtime(args) -> dict:
    """The suite keys given on the command line (``--image-size``, ``--load-size``, ``--batch-size``,
    ``--num-workers``, ``--seed``); :func:`wildssl.eval.report.read_suite` checks them and fills in the rest."""
    from wildssl.eval.report import SUITE_KEY_RULES

    _check_options(args, {key: rule for key, rule in SUITE_KEY_RULES.items() if hasattr(args, key)})
    given = {key: getattr(args, key, None) for key in SUITE_KEY_RULES}
    return {key: value for key, value in given.items() if value is not None}


def _feature_store(args, encoder):
    from wildssl.eval.cache import FeatureStore, default_cache_dir

    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    return FeatureStore(encoder, _device(), cache_dir, progress=True)  # run_suite sets the suite's batch and workers


def _print_figures(probe: str, figures: dict, network: str) -> None:
    from wildssl.eval.report import headline

    print(f"{probe} probe, network: {network}")
    for key, value in headline(probe, figures).items():
        print(f"  {key}: {100 * value:.2f}%")
    for key in ("pool", "lr", "tasks", "num_train", "num_test", "seconds"):
        if key in figures:
            print(f"  {key}: {figures[key]}")


def cmd_eval_all(args) -> int:
    from wildssl.eval.report import read_suite, run_suite

    # a mistake in the suite file is found before the encoder is loaded; the options given override its keys
    suite = {**read_suite(args.suite), **_suite_runtime(args)}
    args.seed = suite["seed"]
    encoder, network = _suite_encoder(args)
    suite = _pool_as_the_run(suite, args.checkpoint)
    out = Path(args.out or Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    name = f"{args.checkpoint} ({network})"
    report = run_suite(_feature_store(args, encoder), suite, out, name=name, progress=True)
    if args.json:
        print(json.dumps({"network": network, "out": str(out), "seconds": report["seconds"],
                          "probes": report["probes"]}))
    else:
        for probe, figures in report["probes"].items():
            _print_figures(probe, figures, network)
        print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return 0


def cmd_eval_probe(args) -> int:
    from wildssl.eval.report import read_suite, run_suite
    from wildssl.train.config import parse_value

    probe = args.protocol  # the verbs are named after the suite's probes
    options = {key: getattr(args, key) for key in ("train", "test", "data") if getattr(args, key, None)}
    for item in args.set or []:
        if "=" not in item:
            raise WildsslError(f"--set expects key=value, got {item!r} (for example --set epochs=10)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in ("train", "test", "data") and getattr(args, key, None):  # the --set one had replaced it
            raise WildsslError(f"--{key} {getattr(args, key)} and --set {key}={text} name two data sets; give one")
        options[key] = parse_value(text)
    suite = read_suite({**_suite_runtime(args), "probes": {probe: options}})  # checked before the encoder loads
    args.seed = suite["seed"]
    encoder, network = _suite_encoder(args)
    suite = _pool_as_the_run(suite, args.checkpoint)
    name = f"{args.checkpoint} ({network})"
    report = run_suite(_feature_store(args, encoder), suite, args.out, name=name, progress=True)
    figures = report["probes"][probe]
    if args.json:
        print(json.dumps({"probe": probe, "network": network, **figures}))
    else:
        _print_figures(probe, figures, network)
        if args.out:
            print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.md'}")
    return 0


def _add_checkpoint_argument(parser: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    """The checkpoint a command reads, given either way: ``wildssl eval linear RUN`` or ``wildssl eval linear
    --checkpoint RUN`` (every command that reads one takes both, so a flag learnt on one command works on the
    others); :func:`_merge_checkpoint` makes them one ``args.checkpoint``."""
    parser.add_argument("checkpoint", nargs="?", help=help + " (or give it as --checkpoint)")
    parser.add_argument("--checkpoint", dest="checkpoint_option", metavar="CHECKPOINT", help="the same as the "
                        "positional CHECKPOINT")
    parser.set_defaults(checkpoint_required=required)


def _merge_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.checkpoint`` from the positional or the ``--checkpoint`` form; a usage error when a required one
    is missing or the two forms name different files."""
    if not hasattr(args, "checkpoint_option"):
        return
    positional, option = args.checkpoint, args.checkpoint_option
    if positional is not None and option is not None and positional != option:
        parser.error(f"two checkpoints given: {positional} and --checkpoint {option}; give one")
    args.checkpoint = positional if positional is not None else option
    if args.checkpoint is None and args.checkpoint_required:
        parser.error("the checkpoint is required: give a run directory, checkpoint or export (as the first "
                     "argument or as --checkpoint)")


# --layout of the commands that read an encoder (wildssl.models.peers.LAYOUTS)
LAYOUT_CHOICES = ("auto", "wildssl", "timm", "dino", "mae", "maws", "ijepa")


def _add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``eval all`` and the probe verbs."""
    _add_checkpoint_argument(parser, "run directory, checkpoint or export of wildssl, or a peer's file "
                                     "(timm, DINO, MAE, MAWS or I-JEPA layout; see --layout)")
    parser.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto",
                        help="how to read CHECKPOINT (auto: wildssl files by their metadata, peers' by their keys)")
    parser.add_argument("--encoder", choices=("auto", "teacher", "student"), default="auto",
                        help="which encoder of a checkpoint (auto: the one the method evaluates; DINO's teacher, "
                             "I-JEPA's target encoder)")
    parser.add_argument("--num-heads", type=int, help="attention heads of a peer's ViT of non-standard width")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate CHECKPOINT's architecture at its initial weights (the floor)")
    parser.add_argument("--seed", type=int, help="seed of --random-init, the splits and the probes (default 0; "
                                                 "under eval all, the suite file's seed)")
    parser.add_argument("--batch-size", type=int, help="images per encoder pass (default 256; under eval all, the "
                                                       "suite file's)")
    parser.add_argument("--num-workers", type=int, help="data loader processes (default 0; under eval all, the suite "
                                                        "file's)")
    parser.add_argument("--cache-dir", help="feature cache folder (default $XDG_CACHE_HOME/wildssl/features)")
    parser.add_argument("--no-cache", action="store_true", help="keep features in memory only")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")


def cmd_eval_zeroshot(args) -> int:
    from wildssl.eval.zeroshot import DEFAULT_TEMPLATES, load_image_text_model, read_templates, zeroshot_classify

    _check_options(args, {"image_size": "eval.image_size", "batch_size": "eval.batch_size",
                          "num_workers": "data.num_workers"})
    templates = read_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
    method = load_image_text_model(args.checkpoint)
    result = zeroshot_classify(method, args.data, templates, image_size=args.image_size,
                               batch_size=args.batch_size, num_workers=args.num_workers, device=_device())
    if args.json:
        print(json.dumps({"method": method.name, **result}))
    else:
        print(f"zero-shot, {method.name} run {args.checkpoint}: {result['num_images']} images, "
              f"{result['num_classes']} classes, {result['num_templates']} templates")
        k = min(5, result["num_classes"])  # with fewer than 6 classes the top-5 holds every class: say so
        print(f"  top-1: {100 * result['zeroshot_top1']:.2f}%\n  top-{k}: {100 * result['zeroshot_top5']:.2f}%"
              + (" (every class, so it says nothing)" if k == result["num_classes"] else ""))
    return 0


# ----------------------------------------------------------------------------- export

def cmd_export(args) -> int:
    from wildssl.models.export import check_export_target, save_encoder_export
    from wildssl.train import fsdp

    teacher = None if args.encoder == "auto" else args.encoder == "teacher"
    sharded = Path(args.checkpoint) / fsdp.SHARDED_CHECKPOINT
    if (Path(args.checkpoint) / fsdp.RUN_STATE).is_file():  # a sharded checkpoint named itself (a kept copy)
        sharded = Path(args.checkpoint)
    if (sharded / fsdp.RUN_STATE).is_file():  # a train.sharding=fsdp run: consolidate it
        state = fsdp.read_run_state(sharded)
        network = state["eval_network"] if teacher is None else ("teacher" if teacher else "student")
        check_export_target(Path(args.out), sharded / fsdp.RUN_STATE)
        with tempfile.TemporaryDirectory() as scratch:  # --timm: consolidated first, then written as timm reads it
            consolidated = Path(scratch) / "encoder.safetensors" if args.timm else args.out
            fsdp.export_consolidated(sharded, consolidated, state["config"]["model"], network,
                                     state["config"].get("eval", {}).get("pool"))
            if args.timm:
                kwargs = save_encoder_export(Path(args.out), consolidated, timm=True)
        print(f"wrote {args.out} (the {network} encoder of the sharded checkpoint {sharded})")
    else:
        kwargs = save_encoder_export(Path(args.out), args.checkpoint, teacher=teacher, timm=args.timm)
        print(f"wrote {args.out}")
    if args.timm:
        arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        print("load it in timm with:\n"
              f"  model = timm.create_model('vit_small_patch16_224', pretrained=False, {arguments})\n"
              f"  model.load_state_dict(safetensors.torch.load_file({str(args.out)!r}))")
    return 0


# ----------------------------------------------------------------------------- plot

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")  # what matplotlib writes without extra packages


def cmd_plot(args) -> int:
    from wildssl.io import output_file

    if args.out:
        args.out = output_file(args.out, suffixes=PICTURE_SUFFIXES)  # before the run is read
    if not args.reconstructions:
        given = [flag for flag, value in (("--count", args.count), ("--seed", args.seed)) if value is not None]
        if given:
            raise WildsslError(f"{' and '.join(given)} only {'apply' if len(given) > 1 else 'applies'} to "
                               "--reconstructions IMAGES (an MAE run's reconstructions); the plot you asked for has none")
    if args.reconstructions and args.neighbours is not None:  # --neighbours was dropped without a word
        raise WildsslError("--reconstructions and --neighbours draw two different plots; give one of them")
    if args.reconstructions:
        from wildssl.eval.reconstructions import plot_reconstructions

        count, seed = 8 if args.count is None else args.count, args.seed or 0
        print(f"wrote {plot_reconstructions(args.run, args.reconstructions, args.out, count, seed)}")
        return 0
    if args.neighbours is not None:
        from wildssl.eval.neighbour_plot import plot_neighbours

        print(f"wrote {plot_neighbours(args.run, args.neighbours, args.out)}")
        return 0
    from wildssl.eval.plot import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")
    return 0


# ----------------------------------------------------------------------------- benchmark suites

def cmd_benchmark_run(args) -> int:
    import shlex

    from wildssl.benchmark.runner import run_benchmark

    parts = ["wildssl", "benchmark", "run", args.suite, "--scale", args.scale]
    for flag, value in (("--seeds", args.seeds), ("--out", args.out), ("--shared", args.shared),
                        ("--data-dir", args.data_dir)):
        if value is not None:
            parts += [flag, str(value)]
    command = " ".join(shlex.quote(p) for p in parts)
    results = run_benchmark(args.suite, args.scale, args.seeds, args.out, args.shared, args.data_dir, command)
    out = Path(args.out or Path("runs") / "bench" / f"{results['suite']}-{args.scale}")
    print((out / "table.md").read_text())
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")
    return 0


def cmd_benchmark_report(args) -> int:
    from wildssl.benchmark.table import write_outputs

    write_outputs(args.dir)
    print((Path(args.dir) / "table.md").read_text())
    return 0


def cmd_benchmark_prepare(args) -> int:
    from wildssl.benchmark.prepare import prepare_all

    for name, spec in prepare_all(args.shared, args.out, args.sets).items():
        print(f"{name}: {spec}")
    return 0


# ----------------------------------------------------------------------------- recipes

def cmd_recipes(args) -> int:
    from importlib import resources

    from wildssl.train.config import recipe_names

    for name in recipe_names():
        print(f"{name:16s} {_recipe_summary((resources.files('wildssl') / 'recipes' / f'{name}.yaml').read_text())}")
    return 0


# Words a comment line ends on only when its sentence goes on below (for `wildssl recipes`' one-line summaries)
_GOES_ON = {"a", "an", "and", "as", "at", "by", "for", "from", "in", "of", "on", "or", "the", "to", "with"}


def _recipe_summary(text: str) -> str:
    """The first sentence of a recipe file's first comment: its first line, joined with the lines that go on with
    it (a line that starts in lower case or with a number, or follows a line ending on a comma or a word such as
    "by"), cut after the first full stop."""
    import re

    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    summary = lines[0] if lines else ""
    for line in lines[1:]:
        last = summary.rsplit(" ", 1)[-1]
        goes_on = summary.endswith(",") or last in _GOES_ON or (line[:1] and not line[0].isupper())
        if not line or line[0] in "-*" or not goes_on:
            break
        summary += " " + line
    return re.split(r"(?<=\.)\s+(?=[A-Z(])", summary, maxsplit=1)[0]


# ----------------------------------------------------------------------------- vocab

def cmd_vocab_build(args) -> int:
    from wildssl.data.vocabulary import Vocabulary
    from wildssl.data.vocabulary_build import build_vocabulary, read_caption_files
    from wildssl.io import output_file

    out = Path(args.out).resolve()
    for given in [*args.captions, *(args.stop_words or []), *([args.synonyms] if args.synonyms else [])]:
        if Path(given).resolve() == out:  # it was overwritten by the vocabulary read from it
            raise WildsslError(f"--out {args.out} is one of the files the vocabulary is read from ({given}); "
                               "give another --out")
    stop_words: list[str] = []
    for path in args.stop_words or []:
        try:
            stop_words += Path(path).read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as error:
            raise WildsslError(f"cannot read the stop-word list {path}: {error}") from None
    if args.synonyms and not Path(args.synonyms).is_file():
        raise WildsslError(f"synonyms file not found: {args.synonyms} (one group per line, 'label: term, term')")
    synonyms = Vocabulary.load(args.synonyms) if args.synonyms else None
    vocabulary, counts = build_vocabulary(read_caption_files(args.captions), args.size, stop_words, synonyms,
                                          args.min_count)
    sources = ", ".join(Path(p).name for p in args.captions)
    vocabulary.save(output_file(args.out), header=f"wildssl label vocabulary: the {len(vocabulary)} most frequent labels of "
                                     f"{sources} (wildssl vocab build --size {args.size})")
    shown = ", ".join(f"{label} ({count})" for label, count in zip(vocabulary.labels[:8], counts))
    print(f"wrote {args.out}: {len(vocabulary)} labels, {len(vocabulary.terms)} terms; most frequent: {shown}")
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
    from wildssl.train.run import check_out_is_new_or_a_run, run_checkpoint_path

    start = time.perf_counter()
    config = build_config(DEMO_RECIPE, list(args.set or []))
    out = Path(args.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_checkpoint_path(config, out).is_file():  # the demo starts afresh: it has no --resume
        raise WildsslError(f"{out} already holds a run; give the demo another --out (or none: runs/demo-<time>)")
    check_out_is_new_or_a_run(config, out)
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
    p.add_argument("--data", help="training data SPEC: folder, .jsonl, tar shards, or synthetic:scenes?n=.. (the "
                                  "method's first stream; an ab_* recipe bootstraps on it too unless data.bootstrap "
                                  "is set)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<method>-<time>)")
    p.add_argument("--val", help="labelled data SPEC for the online k-NN (default: the training data's "
                                 "labelled images in five folds, each classified with the others as the memory)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print the resolved config (YAML) that train would run")
    p.add_argument("recipe", help="a shipped recipe name (see `wildssl recipes`) or a YAML file")
    p.add_argument("--data", help="as for train: the method's first stream")
    p.add_argument("--val", help="as for train: eval.knn_test")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("bench", help="throughput of a recipe: (a) data pipeline, (b) bare networks, (c) full "
                                     "step, (d) peak memory, with the ratios (c)/(b) and (a)/(c)")
    p.add_argument("recipe", help="a shipped recipe name (see `wildssl recipes`) or a YAML file")
    p.add_argument("--data", help="as for train: the method's first stream (real files, to time decoding)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of (b) and (c) (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timing (default 2)")
    p.add_argument("--pipeline-steps", type=int,
                   help="batches read for (a) (default: steps + warmup, at least 3; the first is not timed)")
    p.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("benchmark", help="suites of runs at equal images seen, evaluated alike, with a table "
                                         "of mean and spread over seeds (benchmarks/suites/*.yaml)")
    bench_sub = p.add_subparsers(dest="benchmark_command", required=True)
    b = bench_sub.add_parser("run", help="train and evaluate every entry and seed of a suite (resumes a killed one)")
    b.add_argument("suite", help="suite YAML file, or the name of a shipped suite (benchmarks/suites/*.yaml: "
                                 "object_centric, ...)")
    b.add_argument("--scale", choices=("tiny", "cpu", "gpu"), default="cpu",
                   help="tiny: synthetic data in seconds (tests); cpu: ~30 min on 2 cores; gpu: <= 10 min on one GPU")
    b.add_argument("--seeds", type=int, help="seeds per entry (default: the suite's)")
    b.add_argument("--out", help="output folder (default runs/bench/<suite>-<scale>); the same --out resumes")
    b.add_argument("--shared", help="shared real data folder (default $WILDSSL_SHARED_DATA)")
    b.add_argument("--data-dir", help="where the prepared data sets are written (default <out>/data)")
    b.set_defaults(func=cmd_benchmark_run)
    b = bench_sub.add_parser("report", help="rebuild results.json, table.md and the plots from the recorded runs")
    b.add_argument("dir", help="a benchmark run's output folder")
    b.set_defaults(func=cmd_benchmark_report)
    b = bench_sub.add_parser("prepare", help="convert the shared real data into the suites' named data sets")
    b.add_argument("--shared", help="shared real data folder (default $WILDSSL_SHARED_DATA)")
    b.add_argument("--out", required=True, help="folder of the prepared sets (give it to run as --data-dir)")
    b.add_argument("--sets", nargs="+", help="only these sets (default all: cifar10:train, cifar10:test, ...)")
    b.set_defaults(func=cmd_benchmark_prepare)

    p = sub.add_parser("eval", help="evaluate an encoder")
    eval_sub = p.add_subparsers(dest="protocol", required=True)
    k = eval_sub.add_parser("knn", help="weighted k-NN on frozen features (DINO protocol)")
    _add_checkpoint_argument(k, "run directory, checkpoint file or export", required=False)
    k.add_argument("--train", required=True, help="data SPEC of the labelled k-NN memory")
    k.add_argument("--test", required=True, help="data SPEC of the labelled test images")
    k.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto",
                   help="how to read the checkpoint (auto: wildssl files by their metadata, peers' by their keys)")
    k.add_argument("--num-heads", type=int, help="attention heads of a peer's ViT of non-standard width")
    k.add_argument("--random-init", action="store_true",
                   help="evaluate the same architecture untrained (the baseline to compare with)")
    k.add_argument("--model", help="architecture for --random-init without a checkpoint (default small)")
    k.add_argument("--patch-size", type=int, help="patch size for --random-init without a checkpoint (default 16)")
    k.add_argument("--encoder", choices=("auto", "teacher", "student"), default="auto",
                   help="which encoder of a checkpoint (auto: the one the method evaluates: DINO's teacher, "
                        "SimCLR's and CLIP's student, the same for their AB variants)")
    k.add_argument("--pool", choices=("cls", "avg"),
                   help="features: the class token or the mean patch token (default: the run's eval.pool, the "
                        "pooling its own k-NN used; cls without a checkpoint)")
    k.add_argument("--image-size", type=int, help="eval resolution (default: the model's img_size)")
    k.add_argument("--load-size", type=int, help="decode size of the sources (default: the eval resolution)")
    k.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="skip images with more pixels to decode, as data.max_pixels does in training")
    k.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    k.add_argument("--temperature", type=float, default=0.07,
                   help="a neighbour at cosine similarity s votes exp(s / T) (default 0.07)")
    k.add_argument("--batch-size", type=int, default=256, help="images per encoder pass (default 256)")
    k.add_argument("--num-workers", type=int, default=0, help="data loader processes (default 0)")
    k.add_argument("--seed", type=int, help="seed of --random-init's weights (default: a run's train.seed, so "
                                            "that the floor is the run's own; 0 for an export or a peer's file)")
    k.add_argument("--json", action="store_true", help="end with one JSON line {\"knn_top1\": ...}")
    k.set_defaults(func=cmd_eval_knn)

    a = eval_sub.add_parser("all", help="run an evaluation suite (YAML) and write JSON + a Markdown report")
    _add_suite_arguments(a)
    a.add_argument("--suite", required=True, help="suite YAML: image_size, seed, probes: {linear: {...}, ...}")
    a.add_argument("--out", help="report folder (default runs/eval-<time>)")
    a.set_defaults(func=cmd_eval_all)
    verbs = {
        "linear": ("linear probe: BatchNorm + linear on cls/avg features, lr and pool chosen on held-out train",
                   ("train", "test")),
        "attentive": ("attentive (MAP) probe: attention pooling over frozen patch tokens", ("train", "test")),
        "decoder": ("decoder probe: image classification + box-conditioned object classification",
                    ("train", "test")),
        "fewshot": ("N-way K-shot prototypical episodes (mean and 95%% interval)", ("data",)),
        "discovery": ("object discovery from the last block's cls attention: CorLoc, Jaccard, pictures",
                      ("data",)),
        "segment": ("linear segmentation probe on patch tokens, mIoU with an ignore index", ("train", "test")),
    }
    for verb, (text, specs) in verbs.items():
        v = eval_sub.add_parser(verb, help=text)
        _add_suite_arguments(v)
        for spec in specs:
            v.add_argument(f"--{spec}", required=True, help=f"data SPEC of the {spec} images")
        v.add_argument("--image-size", type=int, help="eval resolution (default: the encoder's img_size)")
        v.add_argument("--load-size", type=int, help="decode size of the sources (default: the eval resolution)")
        v.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="a probe option (repeatable), e.g. --set epochs=10 --set lrs=[0.001,0.01]")
        v.add_argument("--out", help="also write results.json, report.md and pictures here")
        v.set_defaults(func=cmd_eval_probe)

    z = eval_sub.add_parser("zeroshot", help="zero-shot classification from class-name prompts (CLIP, SLIP, SiLC, "
                                             "AB_CLIP and LiT runs): top-1 / top-5")
    _add_checkpoint_argument(z, "run directory (or its checkpoint file, with tokenizer.json beside it)")
    z.add_argument("--data", required=True, help="labelled data SPEC whose classes are named (a .jsonl manifest "
                                                 "with class-name labels, synthetic:scenes)")
    z.add_argument("--templates", metavar="FILE", help="prompt templates, one per line with {} for the class name "
                                                       "(replaces the default set of 8 CLIP templates)")
    z.add_argument("--image-size", type=int, help="eval resolution (default: the run's crop size)")
    z.add_argument("--batch-size", type=int, default=256, help="images per encoder pass (default 256)")
    z.add_argument("--num-workers", type=int, default=0, help="data loader processes (default 0)")
    z.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    z.set_defaults(func=cmd_eval_zeroshot)

    p = sub.add_parser("export", help="write the encoder alone (timm-compatible with --timm)")
    _add_checkpoint_argument(p, "run directory or checkpoint file")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--timm", action="store_true", help="write exactly the state dict timm's ViT loads")
    p.add_argument("--encoder", choices=("auto", "teacher", "student"), default="auto",
                   help="which encoder of the run (auto: the one its evaluations read; DINO's teacher)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="short pre-training + k-NN vs random init on embedded synthetic scenes")
    p.add_argument("--out", help="run directory (default runs/demo-<time>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plot", help="plot a run's metrics (loss, k-NN, bootstrap agreement per IoU bucket, "
                                    "neighbour ratio), an MAE run's reconstructions (--reconstructions IMAGES) "
                                    "or an AdaSim run's sampled partners (--neighbours K)")
    p.add_argument("run", help="run directory (holding metrics.jsonl; with --reconstructions, its checkpoint)")
    p.add_argument("--out", help="output PNG (default <run>/metrics.png, <run>/reconstructions.png or "
                                 "<run>/neighbours.png)")
    p.add_argument("--reconstructions", metavar="IMAGES",
                   help="instead of the metrics, draw an MAE run's original / masked / reconstruction of the "
                        "first --count images of the data SPEC IMAGES")
    p.add_argument("--count", type=int, help="images in --reconstructions (default 8)")
    p.add_argument("--seed", type=int, help="seed of the --reconstructions masks (default 0)")
    p.add_argument("--neighbours", type=int, metavar="K",
                   help="instead of the curves: K query images with their candidate partners and sampling "
                        "probabilities (adasim_* / nn_* runs) -> <run>/neighbours.png")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("vocab", help="label vocabularies for weakly-supervised pre-training (WSP)")
    vocab_sub = p.add_subparsers(dest="vocab_command", required=True)
    v = vocab_sub.add_parser("build", help="a vocabulary of the most frequent caption words and hashtags "
                                           "(stop words removed, plurals and synonyms folded)")
    v.add_argument("captions", nargs="+", help="caption files: .jsonl (one image per line with 'captions' or "
                                               "'caption', e.g. a manifest) or .txt (one caption per line), "
                                               "optionally .gz")
    v.add_argument("--size", type=int, required=True, help="number of labels N (the most frequent)")
    v.add_argument("--out", required=True, help="vocabulary file to write (text: 'label: synonym, ...')")
    v.add_argument("--stop-words", action="append", metavar="FILE",
                   help="more stop words, whitespace-separated (repeatable); a built-in English list always applies")
    v.add_argument("--synonyms", metavar="FILE", help="synonym groups in the vocabulary format ('label: term, "
                                                      "term'), folded into their label")
    v.add_argument("--min-count", type=int, default=1, help="leave out labels held by fewer images (default 1)")
    v.set_defaults(func=cmd_vocab_build)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser):
    """The parsers of the commands themselves (``eval linear``, not ``eval``)."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield parser
    for action in subcommands:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line. An option the command does not take is reported by that command's parser,
    with its own usage (``wildssl eval linear: error: unrecognized arguments: --run``), not the top level's."""
    parser = build_parser()
    for leaf in _leaf_parsers(parser):
        leaf.set_defaults(command_parser=leaf)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _merge_checkpoint(args.command_parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    _configure_logging()
    try:
        return args.func(args)
    except WildsslError as error:
        print(f"wildssl: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # a place that cannot be read or written, met where no check named it first
        where = f": {error.filename}" if error.filename else ""
        print(f"wildssl: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not _a_peer_stopped(error):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"wildssl: error: rank {os.environ.get('RANK', '?')} stopped because another process of this torchrun "
              f"launch did (its error is the one to read; here the communication failed: {first[:200]})",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        message = str(interrupt) or "interrupted"
        if _first_process():  # every rank was interrupted at the same step, with the same checkpoint
            print(f"wildssl: {message}", file=sys.stderr)
        return 128 + int(getattr(interrupt, "signal_number", 2))  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
