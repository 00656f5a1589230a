import copy
import math

import pytest
import torch

from conftest import KNN_MARGIN, TINY_DATA, TWO_BLOCKS, tiny_batch, tiny_overrides, train_and_compare_knn
from wildssl.data import open_source
from wildssl.data.views import make_views
from wildssl.errors import CheckpointError, ConfigError, DataError
from wildssl.methods import build_method
from wildssl.methods.base import StepContext
from wildssl.models.tokenizer import TOKENIZER_FILENAME, ByteTokenizer
from wildssl.train.config import build_config

@pytest.fixture
def one_thread():
    # On a loaded machine two intra-op threads can be many times slower than one (they wait on each
    # other at every operation); these tests were measured 10-20x faster with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CLIP = tiny_overrides("clip")


def tiny_clip(tmp_path, *extra: str, prepare: bool = True):
    torch.manual_seed(0)
    method = build_method(build_config("clip_quick", TINY_CLIP + list(extra)))
    if prepare:
        method.prepare({"train": open_source(TINY_DATA)}, tmp_path)
    return method


def step_context(seed: int = 3) -> StepContext:
    return StepContext(step=0, total_steps=10, generator=torch.Generator().manual_seed(seed))


def reference_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE of Radford et al. (Fig. 3) written out in float64, row by row."""
    image = image.double() / image.double().norm(dim=1, keepdim=True)
    text = text.double() / text.double().norm(dim=1, keepdim=True)
    logits = scale * image @ text.T
    total = 0.0
    for i in range(len(image)):
        image_to_text = logits[i, i] - torch.logsumexp(logits[i], dim=0)
        text_to_image = logits[i, i] - torch.logsumexp(logits[:, i], dim=0)
        total = total - image_to_text - text_to_image
    return total / (2 * len(image))


def pool_by_hand(tokens: dict, pool: str) -> torch.Tensor:
    """The class token, or the plain mean over the patch tokens (``avg``, the quick recipes' pooling)."""
    return tokens["cls"] if pool == "cls" else tokens["patch"].sum(dim=1) / tokens["patch"].shape[1]


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_forward_loss_equals_clip_loss_of_independently_computed_embeddings(tmp_path, pool):
    method = tiny_clip(tmp_path, f"method.pool={pool}")
    with torch.no_grad():
        method.student["logit_scale"].log_scale.fill_(math.log(20.0))
    batch = tiny_batch()
    output = method({"train": batch}, step_context(seed=3))

    (view,) = make_views(batch["image"], method.specs, torch.Generator().manual_seed(3), aspect=batch["aspect"])
    with torch.no_grad():
        image = method.student["image_proj"](pool_by_hand(method.student["backbone"](view.images), pool))
        # Full context length (the method trims trailing padding; causal attention must make that a no-op).
        tokens = ByteTokenizer().encode_batch(batch["caption"], 40)
        text = method.student["text"](tokens)
    expected = reference_clip_loss(image, text, 20.0)
    assert output["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert output["metrics"]["logit_scale"].item() == pytest.approx(20.0, rel=1e-6)
    assert 0.0 <= output["metrics"]["clip_acc"].item() <= 1.0


def test_forward_gradient_reaches_both_towers_and_the_logit_scale(tmp_path):
    method = tiny_clip(tmp_path)
    method({"train": tiny_batch()}, step_context())["loss"].backward()
    for name in ("backbone", "image_proj", "text", "logit_scale"):
        grads = [p.grad for p in method.student[name].parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_annotation_space_logits_match_an_independent_float64_computation(tmp_path, pool):
    method = tiny_clip(tmp_path, f"method.pool={pool}").eval()
    with torch.no_grad():
        method.student["logit_scale"].log_scale.fill_(math.log(30.0))
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    annotation_batch = tiny_batch(size=7, start=20)
    space = method.annotation_space(method.student, images, annotation_batch, step_context())

    double = copy.deepcopy(method.student).double()
    tokens = ByteTokenizer().encode_batch(annotation_batch["caption"], 40)
    with torch.no_grad():
        image = double["image_proj"](pool_by_hand(double["backbone"](images.double()), pool))
        text = double["text"](tokens)
    image = image / image.norm(dim=1, keepdim=True)
    text = text / text.norm(dim=1, keepdim=True)
    expected = 30.0 * image @ text.T

    assert space.logits.shape == (5, 7)  # K = the annotation batch size
    assert torch.allclose(space.logits.double(), expected, atol=1e-4)
    assert not space.logits.requires_grad


def test_annotation_features_are_the_text_towers_pooled_features_with_gradient(tmp_path):
    method = tiny_clip(tmp_path).eval()
    annotation_batch = tiny_batch(size=7, start=20)
    features = method.annotation_features(method.student, annotation_batch)
    tokens = ByteTokenizer().encode_batch(annotation_batch["caption"], 40)
    hidden = method.student["text"].forward_tokens(tokens)
    eot = [row.index(ByteTokenizer().eot_id) for row in tokens.tolist()]
    expected = torch.stack([hidden[i, position] for i, position in enumerate(eot)])
    torch.testing.assert_close(features, expected)
    assert features.requires_grad and features.shape == (7, method.annotation_input().feature_dim) == (7, 32)
    torch.testing.assert_close(method.student["text"](tokens), method.student["text"].projection(expected))


def test_bpe_tokenizer_is_trained_into_the_run_dir_once_and_reloaded_with_identical_ids(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    from wildssl.models.tokenizer import BPETokenizer

    first = tiny_clip(tmp_path, "method.tokenizer=bpe", "method.vocab_size=300")
    path = tmp_path / TOKENIZER_FILENAME
    assert path.is_file() and isinstance(first.tokenizer, BPETokenizer)
    assert 259 < first.tokenizer.vocab_size <= 300  # merges were learned, within the text tower's table
    saved = path.read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again instead of loaded")

    monkeypatch.setattr(BPETokenizer, "train", no_training)
    second = tiny_clip(tmp_path, "method.tokenizer=bpe", "method.vocab_size=300")
    captions = tiny_batch(size=16)["caption"]
    assert torch.equal(first.tokenizer.encode_batch(captions, 40), second.tokenizer.encode_batch(captions, 40))
    assert path.read_bytes() == saved


def test_byte_tokenizer_is_saved_to_the_run_dir(tmp_path):
    method = tiny_clip(tmp_path)
    assert isinstance(method.tokenizer, ByteTokenizer)
    assert (tmp_path / TOKENIZER_FILENAME).is_file()


def test_byte_tokenizer_with_a_vocab_smaller_than_259_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size=258"):
        tiny_clip(tmp_path, "method.tokenizer=byte", "method.vocab_size=258", prepare=False)


def test_unknown_tokenizer_kind_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="method.tokenizer='words'"):
        tiny_clip(tmp_path, "method.tokenizer=words", prepare=False)


def test_run_dir_tokenizer_of_another_kind_is_refused(tmp_path):
    pytest.importorskip("tokenizers")
    tiny_clip(tmp_path)  # saves a byte tokenizer
    with pytest.raises(CheckpointError, match="ByteTokenizer"):
        tiny_clip(tmp_path, "method.tokenizer=bpe", "method.vocab_size=300")


def test_batch_without_captions_is_a_data_error(tmp_path):
    method = tiny_clip(tmp_path)
    batch = tiny_batch()
    batch["caption"] = [""] * len(batch["caption"])
    with pytest.raises(DataError, match="without captions"):
        method({"train": batch}, step_context())


def test_bpe_tokenizer_on_a_source_without_captions_names_the_stream(tmp_path):
    """A folder of photos given to a caption method: one error naming data.train and its path, not a hint to
    switch tokenizer (the byte tokenizer would fail at the first batch)."""
    pytest.importorskip("tokenizers")
    from PIL import Image

    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
    method = tiny_clip(tmp_path, "method.tokenizer=bpe", "method.vocab_size=300",
                       f"data.train={tmp_path / 'photos'}", prepare=False)
    with pytest.raises(DataError, match=r"no captions .* data\.train \(.*photos\) a source with captions"):
        method.prepare({"train": open_source(str(tmp_path / "photos"))}, tmp_path / "run")
    assert not (tmp_path / "run" / TOKENIZER_FILENAME).exists()


def test_engine_run_keeps_its_tokenizer_and_resumes_with_it(tmp_path):
    from wildssl.train.engine import train

    config = build_config("clip_quick", TINY_CLIP + ["train.steps=2", "train.log_every=1"])
    train(config, tmp_path)
    saved = (tmp_path / TOKENIZER_FILENAME).read_bytes()
    resumed = build_config("clip_quick", TINY_CLIP + ["train.steps=3", "train.log_every=1"])
    summary = train(resumed, tmp_path, resume=True)
    assert summary["start_step"] == 2 and math.isfinite(summary["final_loss"])
    assert (tmp_path / TOKENIZER_FILENAME).read_bytes() == saved


# -- end to end --------------------------------------------------------------------------------------------
# Measured for CLIP with the recipe's mean-token pooling (100 steps, seeds 0 / 1): 33.0% / 35.2% top-1 vs 21.4% /
# 21.2% at init (8 classes); see conftest.E2E. With two blocks (conftest.TWO_BLOCKS; 2026-12-02, an Intel Xeon): +12.8 /
# +13.0 / +13.0 at seeds 0 / 1 / 2, on the 4x set +11.2 / +14.4 / +13.2 (benchmarks/e2e_seeds.md).
E2E_TEXT = ["method.tokenizer=bpe", "method.vocab_size=512", "method.context_length=16"]


@pytest.mark.slow
def test_clip_on_captioned_scenes_lowers_its_loss_and_beats_random_init_on_knn(tmp_path):
    pytest.importorskip("tokenizers")
    losses, trained, initial = train_and_compare_knn("clip", tmp_path, *E2E_TEXT, *TWO_BLOCKS)
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert trained > initial + KNN_MARGIN, (trained, initial)


def test_the_caption_stream_must_be_captioned_and_a_partly_captioned_one_is_named(tmp_path, caplog):
    """Images without a caption trained against the empty caption they all share, without a word; a folder of
    images with the byte tokenizer trained on nothing but empty captions."""
    import json
    import logging

    from PIL import Image

    from conftest import tiny_config
    from wildssl.data import open_source
    from wildssl.errors import DataError
    from wildssl.methods import build_method

    for k in range(6):
        Image.new("RGB", (16, 16), (40 * k, 10, 90)).save(tmp_path / f"{k}.png")
    manifest = tmp_path / "half.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"{k}.png", **({"caption": "a red ring"} if k % 2 else {})})
                                + "\n" for k in range(6)))
    method = build_method(tiny_config("clip", "method.tokenizer=byte", "method.vocab_size=259"))
    with caplog.at_level(logging.INFO, logger="wildssl"):
        method.prepare({"train": open_source(str(manifest), 16)}, tmp_path / "run_half")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["clip: 3 of the 6 images of data.train have no caption; each trains against the empty "
                        "caption they all share (caption them, or leave them out of this stream)"]
    with pytest.raises(DataError, match="method clip learns from captions, but there are no captions in image folder"):
        method.prepare({"train": open_source(str(tmp_path), 16)}, tmp_path / "run_folder")


def test_a_text_size_that_the_depth_width_and_heads_override_is_named(caplog):
    """`--set method.text_size=base` on clip_quick (which sets the text tower's depth, width and heads) built
    the recipe's 128-wide tower without a word."""
    import logging

    def text_tower(recipe, *overrides):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wildssl"), torch.device("meta"):
            method = build_method(build_config(recipe, ["method.vocab_size=259", "method.tokenizer=byte",
                                                        *overrides]))
        warnings = [r.getMessage() for r in caplog.records if "text_size" in r.getMessage()]
        return method.student["text"], warnings

    tower, warnings = text_tower("clip_quick", "method.text_size=base")
    assert tower.width == 128 and len(tower.blocks) == 2
    assert warnings == ["method.text_size=base is not used: method.text_depth, text_width and text_heads set "
                        "every dimension of the text tower (2 blocks, 128 wide, 4 heads)"]
    tower, warnings = text_tower("clip_quick")  # the recipe as shipped names no size
    assert tower.width == 128 and warnings == []
    tower, warnings = text_tower("clip_quick", "method.text_width=null")  # the size fills what is not set
    assert tower.width == 384 and len(tower.blocks) == 2 and warnings == []
    tower, warnings = text_tower("clip_quick", "method.text_size=base", "method.text_width=null")
    assert tower.width == 512 and warnings == []
    with pytest.raises(ConfigError, match=r"^method.text_size='huuge' is not one of tiny, small, base, large, huge"):
        text_tower("clip_quick", "method.text_size=huuge")
    assert caplog.records == []  # the misspelled size is the one message
