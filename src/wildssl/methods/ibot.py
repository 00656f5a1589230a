"""iBOT (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022): DINO's cls
self-distillation plus masked patch self-distillation, both from an EMA teacher.

Per image: two global crops and ``n_local`` local crops (DINO's multi-crop). The student sees the global
crops with blockwise-masked patches replaced by the mask token (a ratio drawn per crop from
``mask_ratio``, for a ``mask_probability`` share of the crops; the rest are left whole, which is iBOT's
``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``) and the local crops whole; the teacher sees the global
crops whole. Two losses (Eq. 1 and the [CLS] loss of Sec. 3.2), each with its own centering and
teacher-temperature schedule (:class:`~wildssl.methods.distillation.SelfDistillation`, twice):

- cls: DINO's cross-entropy of every student crop's cls logits against every *other* global teacher crop;
- patch (masked image modeling): per global crop, the student's patch logits at the masked positions
  against the teacher's patch logits of the same crop (:func:`~wildssl.losses.patch_loss.masked_patch_cross_entropy`;
  the student's head runs on the masked patches only, the teacher's on all of them for the centering).

Loss = ``cls_loss_weight * cls + patch_loss_weight * patch`` (iBOT's lambda1 = lambda2 = 1), plus DINOv2's
KoLeo term on the student's image tokens when ``koleo_weight`` is set (:mod:`wildssl.methods.koleo`, as DINO's).
``photometric`` chooses the crops' colour pipelines and ``pool`` the image token (the cls token, iBOT's, or the
mean patch token; the k-NN reads the same) as DINO's do. The head's
MLP is shared by cls and patch tokens; ``shared_head`` says whether their prototypes are shared too.
"""

from __future__ import annotations

import numpy as np
import torch

from wildssl.data.masking import blockwise_masks, cpu_generator
from wildssl.data.views import make_views
from wildssl.errors import ConfigError
from wildssl.losses.dino_loss import entropy
from wildssl.losses.patch_loss import masked_rows_cross_entropy
from wildssl.methods.base import Method, StepContext, check_pool, normalized_embedding_std, pooled, pooled_features
from wildssl.methods.distillation import (DISTILLATION_DEFAULTS, MULTI_CROP_VIEW_DEFAULTS, SelfDistillation,
                                          multi_crop_specs)
from wildssl.methods.koleo import KOLEO_DEFAULTS, KoLeoTerm
from wildssl.models.heads import IBOTHead

PATCH = "patch_"  # option and schedule prefix of the patch distillation


def check_mask_options(options: dict) -> tuple[float, float]:
    """``method.mask_ratio`` as a (low, high) tuple, or a one-line ConfigError."""
    ratio = options["mask_ratio"]
    if not (isinstance(ratio, (list, tuple)) and len(ratio) == 2 and 0.0 <= ratio[0] <= ratio[1] < 1.0):
        raise ConfigError(f"method.mask_ratio={ratio!r} must be a range [low, high] with 0 <= low <= high < 1 "
                          "(iBOT and SlotMIM: [0.1, 0.5])")
    return float(ratio[0]), float(ratio[1])


