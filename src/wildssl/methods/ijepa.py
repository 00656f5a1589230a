"""I-JEPA (Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture", CVPR 2023).

One view per image (RandomResizedCrop (0.3, 1), no flip, no colour augmentation, as released). Per
image, multi-block masking (:func:`~wildssl.data.masking.multiblock_masks`) draws ``M = 4`` target
blocks and one context block with the targets removed from it. The context encoder (the student
backbone) runs on the context patches only; contexts of different sizes are padded to the longest of
the batch and the padding is hidden by a key-padding attention mask (never truncated to the shortest,
the released collator's bias against central patches). The predictor
(:class:`~wildssl.models.ijepa_predictor.IJEPAPredictor`) predicts, from the context tokens and one
positional mask token per target patch, the target encoder's layer-normalized tokens of each block.
The target encoder is an EMA of the context encoder (``make_teacher(["backbone"])``; momentum
``ema.momentum`` -> ``ema.momentum_end``, 0.996 -> 1 in the paper) and sees the whole view.

Evaluation reads the target encoder (the paper's choice), average-pooled (``eval.pool: avg`` in the
recipes). Position embeddings are fixed 2-D sine-cosine tables, as released.
"""

from __future__ import annotations

import torch

from wildssl.data.masking import MultiBlockMasks, cpu_generator, multiblock_masks
from wildssl.data.views import CropSpec, make_views
from wildssl.errors import ConfigError
from wildssl.losses.ijepa_loss import LOSSES, ijepa_loss, layer_normalized_targets
from wildssl.methods.base import Method, StepContext, normalized_embedding_std
from wildssl.models.ijepa_predictor import IJEPAPredictor
from wildssl.models.position import freeze_sincos_positions


class IJEPA(Method):
    """``student = {backbone, predictor}``, ``teacher = {backbone}`` (EMA).

    Config keys (``method.*``): ``crop_size``, ``crop_scale`` (the one view's RandomResizedCrop);
    ``num_targets``, ``target_scale``, ``target_aspect`` (the target blocks: count, area fraction and
    aspect ranges), ``context_scale`` (the context block's area fraction), ``min_context`` (fewest
    context patches a placement may leave before it is redrawn); ``predictor_dim``,
    ``predictor_depth``, ``predictor_heads`` (null: the encoder's); ``loss`` (``smooth_l1`` as released,
    or ``l2`` as the paper's Eq. 1). The EMA momentum is ``ema.momentum`` -> ``ema.momentum_end``.
    """

    name = "ijepa"
    defaults = {
        "crop_size": 224,
        "crop_scale": [0.3, 1.0],
        "num_targets": 4,
        "target_scale": [0.15, 0.2],
        "target_aspect": [0.75, 1.5],
        "context_scale": [0.85, 1.0],
        "min_context": 10,
        "predictor_dim": 384,
        "predictor_depth": 12,
        "predictor_heads": None,  # null: the encoder's number of heads, as released
        "loss": "smooth_l1",
    }
    eval_network = "teacher"

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        if o["loss"] not in LOSSES:
            raise ConfigError(f"method.loss={o['loss']!r} is not one of {', '.join(LOSSES)}")
        if o["num_targets"] < 1 or o["min_context"] < 1:
            raise ConfigError(f"method.num_targets={o['num_targets']} and method.min_context={o['min_context']} "
                              "must be >= 1")
        backbone = self.student["backbone"]
        self.grid = backbone.patch_grid(o["crop_size"], o["crop_size"])
        freeze_sincos_positions(backbone)
        heads = o["predictor_heads"] or backbone.num_heads
        self.student["predictor"] = IJEPAPredictor(backbone.embed_dim, self.grid, o["predictor_dim"],
                                                   o["predictor_depth"], heads, backbone.mlp_ratio)
        self.make_teacher(["backbone"])
        self.specs = [CropSpec(o["crop_size"], tuple(o["crop_scale"]), flip_prob=0.0, photometric=None)]

    def draw_masks(self, batch: int, generator: torch.Generator) -> MultiBlockMasks:
        """The step's multi-block masks (on the CPU): contexts padded, targets ``(B, M, T)``."""
        o = self.options
        return multiblock_masks(batch, self.grid, cpu_generator(generator), num_targets=o["num_targets"],
                                target_scale=tuple(o["target_scale"]), target_aspect=tuple(o["target_aspect"]),
                                context_scale=tuple(o["context_scale"]), min_context=o["min_context"])

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        batch = batches["train"]
        (view,) = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
        images = view.images
        masks = self.draw_masks(images.shape[0], step.generator)
        context, valid, target_index = (t.to(images.device) for t in (masks.context, masks.context_valid,
                                                                       masks.targets))
        with torch.no_grad():
            target_tokens = self.teacher["backbone"](images)["patch"]
            targets = layer_normalized_targets(target_tokens, target_index)
        context_tokens = self.student["backbone"](images, keep_indices=context, keep_valid=valid)["patch"]
        predictions = self.student["predictor"](context_tokens, context, valid, target_index)
        loss = ijepa_loss(predictions, targets, self.options["loss"])
        return {"loss": loss, "metrics": {
            "context_patches": valid.sum(dim=1).float().mean(),
            # Collapse check on the targets themselves: ~1 while target tokens differ, 0 if they coincide.
            "embedding_std": normalized_embedding_std(targets.reshape(-1, targets.shape[-1])),
        }}
