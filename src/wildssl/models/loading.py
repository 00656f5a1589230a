"""Load encoders from wildssl checkpoints and exports: the library side of checkpoints.

Wherever a checkpoint is asked for, three things are accepted (:func:`resolve_checkpoint`): a run
directory (its latest checkpoint), a training checkpoint file, or an encoder export
(:func:`wildssl.models.export.save_encoder_export`). Loading is strict: every key must match.

A file is checked before anything is allocated for it: its metadata (JSON, the model section's keys and
values), then the name and shape of every encoder tensor in its header against the encoder its config
declares, built on the meta device. A ~100-byte file that declares a 6.5B-parameter encoder therefore
fails at once, in one line, and weights holding NaN or infinity are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wildssl.errors import CheckpointError, ConfigError
from wildssl.io import nonfinite_names, read_header, read_tensors
from wildssl.models.vit import VisionTransformer, build_encoder
from wildssl.schema import CORE_RULES, check_value

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "wildssl-checkpoint"
EXPORT_FORMAT = "wildssl-encoder"
EVAL_NETWORKS = ("teacher", "student")
POOLS = ("cls", "avg")  # the features an encoder is read by: the class token or the mean patch token
# A train.sharding=fsdp run keeps its checkpoint as a DCP folder (wildssl.train.fsdp), whose run state file is
# written last: evaluations read one file, which `wildssl export` consolidates from it.
SHARDED_CHECKPOINT = "checkpoint.dcp"
RUN_STATE = "wildssl.json"  # step, config, eval_network and the run's counters, beside the DCP files


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory -> its latest checkpoint; a file -> itself; anything else -> CheckpointError."""
    path = Path(path)
    if path.is_dir():
        candidate = path / CHECKPOINT_NAME
        if not candidate.is_file() and ((path / SHARDED_CHECKPOINT / RUN_STATE).is_file()
                                        or (path / RUN_STATE).is_file()):
            raise CheckpointError(f"{path} holds a checkpoint of a train.sharding=fsdp run: a sharded folder, which "
                                  "evaluations do not read; write its encoder to one file with `wildssl export "
                                  f"--checkpoint {path} --out encoder.safetensors` and give that file")
        if not candidate.is_file():
            raise CheckpointError(f"no checkpoint in run directory {path} (expected {candidate.name}; "
                                  "has the run saved one yet?)")
        return candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (give a run directory, a checkpoint file "
                              "or an export)")
    return path


def metadata_json(metadata: dict[str, str], key: str, path: Path, expected: type = dict):
    """The JSON value stored under ``key`` in a file's metadata, of type ``expected``; a missing, malformed
    or mistyped entry (a tampered or foreign file) is a one-line CheckpointError."""
    if key not in metadata:
        raise CheckpointError(f"{path} has no {key!r} entry in its metadata (not written by wildssl?)")
    try:
        value = json.loads(metadata[key])
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: the {key!r} entry of its metadata is not valid JSON (a damaged or "
                              "edited file?)") from None
    if not isinstance(value, expected):
        raise CheckpointError(f"{path}: the {key!r} entry of its metadata is a JSON {type(value).__name__}, "
                              f"expected {'an object' if expected is dict else expected.__name__}")
    return value


def read_checkpoint_config(path: str | Path) -> dict:
    """The resolved config stored in a checkpoint or export's metadata (a JSON object)."""
    path = resolve_checkpoint(path)
    metadata, _ = read_header(path)
    return metadata_json(metadata, "config", path)


MODEL_KEYS = tuple(key[len("model."):] for key in CORE_RULES if key.startswith("model."))


