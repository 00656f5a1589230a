"""The library called from Python, as a researcher calls it outside the CLI: arguments a config check would have
caught are caught here too, in one line naming the argument, instead of a wrong number or a bare torch error."""
import copy
import math

import pytest
import torch

from conftest import schedule_values, tiny_batch, tiny_config
from wildssl.errors import ConfigError, DataError
from wildssl.methods import build_method
from wildssl.methods.base import StepContext


def _context(method=None, values=True):
    return StepContext(0, 10, torch.Generator().manual_seed(0), schedule_values(method) if values else {})


def test_a_method_forward_before_prepare_or_without_schedule_values_says_what_to_do():
    """WSP's forward read its head before the check that says to call prepare (a bare KeyError: 'head'); a
    StepContext built without values gave DINO a bare KeyError: 'teacher_temp'."""
    wsp = build_method(tiny_config("wsp"))
    with pytest.raises(RuntimeError, match=r"^method wsp: call prepare\(sources, run_dir\) before training"):
        wsp({"train": tiny_batch(4)}, _context(wsp))
    dino = build_method(tiny_config("dino"))
    with pytest.raises(KeyError, match=r"step.values has no 'teacher_temp': give StepContext\(values=\.\.\.\) this "
                                       r"step's entries of method.schedules"):
        dino({"train": tiny_batch(4)}, _context(values=False))
    assert torch.isfinite(dino({"train": tiny_batch(4)}, _context(dino))["loss"])


def test_a_contrastive_forward_on_one_image_is_refused_not_a_loss_of_zero():
    """SimCLR's forward given a batch of one image returned loss 0 (nothing to contrast), though train.batch_size=1
    is refused when the method is built."""
    simclr = build_method(tiny_config("simclr"))
    with pytest.raises(ConfigError, match=r"^method simclr contrasts each image with the other images of the batch, "
                                          r"and this step's batch holds 1 image\(s\): give it 2 or more$"):
        simclr({"train": tiny_batch(1)}, _context(simclr))
    assert simclr({"train": tiny_batch(2)}, _context(simclr))["loss"] > 0


def test_an_ema_momentum_outside_zero_one_is_refused():
    """update_teacher(-1) moved the teacher past the student, NaN filled it with NaN, 2 did nothing."""
    from wildssl.models.ema import ema_update_

    teacher, student = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = copy.deepcopy(teacher.state_dict())
    for momentum in (-1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"EMA momentum=.* must be in \[0, 1\]"):
            ema_update_(teacher, student, momentum)
    ema_update_(teacher, student, 1.0)  # the teacher never moves
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_engine_train_checks_a_config_dict_built_by_hand(tmp_path):
    """A misspelt key in a hand-built dict was ignored and the run trained; a batch size of "abc" failed in
    string formatting; train.steps=0 inside numpy."""
    from wildssl.train.engine import train

    config = tiny_config("simclr", "train.steps=1")
    for section, key, value, message in (("method", "temperatur", 0.5, "unknown config key 'method.temperatur'"),
                                         ("train", "batch_size", "abc", 'train.batch_size="abc" is invalid'),
                                         ("train", "steps", 0, "train.steps=0 is invalid")):
        bad = copy.deepcopy(config)
        bad[section][key] = value
        with pytest.raises(ConfigError, match=message):
            train(bad, tmp_path / key)
        assert not (tmp_path / key).exists()
    assert train(copy.deepcopy(config), tmp_path / "good")["steps"] == 1
    partial = copy.deepcopy(config)
    del partial["eval"]  # a missing section takes the defaults, in the engine's loop as in build_run
    assert train(partial, tmp_path / "partial")["steps"] == 1


def test_feature_batches_of_the_wrong_form_are_one_line_errors():
    """16 images with 3 labels came back as 16 features and 3 labels; a list of tensors failed inside torch."""
    from wildssl.eval.features import extract_features
    from wildssl.models.vit import build_encoder

    encoder = build_encoder("tiny", img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(DataError, match="feature batch has 16 images and 3 labels; give one label per image"):
        extract_features(encoder, [{"image": images, "label": torch.zeros(3, dtype=torch.long)}], "cpu", 16)
    with pytest.raises(DataError, match=r"feature batch is a Tensor; expected dicts with 'image' \(B, 3, H, W\)"):
        extract_features(encoder, [images], "cpu", 16)
    features, labels = extract_features(encoder, [{"image": images, "label": torch.arange(16)}], "cpu", 16)
    assert features.shape == (16, 32) and labels.shape == (16,)


def test_losses_refuse_temperatures_and_shapes_they_cannot_mean():
    """bootstrap_loss at teacher_temp 0 gave NaN and at -1 inverted the target; NaN temperatures passed the
    `<= 0` checks; negative_cosine and clip_accuracy broadcast mismatched shapes into a number."""
    from wildssl.losses.bootstrap_loss import bootstrap_loss
    from wildssl.losses.clip_loss import clip_accuracy
    from wildssl.losses.nt_xent import nt_xent_loss
    from wildssl.losses.simsiam_loss import negative_cosine

    logits = torch.randn(4, 8)
    for temp in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="bootstrap_loss teacher_temp must be > 0"):
            bootstrap_loss(logits, logits, teacher_temp=temp)
    with pytest.raises(ValueError, match="nt_xent_loss temperature must be > 0, got nan"):
        nt_xent_loss(logits, logits, temperature=math.nan)
    for other in (torch.randn(4, 1), torch.randn(1, 8)):
        with pytest.raises(ValueError, match=r"negative_cosine needs p and z of one shape \(B, D\)"):
            negative_cosine(logits, other)
    with pytest.raises(ValueError, match=r"clip_accuracy needs image and text embeddings of one shape"):
        clip_accuracy(logits, torch.randn(5, 8))
    assert torch.isfinite(bootstrap_loss(logits, logits, teacher_temp=0.1))


def test_make_views_refuses_an_aspect_that_is_not_a_positive_number():
    """aspect NaN gave NaN boxes, -1 an inverted box [1, 1, 0, 0], 0 a degenerate one."""
    from wildssl.data.views import CropSpec, make_views

    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    spec = [CropSpec(8, (0.5, 1.0))]
    for bad in (math.nan, -1.0, 0.0, math.inf):
        with pytest.raises(DataError, match=r"make_views: aspect \(W/H of each original image\) must be finite and > 0"):
            make_views(images, spec, torch.Generator().manual_seed(0), aspect=torch.tensor([1.0, bad]))
    (view,) = make_views(images, spec, torch.Generator().manual_seed(0), aspect=torch.tensor([1.0, 1.5]))
    assert torch.isfinite(view.boxes).all()
