"""``--scale tiny``: every suite in seconds, for the tests. It checks the harness, not the methods.

Every prepared data set becomes a small ``synthetic:scenes`` set (held-out sets its ``test`` split), the
model a 1-block ViT of width 32 at 16 px, each method's heads and decoders their smallest settings, and
each trained probe one epoch at one learning rate. A suite's own ``scales.tiny`` is applied after these.
"""

from __future__ import annotations

from wildssl.benchmark.prepare import TEST_SETS, is_prepared_name

IMAGES = 8  # images seen per entry when the suite gives no scales.tiny.images: one step of 8
# 4 shapes: 4 images of a class on average, enough for a 2-way 1-shot episode with a query
SCENES = "synthetic:scenes?n=16&size=16&colours=2&num_classes=4&split={split}"
MODEL = ["model.name=tiny", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=4",
         "model.img_size=16", "data.load_size=16", "data.num_workers=0", "train.batch_size=8",
         "train.log_every=1", "train.checkpoint_every=0"]
_TEXT = ["method.embed_dim=16", "method.text_size=null", "method.text_depth=1", "method.text_width=32",
         "method.text_heads=2", "method.context_length=40", "method.tokenizer=byte", "method.vocab_size=259"]
# n_local stays the recipe's: DINO-2 (no local crops) is a setting a suite compares, not a size
_DISTILLATION = ["method.global_size=16", "method.local_size=8", "method.out_dim=32",
                 "method.hidden_dim=32", "method.bottleneck_dim=16", "method.teacher_temp_warmup_epochs=1"]
_AB = ["method.ab_n_crops=2", "method.ab_crop_size=16", "method.ab_decoder_depth=1", "method.ab_decoder_width=32",
       "method.ab_decoder_heads=2", "method.ab_num_bins=16"]
_SIMSIAM = ["method.crop_size=16", "method.proj_hidden_dim=32", "method.proj_dim=16", "method.pred_hidden_dim=8"]
# method.name -> its smallest settings
METHOD = {
    "simclr": ["method.crop_size=16", "method.proj_hidden_dim=32", "method.proj_dim=16"],
    "dino": _DISTILLATION,
    "nn_dino": _DISTILLATION,
    "adasim_dino": _DISTILLATION,
    "simsiam": _SIMSIAM,
    "adasim_simsiam": _SIMSIAM,
    "clip": ["method.crop_size=16"] + _TEXT,
    "slip": ["method.crop_size=16", "method.ssl_hidden_dim=32", "method.ssl_dim=16"] + _TEXT,
    "silc": _DISTILLATION + _TEXT,
    "lit": ["method.crop_size=16"] + _TEXT,
    "mae": ["method.crop_size=16", "method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"],
    "ijepa": ["method.crop_size=16", "method.min_context=2", "method.predictor_dim=32", "method.predictor_depth=1",
              "method.predictor_heads=2"],
    "wsp": ["method.crop_size=16", "method.vocabulary_size=16"],
    "ibot": _DISTILLATION + ["method.patch_out_dim=32"],
    "slotmim": ["method.crop_size=16", "method.num_prototypes=8", "method.hidden_dim=32", "method.bottleneck_dim=16",
                "method.teacher_temp_warmup_epochs=1"],
}
for _base in ("simclr", "dino", "clip"):
    METHOD[f"ab_{_base}"] = METHOD[_base] + _AB
# probe kind -> options that make it one quick fit
PROBES = {
    "linear": {"epochs": 1, "lrs": [1e-3]},
    "attentive": {"epochs": 1, "lrs": [1e-3]},
    "decoder": {"epochs": 1, "lrs": [1e-3], "width": 32, "depth": 1, "heads": 2},
    "segment": {"epochs": 1, "lrs": [1e-3]},
    "fewshot": {"episodes": 4, "n_way": 2, "k_shot": 1, "n_query": 1},
    "discovery": {"pictures": 0},
}


def data_spec(value: str) -> str:
    """The tiny stand-in of a suite data value: prepared sets and larger synthetic sets become the small
    synthetic scenes; other SPECs (a user's folders) stay."""
    if not is_prepared_name(value) and not value.startswith("synthetic:"):
        return value
    return SCENES.format(split="test" if value in TEST_SETS else "train")


def method_overrides(method: str) -> list[str]:
    return list(METHOD.get(method, []))
