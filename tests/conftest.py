import os
from pathlib import Path

import pytest
import torch

# One thread: tests share 2 cores with other processes, and oversubscribed threads run 10-20x slower.
torch.set_num_threads(1)

TINY_DATA = "synthetic:scenes?n=64&size=16&split=train"

TINY_MODEL = ["model.name=tiny", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
              "model.patch_size=4", "model.img_size=16", "data.load_size=16", "data.num_workers=0",
              f"data.train={TINY_DATA}", "train.batch_size=16", "train.log_every=1",
              "train.progress=false", "train.tensorboard=false", "eval.knn_every=0"]

TINY_METHOD = {
    "simclr": ["method.crop_size=16", "method.proj_hidden_dim=32", "method.proj_dim=16"],
    "dino": ["method.global_size=16", "method.local_size=8", "method.n_local=2", "method.out_dim=64",
             "method.hidden_dim=32", "method.bottleneck_dim=16", "method.teacher_temp_warmup_epochs=1"],
}


def tiny_overrides(method: str, *extra: str) -> list[str]:
    return TINY_MODEL + TINY_METHOD[method] + list(extra)


TINY_AB = ["method.ab_n_crops=3", "method.ab_crop_size=16", "method.ab_decoder_depth=1",
           "method.ab_decoder_width=32", "method.ab_decoder_heads=2", "method.ab_num_bins=16",
           "data.bootstrap=synthetic:scenes?n=64&size=16&split=test"]


def tiny_ab_overrides(base: str, *extra: str) -> list[str]:
    """A tiny annotation-bootstrapping config over ``base``; annotation stream = the tiny scenes."""
    common = [o.replace("data.train=", "data.annotation=") for o in TINY_MODEL]
    return [f"method.name=ab_{base}"] + common + TINY_METHOD[base] + TINY_AB + list(extra)


def shared_data_dir() -> Path | None:
    """../shared/data beside the repo (or $WILDSSL_SHARED_DATA); None when absent."""
    env = os.environ.get("WILDSSL_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


@pytest.fixture
def shared_data():
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared data not present")
    return path
