"""Peers' checkpoints (timm, official DINO, MAE, MAWS and I-JEPA layouts) load into wildssl's ViT and reproduce a
reference model written here from those code bases' published forward pass (not from wildssl's)."""

import argparse

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from wildssl.errors import CheckpointError
from wildssl.models.peers import load_any_encoder, load_peer_encoder

IMG, PATCH, WIDTH, DEPTH, HEADS = 16, 4, 192, 2, 3  # ViT-Ti width: its heads come from the size table


class ReferenceBlock(nn.Module):
    def __init__(self, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=qkv_bias)
        self.attn.proj = nn.Linear(WIDTH, WIDTH)
        self.norm2 = nn.LayerNorm(WIDTH, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(WIDTH, 4 * WIDTH)
        self.mlp.fc2 = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(b, t, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * (WIDTH // HEADS) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((weights @ v).transpose(1, 2).reshape(b, t, WIDTH))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class ReferenceViT(nn.Module):
    """DINO's / MAE's / timm's ViT (``pos_embed`` over cls, registers and patches) or I-JEPA's (no cls
    token, ``pos_embed`` over the patches only), float64, random non-zero weights."""

    def __init__(self, class_token=True, registers=0, qkv_bias=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        patches = (IMG // PATCH) ** 2
        self.prefix = int(class_token) + registers
        if class_token:
            self.cls_token = nn.Parameter(torch.randn(1, 1, WIDTH))
        if registers:
            self.reg_token = nn.Parameter(torch.randn(1, registers, WIDTH))
        self.pos_embed = nn.Parameter(torch.randn(1, self.prefix * int(class_token) + patches, WIDTH))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, WIDTH, PATCH, PATCH)
        self.blocks = nn.ModuleList(ReferenceBlock(qkv_bias) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH, eps=1e-6)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))
        self.double()

    def forward(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        names = [name for name in ("cls_token", "reg_token") if hasattr(self, name)]
        prefix = [getattr(self, name).expand(len(x), -1, -1) for name in names]
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed if hasattr(self, "cls_token") else x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _state(model, prefix=""):
    return {prefix + k: v.float().clone() for k, v in model.state_dict().items()}


def _assert_reproduces(encoder, reference):
    images = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    expected = reference(images)
    got = encoder.double().forward_features(images)
    torch.testing.assert_close(got, expected.to(got.dtype), atol=1e-4, rtol=1e-4)  # weights stored as float32


def test_timm_layout_with_registers_and_a_classifier_head_reproduces_the_reference(tmp_path):
    reference = ReferenceViT(registers=2)
    state = {**_state(reference), "head.weight": torch.randn(10, WIDTH), "head.bias": torch.zeros(10)}
    save_file(state, str(tmp_path / "model.safetensors"))
    encoder, layout = load_any_encoder(tmp_path / "model.safetensors")
    assert layout == "timm" and encoder.num_register_tokens == 2 and encoder.img_size == IMG
    _assert_reproduces(encoder, reference)


def test_dino_training_checkpoint_layout_gives_teacher_and_student(tmp_path):
    teacher, student = ReferenceViT(seed=1), ReferenceViT(seed=2)
    checkpoint = {"teacher": {**_state(teacher, "backbone."), "head.mlp.0.weight": torch.randn(8, WIDTH)},
                  "student": {**_state(student, "module.backbone."),
                              "module.head.last_layer.weight_g": torch.ones(4, 1)},
                  "epoch": 100}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    encoder, layout = load_any_encoder(tmp_path / "checkpoint.pth")
    assert layout == "dino"
    _assert_reproduces(encoder, teacher)
    _assert_reproduces(load_peer_encoder(tmp_path / "checkpoint.pth", "dino", teacher=False)[0], student)
    torch.save(_state(teacher), tmp_path / "dino_deitsmall16_pretrain.pth")  # the released backbone file
    _assert_reproduces(load_peer_encoder(tmp_path / "dino_deitsmall16_pretrain.pth", "dino")[0], teacher)


def test_mae_layout_drops_the_decoder_and_reproduces_the_reference(tmp_path):
    reference = ReferenceViT(seed=3)
    decoder = {"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, WIDTH),
               "decoder_pos_embed": torch.randn(1, 17, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
               "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.randn(48, 16)}
    torch.save({"model": {**_state(reference), **decoder}}, tmp_path / "mae_visualize.pth")
    encoder, layout = load_any_encoder(tmp_path / "mae_visualize.pth")
    assert layout == "mae" and torch.equal(encoder.mask_token, torch.zeros_like(encoder.mask_token))
    _assert_reproduces(encoder, reference)


def test_maws_clip_checkpoint_layout_keeps_the_image_tower_and_drops_the_text_side(tmp_path):
    # facebookresearch/maws maws_clip files: CLIP(vision_encoder=timm ViT, text_encoder=XLM-R) state dicts.
    reference = ReferenceViT(seed=5)
    text_side = {"vision_projection": torch.randn(WIDTH, 8), "text_projection": torch.randn(16, 8),
                 "logit_scale": torch.tensor(4.6), "text_encoder.encoder.transformer.token_embedding.weight":
                 torch.randn(30, 16), "text_encoder.encoder.transformer.layers.layers.0.attention.in_proj_weight":
                 torch.randn(48, 16)}
    torch.save({**_state(reference, "vision_encoder."), **text_side}, tmp_path / "vit_b16_xlmr_b.pt")
    encoder, layout = load_any_encoder(tmp_path / "vit_b16_xlmr_b.pt")
    assert layout == "maws" and encoder.img_size == IMG and encoder.depth == DEPTH
    _assert_reproduces(encoder, reference)
    # the released ViT-only files (mae / maws types) are plain timm state dicts, readable as either layout
    torch.save(_state(reference), tmp_path / "maws_vit_b16.pt")
    _assert_reproduces(load_peer_encoder(tmp_path / "maws_vit_b16.pt", "maws")[0], reference)
    assert load_any_encoder(tmp_path / "maws_vit_b16.pt")[1] == "timm"


def test_ijepa_layout_without_cls_token_reproduces_the_target_encoder(tmp_path):
    target, context = ReferenceViT(class_token=False, seed=4), ReferenceViT(class_token=False, seed=5)
    checkpoint = {"encoder": _state(context, "module."), "target_encoder": _state(target, "module."),
                  "predictor": {"module.predictor_embed.weight": torch.randn(8, WIDTH)}, "epoch": 300,
                  "opt": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0]}]}}
    torch.save(checkpoint, tmp_path / "IN1K-vit.h.14-300e.pth.tar")
    encoder, layout = load_any_encoder(tmp_path / "IN1K-vit.h.14-300e.pth.tar")
    assert layout == "ijepa" and not encoder.class_token
    _assert_reproduces(encoder, target)
    _assert_reproduces(load_peer_encoder(tmp_path / "IN1K-vit.h.14-300e.pth.tar", "ijepa", teacher=False)[0], context)


def test_vit_without_qkv_bias_gets_a_zero_bias_and_the_same_outputs(tmp_path):
    reference = ReferenceViT(qkv_bias=False, seed=6)
    torch.save(_state(reference), tmp_path / "no_bias.pth")
    _assert_reproduces(load_peer_encoder(tmp_path / "no_bias.pth", "timm")[0], reference)


def test_what_wildssl_cannot_compute_or_read_safely_is_a_one_line_error(tmp_path):
    state = _state(ReferenceViT(seed=7))
    torch.save({**state, "blocks.0.ls1.gamma": torch.ones(WIDTH)}, tmp_path / "layerscale.pth")
    with pytest.raises(CheckpointError, match="ls1.gamma.*LayerScale"):
        load_any_encoder(tmp_path / "layerscale.pth")
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=r"weights_only=True.*Python objects"):
        load_any_encoder(tmp_path / "pickled.pth")
    del state["blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing 1 keys .*blocks.1.mlp.fc2.bias"):
        load_any_encoder(tmp_path / "missing.pth")