def model_config_from_metadata(metadata: dict[str, str], path: Path) -> dict:
    """The ``model`` section of a file's config, every key known and every value of the right type and
    range (the same rules as a config, :mod:`wildssl.schema`); one-line CheckpointError otherwise."""
    config = metadata_json(metadata, "config", path)
    if "model" not in config:
        raise CheckpointError(f"{path}: its config has no 'model' section (not written by wildssl?)")
    model = config["model"]
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: the 'model' section of its config is a JSON {type(model).__name__}, "
                              "expected an object")
    unknown = sorted(set(model) - set(MODEL_KEYS))
    if unknown:
        raise CheckpointError(f"{path}: its config has unknown model key {unknown[0]!r} (known: "
                              f"{', '.join(MODEL_KEYS)}); written by another wildssl version, or edited?")
    try:
        return {key: check_value(f"model.{key}", value, CORE_RULES[f"model.{key}"]) for key, value in model.items()}
    except ConfigError as error:
        raise CheckpointError(f"{path}: its config is invalid: {error}") from None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error listing a few missing/unexpected keys."""
    check_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()},
                 {k: tuple(v.shape) for k, v in state.items()}, where)
    module.load_state_dict(state, strict=True)


def _encoder_prefix(keys: set[str], teacher: bool | None, default_network: str, where: str) -> str:
    if default_network not in EVAL_NETWORKS:
        raise CheckpointError(f"{where}: its metadata names eval_network {default_network!r}; expected one of "
                              f"{', '.join(EVAL_NETWORKS)}")
    has_teacher = any(k.startswith("method.teacher.backbone.") for k in keys)
    if teacher is None:
        teacher = default_network == "teacher" and has_teacher
    if teacher and not has_teacher:
        raise CheckpointError(f"{where} has no teacher encoder (this method trains without one); "
                              "use the student")
    return "method.teacher.backbone." if teacher else "method.student.backbone."


def _file_format(metadata: dict[str, str], path: Path) -> str:
    fmt = metadata.get("format")
    if fmt not in (CHECKPOINT_FORMAT, EXPORT_FORMAT):
        raise CheckpointError(f"{path} has unknown format {fmt!r} (expected {CHECKPOINT_FORMAT!r} or "
                              f"{EXPORT_FORMAT!r}: not written by wildssl?)")
    return fmt


def _checked_encoder(path: str | Path, teacher: bool | None) -> tuple[Path, dict, dict[str, str]]:
    """Resolve ``path`` and check it without reading tensor data: its metadata, then the name and shape of
    every encoder tensor in its header against the encoder its config declares (built on the meta device).
    Returns the file, the checked model config and the encoder's names -> the file's tensor names."""
    path = resolve_checkpoint(path)
    metadata, shapes = read_header(path)
    fmt = _file_format(metadata, path)
    model_config = model_config_from_metadata(metadata, path)
    if fmt == EXPORT_FORMAT:
        if teacher is not None:  # was ignored: --encoder student on a teacher's export read the teacher
            raise CheckpointError(f"{path} is an export: it holds one encoder, chosen when it was exported, so "
                                  f"{'the teacher' if teacher else 'the student'} cannot be picked from it "
                                  "(--encoder / teacher= apply to a run or checkpoint; leave them at auto here)")
        names = {key: key for key in shapes}
    else:
        # The method's own evaluation network (recorded since wildssl 0.1; older checkpoints: the teacher
        # where there is one).
        prefix = _encoder_prefix(set(shapes), teacher, metadata.get("eval_network", "teacher"), str(path))
        names = {key[len(prefix):]: key for key in shapes if key.startswith(prefix)}
    expected = encoder_shapes(model_config, path)
    if fmt == EXPORT_FORMAT:  # a timm-style export leaves out the wildssl-only mask token
        expected = {k: v for k, v in expected.items() if k != "mask_token" or k in names}
    check_shapes(expected, {short: shapes[full] for short, full in names.items()}, str(path))
    return path, model_config, names


def checkpoint_model_config(path: str | Path, teacher: bool | None = None) -> dict:
    """The checked ``model`` config of a run directory, checkpoint or export whose header holds that
    encoder; no tensor data is read."""
    return _checked_encoder(path, teacher)[1]


def encoder_state_from_checkpoint(path: str | Path, teacher: bool | None = None
                                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """The encoder's state dict and model config from a run dir, checkpoint or export.

    ``teacher=None`` picks the network the method evaluates (``eval_network`` in the checkpoint's metadata:
    the EMA teacher for DINO, the student for SimCLR and CLIP, the same for their AB variants).

    Nothing is allocated before the file is known to fit: the metadata is checked, the encoder it declares
    is built on the meta device (no memory) and every tensor's name and shape in the file's header is
    compared with it; only then are the encoder's tensors read (the rest of a training checkpoint is not).
    Weights holding a NaN or an infinity are refused. Every failure is a one-line CheckpointError.
    """
    if teacher is not None and not isinstance(teacher, bool):  # "no" would read as true
        raise ConfigError(f"teacher={teacher!r}: give True (the EMA teacher), False (the student) or None (the "
                          "network the run evaluates)")
    path, model_config, names = _checked_encoder(path, teacher)
    tensors = read_tensors(path, list(names.values()))
    state = {short: tensors[full] for short, full in names.items()}
    bad = nonfinite_names(state)
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights (NaN or infinity) in {len(bad)} of {len(state)} "
                              f"encoder tensors (e.g. {bad[0]}); it cannot be used: take an earlier checkpoint "
                              "of the run (checkpoint_NNNNNNN.safetensors)")
    return state, model_config


def encoder_shapes(model_config: dict, path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the encoder ``model_config`` declares, built on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            encoder = build_encoder_from_config(model_config)
    except ConfigError as error:
        raise CheckpointError(f"{path}: its config declares an encoder that cannot be built: {error}") from None
    return {name: tuple(tensor.shape) for name, tensor in encoder.state_dict().items()}


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    """Names and shapes of a state dict (``found``, from a file's header) against a model's (``expected``);
    a one-line CheckpointError listing a few missing, unexpected or misshapen tensors."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"checkpoint {where} does not match the model: {'; '.join(parts)}")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise CheckpointError(f"checkpoint {where} does not match the model: {key} has shape "
                                  f"{tuple(found[key])}, the model expects {tuple(shape)}")


