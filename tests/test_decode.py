"""Reduced-size JPEG decoding (Pillow's draft mode) never decodes fewer pixels than the views need."""

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from wildssl.data.decode import decode_image
from wildssl.methods import build_method
from wildssl.train.bench import view_specs
from wildssl.train.config import build_config, recipe_names



def _smooth_jpeg(path, width, height):
    """A JPEG of smooth gradients, so that reduced-scale decoding and resizing agree closely."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 40.0) * np.cos(y / 40.0)], -1)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
    return path


@pytest.fixture
def draft_sizes(monkeypatch):
    """The size of every JPEG right after ``draft``: what is actually decoded."""
    sizes = []
    original = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        result = original(self, mode, size)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    return sizes


@pytest.mark.parametrize("width,height,load_size", [(1024, 768, 224), (768, 1024, 224), (640, 480, 256),
                                                    (256, 384, 96), (256, 256, 256), (2000, 300, 128)])
def test_draft_decodes_at_least_the_load_size_on_both_sides_and_reduces_when_it_can(
        tmp_path, draft_sizes, width, height, load_size):
    path = _smooth_jpeg(tmp_path / "image.jpg", width, height)
    image, original_width, original_height = decode_image(path, load_size)
    assert (original_width, original_height) == (width, height) and image.shape == (3, load_size, load_size)
    (decoded,) = draft_sizes
    assert min(decoded) >= load_size  # the decoded image covers the square the views are cut from
    # DCT scaling halves the side while both sides stay >= load_size (scales 1/2, 1/4, 1/8)
    scale = 1
    while scale < 8 and min(width, height) // (2 * scale) >= load_size:
        scale *= 2
    assert decoded == (-(-width // scale), -(-height // scale))
    with Image.open(path) as full:  # the full decode, resized the same way: the same picture
        reference = np.asarray(full.convert("RGB").resize((load_size, load_size), Image.BILINEAR), dtype=np.float64)
    assert np.abs(image.permute(1, 2, 0).numpy() - reference).mean() < 3.0


def test_every_full_size_recipe_decodes_images_no_smaller_than_its_largest_view(monkeypatch):
    """With the test above: the decoded image of every shipped full-size recipe covers all its views.
    Recipes that start from a trained encoder (``model.init_from``: LiT, MAE -> WSP) are built without
    loading it: only their views matter here."""
    from wildssl.methods.base import Method

    monkeypatch.setattr(Method, "init_encoder_from", lambda self, path: None)
    for name in (n for n in recipe_names() if not n.endswith("_quick") and n != "demo"):
        config = build_config(name)
        # the byte tokenizer builds at once and cuts no views; the weights go to the meta device (no memory)
        config = build_config(name, ["method.tokenizer=byte"]) if "tokenizer" in config["method"] else config
        with torch.device("meta"):
            method = build_method(config)
        views = [spec.size for stream in type(method).streams for spec in view_specs(method, stream)]
        assert views, name
        assert config["data"]["load_size"] >= max(views), (name, config["data"]["load_size"], views)
