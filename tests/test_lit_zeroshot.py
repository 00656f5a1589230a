"""LiT: the locked image encoder stays bit-identical and in eval mode while the text tower trains; zero-shot
classification from prompts: the ensembled class embedding formula, templates, every image-text method."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import WSP_SHAPES_GROUP, tiny_config
from wildssl.cli import main
from wildssl.errors import ConfigError, DataError
from wildssl.eval.zeroshot import class_embeddings, load_image_text_model, read_templates, zeroshot_classify
from wildssl.methods import build_method
from wildssl.models.loading import load_encoder
from wildssl.train.config import build_config
from wildssl.train.engine import train

SCENES = "synthetic:scenes?n={n}&size=32&colours=2&split={split}"
LIT = ["model.name=tiny", "model.depth=4", "model.embed_dim=128", "model.num_heads=4", "model.patch_size=8",
       "model.img_size=32", "data.load_size=32", "data.num_workers=0", "train.progress=false",
       "train.tensorboard=false", "eval.knn_every=0", "train.log_every=10", "train.checkpoint_every=0"]


def _locked_encoder(run_dir, steps):
    """A WSP run on the scenes (labels from the scene manifest's shapes) to lock."""
    config = build_config("wsp_quick", LIT + ["method.labels=manifest", f"train.steps={steps}", "train.batch_size=64",
                                              f"data.train={SCENES.format(n=2000, split='train')}"])
    train(config, run_dir)
    return run_dir


def test_lit_needs_an_encoder_to_lock():
    with pytest.raises(ConfigError, match="set model.init_from"):
        build_method(build_config("lit_quick", LIT))


def test_lit_leaves_every_image_encoder_tensor_bit_identical_and_in_eval_mode(tmp_path):
    locked = _locked_encoder(tmp_path / "wsp", steps=1)
    config = build_config("lit_quick", LIT + [f"model.init_from={locked}", "train.steps=3", "train.batch_size=16",
                                              "method.cache_features=false", "model.drop_path_rate=0.5"])
    method = build_method(config).train()
    assert not method.student["backbone"].training and method.student["text"].training
    assert not any(p.requires_grad for p in method.student["backbone"].parameters())
    train(config, tmp_path / "lit")
    before = load_encoder(locked, teacher=False).state_dict()
    after = load_encoder(tmp_path / "lit", teacher=False).state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    trained = load_image_text_model(tmp_path / "lit")
    initial = build_method(config)
    assert not torch.equal(trained.student["text"].token_embedding.weight, initial.student["text"].token_embedding.weight)


def test_eval_zeroshot_command_reports_top1_and_top5_and_refuses_a_run_without_text_tower(tmp_path, capsys):
    locked = _locked_encoder(tmp_path / "wsp", steps=1)
    config = build_config("lit_quick", LIT + [f"model.init_from={locked}", "train.steps=1", "train.batch_size=16"])
    train(config, tmp_path / "lit")
    data = "synthetic:scenes?n=24&size=32&split=test"
    assert main(["eval", "zeroshot", str(tmp_path / "lit"), "--data", data, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "lit" and result["num_images"] == 24 and result["num_templates"] == 8
    assert 0 <= result["zeroshot_top1"] <= result["zeroshot_top5"] <= 1
    two = tmp_path / "two.jsonl"  # two classes: the "top-5" holds every class, which the printout says
    two.write_text("".join(json.dumps({"path": str(tmp_path / f"{i}.png"), "label": "dog" if i % 2 else "cat"})
                           + "\n" for i in range(4)))
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    assert main(["eval", "zeroshot", str(tmp_path / "lit"), "--data", str(two)]) == 0
    printed = capsys.readouterr().out
    assert "top-2:" in printed and "(every class, so it says nothing)" in printed and "top-5" not in printed
    assert main(["eval", "zeroshot", str(locked), "--data", data]) == 2
    assert "is a wsp run, which has no text tower" in capsys.readouterr().err


def test_class_embeddings_are_the_normalized_mean_of_normalized_prompt_embeddings(tmp_path):
    config = tiny_config("clip")
    method = build_method(config).eval()
    method.prepare({}, tmp_path)  # byte tokenizer: no captions read
    templates = ["a {}", "the {} here"]
    weights = class_embeddings(method, ["ring", "star"], templates)
    for row, name in enumerate(["ring", "star"]):
        text = method.encode_texts(method.student, [t.format(name) for t in templates]).double()
        expected = F.normalize(F.normalize(text, dim=-1).mean(dim=0), dim=-1)
        torch.testing.assert_close(weights[row].double(), expected, rtol=1e-5, atol=1e-6)
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(DataError, match=r"bad.txt:1: template 'a photo' must hold"):
        read_templates(tmp_path / "bad.txt")
    # a stray brace passed the check above and crashed when the prompts were made (str.format)
    for line in ("a {} photo with {braces", "a {} photo }"):
        (tmp_path / "bad.txt").write_text(f"# ok\n{line}\n")
        with pytest.raises(DataError, match=r"bad.txt:2: template .* has a brace besides its '\{\}'"):
            read_templates(tmp_path / "bad.txt")
    (tmp_path / "ok.txt").write_text("a {} photo {{in braces}}\n")
    assert [t.format("dog") for t in read_templates(tmp_path / "ok.txt")] == ["a dog photo {in braces}"]


@pytest.mark.parametrize("name", ["slip", "silc", "ab_clip"])
def test_zeroshot_loads_every_image_text_method(tmp_path, name):
    from conftest import tiny_ab_overrides, tiny_overrides

    extra = ["train.steps=1", "train.checkpoint_every=1"]
    overrides = tiny_ab_overrides("clip", *extra) if name == "ab_clip" else tiny_overrides(name, *extra)
    train(build_config(None if name == "ab_clip" else f"{name}_quick", overrides), tmp_path)
    method = load_image_text_model(tmp_path)
    result = zeroshot_classify(method, "synthetic:scenes?n=16&size=16&split=test", ["a large {}"])
    assert result["num_images"] == 16 and result["num_classes"] == 8
    assert result["zeroshot_top1"] <= result["zeroshot_top5"]



@WSP_SHAPES_GROUP
def test_lit_zeroshot_on_scenes_beats_chance_by_a_clear_margin(wsp_shapes_run, tmp_path):
    """LiT on a locked WSP encoder that separates the shapes (conftest's ``wsp_shapes_run``: one object per
    scene, 4 shapes, chance 25%), 60 steps of a 1-block text tower, then zero-shot with CLIP's default
    prompt templates on held-out scenes.

    Measured zero-shot top-1 (train.seed 0/1/2 for both runs): 51.0, 47.6, 51.8% (chance 25%; the bound
    below is 40%); with the single template "a large {}" 45.2, 44.2, 49.6%.

    Why this setting (each measured at seed 0 unless said): on the default scenes (1-3 distractors, 8 shapes)
    the locked WSP encoder barely learns in a test-sized run (k-NN 27-32% vs 23% at init) and zero-shot stays
    at 10-17% (chance 12.5%) whatever the templates. With the byte tokenizer the 1-block tower must assemble
    each shape word from its bytes: zero-shot 38.6% vs 47.0% with BPE (trained on the captions, one token per
    shape word), on the same locked encoder. The byte context (30 bytes) does not cut the main shape word: it
    ends by byte 24 of every caption. No fault in LiT or zero-shot showed up: the ceiling is the locked
    encoder (k-NN ~60%), which LiT cannot exceed.
    """
    from conftest import SHAPES_DATA, SHAPES_MODEL

    run_dir, _ = wsp_shapes_run
    config = build_config("lit_quick", SHAPES_MODEL + [
        f"model.init_from={run_dir}", "train.steps=60", "optim.lr=1e-3", "method.embed_dim=64",
        "method.text_width=64", "method.text_depth=1", "method.tokenizer=bpe", "method.vocab_size=512",
        f"data.train={SHAPES_DATA.format(n=2000, split='train')}"])
    train(config, tmp_path)
    result = zeroshot_classify(load_image_text_model(tmp_path), SHAPES_DATA.format(n=500, split="test"))
    assert result["num_classes"] == 4 and result["num_templates"] == 8
    assert result["zeroshot_top1"] >= 1 / 4 + 0.15, result