ARCHITECTURE_KEYS = ("name", "patch_size", "img_size", "num_register_tokens", "drop_path_rate", "depth",
                     "embed_dim", "num_heads")


def build_encoder_from_config(model_config: dict) -> VisionTransformer:
    """The encoder a config's ``model`` section names, at its initial weights (keys that are not the
    architecture, such as ``init_from``, are ignored here). Each value is checked by its ``model.*`` rule, as in a
    recipe, so a hand-built dict with ``patch_size: "16"`` is a one-line ConfigError."""
    from wildssl.schema import CORE_RULES, check_value

    architecture = {k: model_config[k] for k in ARCHITECTURE_KEYS if k in model_config}
    for key, value in architecture.items():
        if f"model.{key}" in CORE_RULES:
            architecture[key] = check_value(f"model.{key}", value, CORE_RULES[f"model.{key}"])
    return build_encoder(**architecture)


def evaluated_network(path: str | Path, teacher: bool | None = None) -> str:
    """Which network :func:`load_encoder` takes from ``path``: ``"teacher"``, ``"student"`` or ``"export"``."""
    path = resolve_checkpoint(path)
    metadata, shapes = read_header(path)
    if _file_format(metadata, path) == EXPORT_FORMAT:
        return "export"
    prefix = _encoder_prefix(set(shapes), teacher, metadata.get("eval_network", "teacher"), str(path))
    return "teacher" if prefix.startswith("method.teacher") else "student"


def evaluated_pool(path: str | Path) -> str | None:
    """The feature the run behind ``path`` evaluates (its config's ``eval.pool``: ``cls`` or ``avg``; an export
    keeps it), or None when the file does not say."""
    pool = read_checkpoint_config(path).get("eval", {}).get("pool")
    return pool if pool in POOLS else None


def load_encoder(path: str | Path, teacher: bool | None = None) -> VisionTransformer:
    """Build the encoder named in the checkpoint's config and load its weights strictly.

    Returns a :class:`wildssl.models.vit.VisionTransformer` in eval mode whose ``forward_features(x)``
    gives all tokens ``(B, prefix + patches, width)`` as timm's does.
    """
    state, model_config = encoder_state_from_checkpoint(path, teacher)
    encoder = build_encoder_from_config(model_config)
    if "mask_token" not in state and "mask_token" in encoder.state_dict():
        state = {**state, "mask_token": encoder.state_dict()["mask_token"]}  # timm-style export
    load_state_strict(encoder, state, str(path))
    return encoder.eval()
