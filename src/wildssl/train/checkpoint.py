"""Training checkpoints: everything exact resume needs, in one safetensors file.

A training checkpoint holds the method's state (student, teacher, buffers), the optimizer's tensors
(``optimizer.state.<param>.<name>``) and RNG states, with the step, the resolved config and the
optimizer's non-tensor state as JSON in the file's metadata. It is written atomically
(:func:`wildssl.io.atomic_save`) and loaded strictly. Loading encoders from it is the library's job
(:mod:`wildssl.models.loading`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from wildssl.errors import CheckpointError
from wildssl.io import atomic_save, nonfinite_names, read_safetensors
from wildssl.models.loading import CHECKPOINT_FORMAT, CHECKPOINT_NAME, load_state_strict, metadata_json, resolve_checkpoint

__all__ = ["CHECKPOINT_NAME", "save_training_checkpoint", "load_training_checkpoint", "nonfinite_tensors"]


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


def run_eval_network(method: torch.nn.Module, config: dict) -> str:
    """The network the run evaluates, which its checkpoint records for ``load_encoder``, ``export`` and the eval
    commands: ``eval.encoder`` when it names one (DINO with ``eval.encoder=student``), else the method's own."""
    chosen = config.get("eval", {}).get("encoder", "auto")
    return chosen if chosen in ("teacher", "student") else getattr(method, "eval_network", "student")


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
        "eval_network": run_eval_network(method, config),
        "config": json.dumps(config),
        "optimizer": json.dumps(optim_info),
        "extra": json.dumps(extra or {}),
    }
    atomic_save(tensors, metadata, Path(path))


def load_training_checkpoint(path: Path, method: torch.nn.Module,
                             optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore method (strictly), optimizer and RNG states; returns ``{"step", "config", "extra"}``.

    A checkpoint whose metadata is damaged, or whose tensors hold a NaN or an infinity (which wildssl never
    writes), is refused with a one-line CheckpointError before anything is restored."""
    path = resolve_checkpoint(path)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a wildssl training checkpoint "
                              f"(format {metadata.get('format')!r}); exports cannot be resumed")
    config = metadata_json(metadata, "config", path)
    optimizer_info = metadata_json(metadata, "optimizer", path)
    extra = metadata_json(metadata, "extra", path) if "extra" in metadata else {}
    step = metadata.get("step", "")
    if not step.isdigit():
        raise CheckpointError(f"{path}: its metadata holds step {step!r}, not a step number")
    bad = nonfinite_names(tensors)
    if bad:
        raise CheckpointError(f"{path} holds non-finite values (NaN or infinity) in {len(bad)} tensors (e.g. "
                              f"{bad[0]}); resume from an earlier checkpoint of the run")
    if "rng.torch" not in tensors:
        raise CheckpointError(f"{path} has no RNG state (rng.torch); it cannot be resumed exactly")
    method_state = {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")}
    load_state_strict(method, method_state, str(path))
    if optimizer is not None:
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        try:
            optimizer.load_state_dict(_optimizer_from_flat(optim_tensors, optimizer_info))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"optimizer state in {path} does not match this model: {error}") from None
    try:
        torch.set_rng_state(tensors["rng.torch"])
    except (RuntimeError, TypeError) as error:
        raise CheckpointError(f"{path}: its RNG state cannot be restored: {error}") from None
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return {"step": int(step), "config": config, "extra": extra}


def nonfinite_tensors(method: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the floating-point tensors of ``method`` (and the optimizer's state) holding a NaN or an
    infinity; empty when everything is finite. Checked before every checkpoint write."""
    named = [(f"method.{k}", v) for k, v in method.state_dict().items()]
    if optimizer is not None:
        named += [(f"optimizer.{id(p)}.{k}", v) for p, state in optimizer.state.items() for k, v in state.items()
                  if torch.is_tensor(v)]
    return nonfinite_names(dict(named))
