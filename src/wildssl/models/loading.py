"""Load encoders from wildssl checkpoints and exports: the library side of checkpoints.

Wherever a checkpoint is asked for, three things are accepted (:func:`resolve_checkpoint`): a run
directory (its latest checkpoint), a training checkpoint file, or an encoder export
(:func:`wildssl.models.export.save_encoder_export`). Loading is strict: every key must match.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from wildssl.errors import CheckpointError
from wildssl.io import read_safetensors
from wildssl.models.vit import VisionTransformer, build_encoder

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "wildssl-checkpoint"
EXPORT_FORMAT = "wildssl-encoder"


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory -> its latest checkpoint; a file -> itself; anything else -> CheckpointError."""
    path = Path(path)
    if path.is_dir():
        candidate = path / CHECKPOINT_NAME
        if not candidate.is_file():
            raise CheckpointError(f"no checkpoint in run directory {path} (expected {candidate.name}; "
                                  "has the run saved one yet?)")
        return candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (give a run directory, a checkpoint file "
                              "or an export)")
    return path


def read_checkpoint_config(path: str | Path) -> dict:
    """The resolved config stored in a checkpoint or export's metadata."""
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if "config" not in metadata:
        raise CheckpointError(f"{path} has no wildssl config in its metadata (not written by wildssl?)")
    return json.loads(metadata["config"])


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error listing a few missing/unexpected keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"checkpoint {where} does not match the model: {'; '.join(parts)}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise CheckpointError(f"checkpoint {where} does not match the model: {key} has shape "
                                  f"{tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
    module.load_state_dict(state, strict=True)


def _encoder_prefix(keys: set[str], teacher: bool | None, default_network: str, where: str) -> str:
    has_teacher = any(k.startswith("method.teacher.backbone.") for k in keys)
    if teacher is None:
        teacher = default_network == "teacher" and has_teacher
    if teacher and not has_teacher:
        raise CheckpointError(f"{where} has no teacher encoder (this method trains without one); "
                              "use the student")
    return "method.teacher.backbone." if teacher else "method.student.backbone."


def encoder_state_from_checkpoint(path: str | Path, teacher: bool | None = None
                                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """The encoder's state dict and model config from a run dir, checkpoint or export.

    ``teacher=None`` picks the network the method evaluates (``eval_network`` in the checkpoint's metadata:
    the EMA teacher for DINO, the student for SimCLR and CLIP, the same for their AB variants).
    """
    path = resolve_checkpoint(path)
    tensors, metadata = read_safetensors(path)
    if "config" not in metadata:
        raise CheckpointError(f"{path} has no wildssl config in its metadata (not written by wildssl?)")
    config = json.loads(metadata["config"])
    fmt = metadata.get("format")
    if fmt == EXPORT_FORMAT:
        return tensors, config["model"]
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has unknown format {fmt!r}")
    # The method's own evaluation network (recorded since wildssl 0.1; older checkpoints: the teacher
    # where there is one).
    prefix = _encoder_prefix(set(tensors), teacher, metadata.get("eval_network", "teacher"), str(path))
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return state, config["model"]


ARCHITECTURE_KEYS = ("name", "patch_size", "img_size", "num_register_tokens", "drop_path_rate", "depth",
                     "embed_dim", "num_heads")


def build_encoder_from_config(model_config: dict) -> VisionTransformer:
    """The encoder a config's ``model`` section names, at its initial weights (keys that are not the
    architecture, such as ``init_from``, are ignored here)."""
    return build_encoder(**{k: model_config[k] for k in ARCHITECTURE_KEYS if k in model_config})


def evaluated_network(path: str | Path, teacher: bool | None = None) -> str:
    """Which network :func:`load_encoder` takes from ``path``: ``"teacher"``, ``"student"`` or ``"export"``."""
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata, keys = handle.metadata() or {}, set(handle.keys())
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if metadata.get("format") == EXPORT_FORMAT:
        return "export"
    prefix = _encoder_prefix(keys, teacher, metadata.get("eval_network", "teacher"), str(path))
    return "teacher" if prefix.startswith("method.teacher") else "student"


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
