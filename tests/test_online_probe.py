import json

import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from wildssl.eval.online_probe import OnlineProbe
from wildssl.models.loading import CHECKPOINT_NAME
from wildssl.models.vit import build_encoder
from wildssl.train.config import build_config
from wildssl.train.engine import train


def test_online_probe_logs_its_accuracy_and_leaves_the_training_run_unchanged(tmp_path):
    common = tiny_overrides("simclr", "train.steps=4", "train.checkpoint_every=0")
    train(build_config("simclr_quick", common), tmp_path / "plain")
    train(build_config("simclr_quick", common + ["eval.online_probe=true"]), tmp_path / "probed")
    plain = load_file(str(tmp_path / "plain" / CHECKPOINT_NAME))
    probed = load_file(str(tmp_path / "probed" / CHECKPOINT_NAME))
    assert plain.keys() == probed.keys()
    assert all(torch.equal(plain[k], probed[k]) for k in plain)  # weights, optimizer moments, RNG: identical
    records = [json.loads(line) for line in (tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()]
    top1 = [r["online_probe_top1"] for r in records if "online_probe_top1" in r]
    assert len(top1) == 4 and all(0.0 <= v <= 1.0 for v in top1)
    assert "online_probe_top1" not in (tmp_path / "plain" / "metrics.jsonl").read_text()


class _Backbone:
    """All the probe asks of a method: ``encoder(teacher)``, the network to evaluate."""

    def __init__(self, encoder):
        self.backbone = encoder

    def encoder(self, teacher=None):
        return self.backbone


def test_online_probe_learns_from_detached_features():
    torch.manual_seed(0)
    encoder = build_encoder("tiny", depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=16).train()
    probe = OnlineProbe(32, 4, image_size=16, pool="cls", teacher=None, device="cpu")
    colours = torch.tensor([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]], dtype=torch.uint8)
    generator = torch.Generator().manual_seed(1)
    first = None
    for step in range(60):
        labels = torch.randint(0, 4, (32,), generator=generator)
        labels[0] = -1  # an unlabelled image is skipped
        images = colours[labels.clamp(min=0)][:, :, None, None].expand(-1, -1, 16, 16).contiguous()
        figures = probe.step(_Backbone(encoder), {"image": images, "label": labels})
        first = figures["online_probe_top1"] if first is None else first
    # the mean over the last 20 batches, each scored before the probe trained on it
    assert figures["online_probe_top1"] >= 0.95 > first + 0.3
    assert all(p.grad is None for p in encoder.parameters())  # nothing flowed back into the encoder
    assert encoder.training  # its mode is restored
    assert probe.step(_Backbone(encoder), {"image": images[:2], "label": torch.tensor([-1, -1])}) == {}
