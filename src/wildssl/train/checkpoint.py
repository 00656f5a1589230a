"""Checkpoints in safetensors, written atomically, loaded strictly.

A training checkpoint is one ``.safetensors`` file: the method's state (student, teacher, buffers), the
optimizer's tensors (``optimizer.state.<param>.<name>``) and RNG states, with the step, the resolved
config and the optimizer's non-tensor state as JSON in the file's metadata. No pickle anywhere, so a
checkpoint from an untrusted source cannot run code when it is opened.

Writes go to ``<name>.tmp`` first and are then renamed over the old file: an interrupted write (Ctrl-C,
a full disk, a killed job) leaves the previous checkpoint intact.

Wherever a checkpoint is asked for, three things are accepted (:func:`resolve_checkpoint`): a run
directory (its latest checkpoint), a checkpoint file, or an encoder export (:func:`save_encoder_export`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from wildssl.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "wildssl-checkpoint"
EXPORT_FORMAT = "wildssl-encoder"


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata=metadata)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the metadata of a safetensors file, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error} (is it a complete .safetensors "
                              "file written by wildssl?)") from None
    return tensors, metadata


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


# ----------------------------------------------------------------------------- training checkpoints

def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, _, index, name = key.split(".", 3)
        state.setdefault(int(index), {})[name] = value
    for index, entry in info["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": info["param_groups"]}


def save_training_checkpoint(path: Path, method: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             step: int, config: dict, extra: dict | None = None) -> None:
    """Save everything exact resume needs: method state, optimizer, RNG states, step, config.

    The data position is the step itself: batches are a pure function of (seed, step) (see
    :class:`wildssl.train.engine.StepBatchSampler`), as are the views (seeded per step).
    """
    tensors = {f"method.{k}": v for k, v in method.state_dict().items()}
    optim_tensors, optim_info = _optimizer_to_flat(optimizer)
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = value
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": str(step),
        "config": json.dumps(config),
        "optimizer": json.dumps(optim_info),
        "extra": json.dumps(extra or {}),
    }
    atomic_save(tensors, metadata, Path(path))


def load_training_checkpoint(path: Path, method: torch.nn.Module,
                             optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore method (strictly), optimizer and RNG states; returns ``{"step", "config", "extra"}``."""
    path = resolve_checkpoint(path)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a wildssl training checkpoint "
                              f"(format {metadata.get('format')!r}); exports cannot be resumed")
    method_state = {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")}
    load_state_strict(method, method_state, str(path))
    if optimizer is not None:
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        try:
            optimizer.load_state_dict(_optimizer_from_flat(optim_tensors, json.loads(metadata["optimizer"])))
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"optimizer state in {path} does not match this model: {error}") from None
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return {"step": int(metadata["step"]), "config": json.loads(metadata["config"]),
            "extra": json.loads(metadata.get("extra", "{}"))}


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


# ----------------------------------------------------------------------------- encoders and exports

def _encoder_prefix(keys: set[str], teacher: bool | None, where: str) -> str:
    has_teacher = any(k.startswith("method.teacher.backbone.") for k in keys)
    if teacher is None:
        teacher = has_teacher
    if teacher and not has_teacher:
        raise CheckpointError(f"{where} has no teacher encoder (this method trains without one); "
                              "use the student")
    return "method.teacher.backbone." if teacher else "method.student.backbone."


def encoder_state_from_checkpoint(path: str | Path, teacher: bool | None = None
                                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """The encoder's state dict and model config from a run dir, checkpoint or export.

    ``teacher=None`` picks the EMA teacher where there is one (as the DINO papers report), else the student.
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
    prefix = _encoder_prefix(set(tensors), teacher, str(path))
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return state, config["model"]


def build_encoder_from_config(model_config: dict):
    from wildssl.models.vit import build_encoder

    return build_encoder(**model_config)


def load_encoder(path: str | Path, teacher: bool | None = None):
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


def save_encoder_export(path: Path, checkpoint: str | Path, teacher: bool | None = None,
                        timm: bool = False) -> dict:
    """Write the encoder alone. ``timm=True`` drops wildssl-only keys (``mask_token``) so the file is a
    state dict timm's VisionTransformer loads with the kwargs stored in the metadata (``timm_kwargs``)."""
    from wildssl.models.export import timm_kwargs, timm_state_dict

    state, model_config = encoder_state_from_checkpoint(checkpoint, teacher)
    encoder = build_encoder_from_config(model_config)
    load_state_strict(encoder, state, str(checkpoint))
    tensors = timm_state_dict(encoder) if timm else dict(encoder.state_dict())
    kwargs = timm_kwargs(encoder)
    metadata = {"format": EXPORT_FORMAT, "config": json.dumps({"model": model_config}),
                "timm_kwargs": json.dumps(kwargs)}
    atomic_save(tensors, metadata, Path(path))
    return kwargs
