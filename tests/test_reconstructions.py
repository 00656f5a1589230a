"""``wildssl plot RUN --reconstructions IMAGES``: the picture shows what the MAE encoder saw and what the
decoder made of the rest, checked pixel by pixel against the masks."""

import numpy as np
import pytest

from conftest import tiny_overrides
from wildssl.cli import main
from wildssl.data import collate, open_source
from wildssl.errors import ConfigError
from wildssl.eval.reconstructions import (BLANK, GAP, HEADER, load_masked_autoencoder, panel_scale,
                                          plot_reconstructions, reconstruct_images)
from wildssl.train.config import build_config
from wildssl.train.engine import train

IMAGES = "synthetic:scenes?n=8&size=16&split=test"


@pytest.fixture
def mae_run(tmp_path):
    config = build_config("mae_quick", tiny_overrides("mae", "train.steps=2"))
    train(config, tmp_path / "run")
    return tmp_path / "run"


def _patch_cells(panel: np.ndarray, patch: int, grid: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3)`` -> ``(N, patch, patch, 3)`` in the encoder's patch order."""
    h, w = grid
    return panel.reshape(h, patch, w, patch, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, patch, patch, 3)


def test_reconstruction_picture_blanks_exactly_the_hidden_patches(mae_run, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    assert main(["plot", str(mae_run), "--reconstructions", IMAGES, "--count", "3", "--seed", "5"]) == 0
    out = mae_run / "reconstructions.png"
    assert f"wrote {out}" in capsys.readouterr().out
    picture = np.asarray(Image.open(out).convert("RGB"))[HEADER:]

    method = load_masked_autoencoder(mae_run)
    images = collate([open_source(IMAGES, load_size=16)[i] for i in range(3)])["image"]
    expected = reconstruct_images(method, images, seed=5)  # the masks the picture was drawn with
    size = 16
    scale = panel_scale(size)
    side = size * scale
    assert picture.shape[:2] == (3 * side + 2 * GAP, 3 * side + 2 * GAP)
    patch = method.patch_size * scale
    for row in range(3):
        top = row * (side + GAP)
        original, masked, reconstruction = (picture[top: top + side, c * (side + GAP): c * (side + GAP) + side]
                                            for c in range(3))
        hidden = expected.mask[row]
        assert hidden.mean() == 0.75
        cells = {name: _patch_cells(panel, patch, method.grid) for name, panel in
                 (("original", original), ("masked", masked), ("reconstruction", reconstruction))}
        # Masked panel: every hidden patch is blank, every visible patch is the original's.
        assert (cells["masked"][hidden] == np.array(BLANK, dtype=np.uint8)).all()
        assert (cells["masked"][~hidden] == cells["original"][~hidden]).all()
        # Reconstruction: visible patches pasted back; hidden ones are the decoder's, not blank, not the original.
        assert (cells["reconstruction"][~hidden] == cells["original"][~hidden]).all()
        assert not (cells["reconstruction"][hidden] == np.array(BLANK, dtype=np.uint8)).all()
        assert not (cells["reconstruction"][hidden] == cells["original"][hidden]).all()
        # The original panel is the image itself, enlarged.
        enlarged = expected.original[row].repeat(scale, axis=0).repeat(scale, axis=1)
        assert (original == enlarged).all()


def test_reconstructions_of_a_run_of_another_method_is_a_clear_error(tmp_path):
    config = build_config(None, tiny_overrides("simclr", "method.name=simclr", "train.steps=1"))
    train(config, tmp_path / "run")
    with pytest.raises(ConfigError, match="needs an MAE run"):
        plot_reconstructions(tmp_path / "run", IMAGES)