def ibot_masks(count: int, grid: tuple[int, int], ratio_range: tuple[float, float], generator: torch.Generator,
               probability: float = 1.0) -> torch.Tensor:
    """``(count, h * w)`` bool masks as iBOT's data loader draws them: per crop, with probability
    ``probability`` a blockwise mask with a ratio uniform in ``ratio_range``, else nothing.

    iBOT's smallest block is ``(min(h, w) // 3) ** 2`` patches (16 on the 14 x 14 grid of a 224 px crop)."""
    generator = cpu_generator(generator)
    min_block = max(1, (min(grid) // 3) ** 2)
    if probability >= 1.0:
        return blockwise_masks(count, grid, ratio_range, generator, min_block=min_block)
    chosen = torch.rand(count, generator=generator) < probability  # only these crops get a mask drawn
    masks = torch.zeros(count, grid[0] * grid[1], dtype=torch.bool)
    masks[chosen] = blockwise_masks(int(chosen.sum()), grid, ratio_range, generator, min_block=min_block)
    return masks


def patch_options(options: dict) -> dict:
    """The patch distillation's options (``patch_*`` keys): the method's own ``patch_*`` values where it has
    them (``patch_out_dim``, ``patch_teacher_temp``, ``patch_warmup_teacher_temp``), the cls values else."""
    return {PATCH + key: options.get(PATCH + key, options[key]) for key in DISTILLATION_DEFAULTS}


class IBOT(Method):
    name = "ibot"
    defaults = {
        **DISTILLATION_DEFAULTS,
        **MULTI_CROP_VIEW_DEFAULTS,  # the crops and their colour pipelines, as DINO's (distillation.multi_crop_specs)
        "pool": "cls",  # the image token of the cls loss, KoLeo and k-NN: cls, or avg (the mean patch token)
        **KOLEO_DEFAULTS,  # DINOv2's KoLeo term on the student's image token of each global crop (0 = iBOT)
        "out_dim": 8192,
        "patch_out_dim": 8192,
        "shared_head": True,
        "patch_teacher_temp": 0.07,
        "patch_warmup_teacher_temp": 0.04,
        "mask_ratio": [0.1, 0.5],
        "mask_probability": 0.5,
        "cls_loss_weight": 1.0,
        "patch_loss_weight": 1.0,
    }
    uses_mask_token = True
    eval_network = "teacher"  # iBOT reports its EMA teacher, as DINO

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        check_pool(o["pool"])
        self.mask_ratio = check_mask_options(o)
        if not 0.0 <= o["mask_probability"] <= 1.0:
            raise ConfigError(f"method.mask_probability={o['mask_probability']} must be in [0, 1] (iBOT: 0.5)")
        self.distillation = SelfDistillation(o)
        self._check_min_batch(config["train"]["batch_size"], self.distillation.min_batch())
        self.patch_distillation = SelfDistillation(patch_options(o), prefix=PATCH)
        self.student["head"] = IBOTHead(self.student["backbone"].embed_dim, o["out_dim"], o["patch_out_dim"],
                                        o["hidden_dim"], o["bottleneck_dim"], o["head_layers"], o["norm_last_layer"],
                                        shared_prototypes=o["shared_head"])
        self.make_teacher()
        self.specs = multi_crop_specs(o)
        self.n_global = len(self.specs) - o["n_local"]
        self.koleo = KoLeoTerm(o, config)

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return {**self.distillation.schedules(total_steps, steps_per_epoch),
                **self.patch_distillation.schedules(total_steps, steps_per_epoch), **self.koleo.schedules(total_steps)}

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        o = self.options
        batch = batches["train"]
        views = make_views(batch["image"], self.specs, step.generator, aspect=batch["aspect"])
        global_images = torch.cat([v.images for v in views[: self.n_global]])  # (G * B, 3, S, S)
        grid = self.student["backbone"].patch_grid(*global_images.shape[-2:])
        masks = ibot_masks(global_images.shape[0], grid, self.mask_ratio, step.generator,
                           o["mask_probability"]).to(global_images.device)
        teacher_temp = self.distillation.teacher_temp(step.values)
        patch_teacher_temp = self.patch_distillation.teacher_temp(step.values)

        with torch.no_grad():
            teacher = self.teacher["backbone"](global_images)
            teacher_image = pooled(teacher, o["pool"])
            teacher_cls, teacher_patch = self.teacher["head"].forward_tokens(teacher_image, teacher["patch"])
            cls_probs = self.distillation.targets(teacher_cls, teacher_temp)
            # The center moves with the mean over all patches (iBOT's), so the teacher's head sees them all.
            patch_probs = self.patch_distillation.targets(teacher_patch.flatten(0, 1), patch_teacher_temp)
            patch_probs = patch_probs.view(teacher_patch.shape)

        head = self.student["head"]
        student = self.student["backbone"](global_images, mask=masks)
        student_image = pooled(student, o["pool"])
        # The student's head runs on the masked patches only: the loss reads no other patch logits, and the
        # head acts on each token alone, so the loss and its gradient are those of the head on every patch.
        student_cls, student_masked = head.forward_tokens(student_image, student["patch"][masks])
        student_logits = list(student_cls.chunk(self.n_global))
        local_features = pooled_features(self.student["backbone"], [v.images for v in views[self.n_global:]], o["pool"])
        if local_features:
            student_logits += list(head(torch.cat(local_features)).chunk(len(local_features)))
        cls_loss = self.distillation.loss(student_logits, cls_probs.chunk(self.n_global))
        # The mean over the global crops of each crop's masked_patch_cross_entropy (the crops hold B images each).
        patch_loss = masked_rows_cross_entropy(student_masked, patch_probs[masks], masks, o["student_temp"])

        metrics = {**self.distillation.metrics(cls_probs, teacher_temp),
                   "cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach(),
                   "patch_teacher_entropy": entropy(patch_probs).mean(), "patch_teacher_temp": patch_teacher_temp,
                   "masked_fraction": masks.float().mean(),
                   "embedding_std": normalized_embedding_std(teacher_image)}
        metrics.pop("uniform_loss")  # the loss sums two distillations: ln K is no uniform-collapse level of it
        loss = o["cls_loss_weight"] * cls_loss + o["patch_loss_weight"] * patch_loss
        # DINOv2 (which builds on iBOT): one KoLeo term per global crop, on the student's image token of the masked crop
        loss = self.koleo.add(loss, metrics, list(student_image.chunk(self.n_global)), step.values)
        return {"loss": loss, "metrics": metrics}
