"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for encoders too large for one device's memory (MAWS's
ViT-2B and ViT-6.5B): parameters, gradients and optimizer state sharded over the ranks, checkpoints through
``torch.distributed.checkpoint`` (DCP). Launched by ``torchrun`` like every wildssl run, on one node or many.

What it does to a method (:func:`shard_method`):

- every transformer block of every student and teacher network (``module.blocks``: the ViT, the text
  tower, decoders) is its own FSDP unit, so only one block's full weights exist at a time; the rest of the
  method (embeddings, heads, norms, logit scale) is the root unit;
- with ``activation_checkpointing``, each student block recomputes its activations in the backward pass
  (``torch.distributed._composable.checkpoint``) instead of keeping them;
- precision ``bf16``: parameters gathered and computed in bfloat16, gradients reduced in float32
  (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); ``fp32``: everything in float32 (MAWS
  trained ViT-6.5B in full precision for stability).

Checkpoints: :func:`save_sharded` writes one DCP directory (each rank its shards, plus metadata) with the
method, the optimizer and the step; :func:`load_sharded` restores them exactly (on any number of ranks: DCP
reshards); :func:`export_consolidated` turns a DCP directory into one wildssl encoder export file (no
process group needed), which every wildssl evaluation reads.

Status (torch 2.13, CPU/gloo and CUDA/NCCL): this module and its tests (2 gloo processes == 1 process, exact
sharded resume, consolidated export). The engine still wraps with DDP only: selecting FSDP2 by config in
``train/run.py`` (the optimizer and checkpoint paths) is not wired yet.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from wildssl.errors import CheckpointError, ConfigError
from wildssl.io import atomic_save
from wildssl.models.export import timm_kwargs
from wildssl.models.loading import EXPORT_FORMAT, build_encoder_from_config, load_state_strict

PRECISIONS = ("bf16", "fp32")


def _checkpoint_activations(module: nn.Module) -> None:
    from torch.distributed._composable import checkpoint

    checkpoint(module)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """The FSDP2 policy of ``train.precision`` (module docstring)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"FSDP precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_method(method: nn.Module, precision: str = "bf16", activation_checkpointing: bool = True,
                 device_type: str | None = None) -> nn.Module:
    """Shard ``method`` in place over all ranks of the default process group: one FSDP unit per block, the
    rest as the root unit. Call after the method is built and initialized (``model.init_from``) and before
    the optimizer is made: its parameters become DTensors."""
    world = torch.distributed.get_world_size()
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (world,))
    policy = mixed_precision(precision)
    for networks in (method.student, getattr(method, "teacher", None)):
        if networks is None:
            continue
        for module in networks.values():
            for block in getattr(module, "blocks", ()):
                if activation_checkpointing and networks is method.student:
                    _checkpoint_activations(block)
                fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(method, mesh=mesh, mp_policy=policy)
    return method


def save_sharded(directory: str | Path, method: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Write the method, optimizer and step as one DCP checkpoint directory (every rank calls it)."""
    state = {"method": get_model_state_dict(method), "optimizer": get_optimizer_state_dict(method, optimizer),
             "step": torch.tensor(step)}
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(directory: str | Path, method: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore a :func:`save_sharded` directory into a sharded method and its optimizer; returns the step."""
    if not (Path(directory) / ".metadata").is_file():
        raise CheckpointError(f"{directory} is not a sharded (DCP) checkpoint: it has no .metadata file")
    state = {"method": get_model_state_dict(method), "optimizer": get_optimizer_state_dict(method, optimizer),
             "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(method, state["method"])
    set_optimizer_state_dict(method, optimizer, state["optimizer"])
    return int(state["step"])


def full_state(method: nn.Module) -> dict[str, torch.Tensor]:
    """The whole method's state dict, gathered on every rank, on the CPU (every rank calls it)."""
    return get_model_state_dict(method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_consolidated(directory: str | Path, path: str | Path, model_config: dict, network: str = "student") -> None:
    """One wildssl encoder export file (``wildssl export``'s format) from a DCP checkpoint directory: the
    ``network``'s backbone, strictly checked against the encoder ``model_config`` declares. Runs in one
    process, without a process group."""
    with tempfile.TemporaryDirectory() as scratch:
        consolidated = Path(scratch) / "full.pt"
        try:
            dcp_to_torch_save(str(directory), str(consolidated))
        except Exception as error:  # DCP raises several types for a missing or foreign directory
            raise CheckpointError(f"cannot read the sharded checkpoint {directory}: {error}") from None
        state = torch.load(consolidated, map_location="cpu", weights_only=True)["method"]
    prefix = f"{network}.backbone."
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    encoder = build_encoder_from_config(model_config)
    load_state_strict(encoder, encoder_state, str(directory))
    metadata = {"format": EXPORT_FORMAT, "config": json.dumps({"model": model_config}),
                "timm_kwargs": json.dumps(timm_kwargs(encoder))}
    atomic_save({k: v.contiguous() for k, v in encoder.state_dict().items()}, metadata, Path(path))