def test_eval_knn_reads_a_peers_file_as_the_probes_do_and_its_random_init_floor(tmp_path, capsys):
    """`wildssl eval knn` took only wildssl files, while `eval all` and the probes read peers' files (--layout)."""
    import json

    from wildssl.cli import LAYOUT_CHOICES, main
    from wildssl.eval.evaluate import evaluate_knn
    from wildssl.models.peers import LAYOUTS

    assert LAYOUT_CHOICES == LAYOUTS
    torch.save({"teacher": _state(ReferenceViT(seed=3), "backbone."), "student": _state(ReferenceViT(seed=4),
                                                                                         "module.backbone.")},
               tmp_path / "dino.pth")
    data = "synthetic:scenes?n=48&size=16"
    figures = {}
    for extra in ([], ["--random-init"], ["--encoder", "student", "--layout", "dino"]):
        assert main(["eval", "knn", str(tmp_path / "dino.pth"), "--train", data + "&split=train", "--test",
                     data + "&split=test", "--json", *extra]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        figures[" ".join(extra)] = line
    assert figures[""]["network"] == "dino layout" and figures["--random-init"]["network"] == "random-init"
    assert figures[""]["pool"] == "cls"
    for extra, teacher in (("", True), ("--encoder student --layout dino", False)):
        encoder, _ = load_peer_encoder(tmp_path / "dino.pth", "dino", teacher)
        expected = evaluate_knn(encoder, data + "&split=train", data + "&split=test", image_size=IMG, k=20,
                                temperature=0.07, pool="cls")["knn_top1"]
        assert figures[extra]["knn_top1"] == expected
    assert main(["eval", "knn", str(tmp_path / "dino.pth"), "--model", "small", "--random-init",
                 "--train", data + "&split=train", "--test", data + "&split=test"]) == 2
    assert "--model only builds an architecture" in capsys.readouterr().err


def test_a_peer_layout_on_a_folder_says_it_reads_one_file(tmp_path):
    """`--layout timm` on a wildssl run directory said "checkpoint not found: RUN", of a folder that is there."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="is a wildssl run directory; a peer's layout"):
        load_peer_encoder(tmp_path / "run", "timm")
    with pytest.raises(CheckpointError, match="is a folder; a peer's layout"):
        load_peer_encoder(tmp_path, "timm")
