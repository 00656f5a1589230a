from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from wildssl.models.export import timm_kwargs, timm_state_dict
from wildssl.models.vit import VisionTransformer, build_encoder

# Keys of timm's VisionTransformer(depth=2, num_classes=0, class_token=True, global_pool="token",
# qkv_bias=True, init_values=None, pre_norm=False, fc_norm=False), written from timm's module layout:
# norm_pre / fc_norm / head / ls1 / ls2 / q_norm / k_norm are Identity there and hold no parameters.
TIMM_BLOCK_KEYS = [
    "norm1.weight", "norm1.bias",
    "attn.qkv.weight", "attn.qkv.bias",
    "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
]
TIMM_KEYS_2_BLOCKS = (
    ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    + [f"blocks.{i}.{key}" for i in range(2) for key in TIMM_BLOCK_KEYS]
    + ["norm.weight", "norm.bias"]
)
TIMM_KEYS_2_BLOCKS_REGISTERS = ["reg_token"] + TIMM_KEYS_2_BLOCKS


@pytest.mark.parametrize("registers,expected", [(0, TIMM_KEYS_2_BLOCKS), (4, TIMM_KEYS_2_BLOCKS_REGISTERS)])
def test_export_keys_match_timm_exactly(registers, expected):
    encoder = build_encoder("tiny", depth=2, num_register_tokens=registers)
    state = timm_state_dict(encoder)
    assert sorted(state) == sorted(expected)
    assert len(state) == len(expected)


def test_export_shapes_follow_timm_no_embed_class_layout():
    encoder = build_encoder("tiny", depth=2, patch_size=16, img_size=64, num_register_tokens=4)
    state = timm_state_dict(encoder)
    assert state["cls_token"].shape == (1, 1, 192)
    assert state["reg_token"].shape == (1, 4, 192)
    assert state["pos_embed"].shape == (1, 16, 192)  # patches only: no_embed_class=True
    assert state["patch_embed.proj.weight"].shape == (192, 3, 16, 16)
    assert state["blocks.1.attn.qkv.weight"].shape == (576, 192)


def test_export_tensors_are_detached_contiguous_cpu_copies_of_the_weights():
    encoder = build_encoder("tiny", depth=1, img_size=32)
    state = timm_state_dict(encoder)
    params = dict(encoder.named_parameters())
    for name, tensor in state.items():
        assert tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.requires_grad
        assert torch.equal(tensor, params[name])
    assert "mask_token" in params and "mask_token" not in state


def test_export_unwraps_ddp_and_compile_style_wrappers():
    encoder = build_encoder("tiny", depth=1, img_size=32)

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module, attribute: str) -> None:
            super().__init__()
            setattr(self, attribute, inner)

    wrapped = Wrapper(Wrapper(encoder, "_orig_mod"), "module")
    assert sorted(timm_state_dict(wrapped)) == sorted(timm_state_dict(encoder))
    assert timm_kwargs(wrapped) == timm_kwargs(encoder)
    with pytest.raises(TypeError):
        timm_state_dict(nn.Linear(2, 2))


def test_timm_kwargs_describe_the_encoder_and_rebuild_it():
    encoder = build_encoder("small", depth=2, patch_size=14, img_size=56, num_register_tokens=4)
    kwargs = json.loads(json.dumps(timm_kwargs(encoder)))  # JSON-safe: stored in export metadata
    assert kwargs["img_size"] == 56 and kwargs["patch_size"] == 14
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]) == (384, 2, 6)
    assert kwargs["reg_tokens"] == 4 and kwargs["no_embed_class"] is True
    assert kwargs["class_token"] is True and kwargs["global_pool"] == "token"
    assert kwargs["num_classes"] == 0 and kwargs["dynamic_img_size"] is True
    assert kwargs["init_values"] is None and kwargs["qkv_bias"] is True and kwargs["mlp_ratio"] == 4.0

    rebuilt = VisionTransformer(img_size=kwargs["img_size"], patch_size=kwargs["patch_size"],
                                embed_dim=kwargs["embed_dim"], depth=kwargs["depth"],
                                num_heads=kwargs["num_heads"], mlp_ratio=kwargs["mlp_ratio"],
                                num_register_tokens=kwargs["reg_tokens"], in_chans=kwargs["in_chans"])
    missing = rebuilt.load_state_dict(timm_state_dict(encoder), strict=False)
    assert missing.missing_keys == ["mask_token"] and missing.unexpected_keys == []
    x = torch.randn(1, 3, 28, 42)
    torch.testing.assert_close(rebuilt.forward_features(x), encoder.forward_features(x))


def test_an_export_refuses_a_network_choice_it_cannot_honour(tmp_path):
    """`--encoder student` (teacher=False) on an export of DINO's teacher read the teacher without a word: an
    export holds one encoder. model.init_from from an export still reads it (the student of a run otherwise)."""
    from conftest import tiny_config
    from wildssl.errors import CheckpointError
    from wildssl.models.export import save_encoder_export
    from wildssl.models.loading import load_encoder
    from wildssl.train.engine import train

    train(tiny_config("dino", "train.steps=1"), tmp_path / "run")
    save_encoder_export(tmp_path / "teacher.safetensors", tmp_path / "run")
    for teacher in (False, True):
        with pytest.raises(CheckpointError, match="is an export: it holds one encoder"):
            load_encoder(tmp_path / "teacher.safetensors", teacher=teacher)
    assert load_encoder(tmp_path / "teacher.safetensors") is not None
    config = tiny_config("dino", "train.steps=1", f"model.init_from={tmp_path / 'teacher.safetensors'}")
    train(config, tmp_path / "from_export")


def test_a_timm_export_exports_again_as_every_evaluation_reads_it(tmp_path):
    """Exporting a `--timm` export failed with "missing 1 keys (e.g. mask_token)", though every eval verb reads it."""
    import torch
    from conftest import tiny_config
    from wildssl.models.export import save_encoder_export
    from wildssl.models.loading import load_encoder
    from wildssl.train.engine import train

    train(tiny_config("simclr", "train.steps=1"), tmp_path / "run")
    save_encoder_export(tmp_path / "timm.safetensors", tmp_path / "run", timm=True)
    save_encoder_export(tmp_path / "again.safetensors", tmp_path / "timm.safetensors")
    first, again = load_encoder(tmp_path / "timm.safetensors"), load_encoder(tmp_path / "again.safetensors")
    assert all(torch.equal(first.state_dict()[k], v) for k, v in again.state_dict().items())
