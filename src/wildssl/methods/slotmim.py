"""SlotMIM (seed 004: Wen et al., "A Data-Centric Revisit of Pre-Trained Vision Models for Robot Learning",
CVPR 2025; code: github.com/CVMI-Lab/SlotMIM, ``models/slotmim.py``): object-centric pre-training on
scene images by patch-level self-distillation over few prototypes, plus a contrastive loss on slots.

Per image, two global crops, the second drawn to overlap the first (:mod:`wildssl.data.overlap`); no
local crops. The student sees both crops with iBOT's blockwise masks (ratio ~ U[0.1, 0.5]), the EMA
teacher sees them whole. Patch tokens go through a DINO-style projector; a patch's scores are the
cosines of its projection with ``num_prototypes`` prototypes (512 for scene data, 1024 otherwise: the
paper's semantic bottleneck). With teacher targets centered and sharpened as in DINO:

- within-view patch loss (iBOT's masked image modeling): at the masked patches of each crop, the student's
  prototype distribution against the teacher's of the same crop;
- cross-view patch loss: both crops' score maps are resampled on the region the crops share (RoIAlign,
  :func:`wildssl.models.roi_align.align_to_overlap`), and each student cell is trained towards the
  teacher's distribution at the same place *of the other crop*;
- slot loss: slots are the patch projections pooled by their soft prototype assignments
  (:mod:`wildssl.models.slots`); the slots a prototype owns (arg-max of some patch) in both the student's
  crop and the teacher's other crop are queries of a MoCo-v3-style contrastive loss through a predictor
  MLP (:mod:`wildssl.losses.slot_loss`).

Every loss is the mean of its two directions (crop 1 -> 2 and 2 -> 1), and::

    loss = patch_loss_weight * (within + cross) + slot_loss_weight * slot

``patch_loss_weight`` (lambda1) and ``slot_loss_weight`` (lambda2) are 0.5 each: the released code weighs
the patch losses by ``group_loss_weight`` and the slot loss by ``1 - group_loss_weight``, with
``--group-loss-weight 0.5`` in every released pre-training script (``scripts/slotmim_*.sh``) and the
``--mask-loss-weight`` / ``--cross-loss-weight`` defaults of 1 (``main_pretrain_mim.py``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wildssl.data.overlap import overlap_in_views, overlapping_views
from wildssl.data.views import CropSpec
from wildssl.errors import ConfigError
from wildssl.losses.patch_loss import patch_cross_entropy
from wildssl.losses.slot_loss import matched_slots, slot_contrastive_loss
from wildssl.methods.base import Method, StepContext, normalized_embedding_std
from wildssl.methods.distillation import SelfDistillation
from wildssl.methods.ibot import check_mask_options, ibot_masks
from wildssl.models.roi_align import align_to_overlap
from wildssl.models.slots import attentive_slot_pooling, owned_prototypes


class ActiveSlotMean(nn.Module):
    """Running mean, over the steps of the current epoch, of the number of active slots per image (the
    released code's ``n_slot`` meter). A pending-state module: a step's value counts only after the step
    proved finite (:meth:`commit_step`); :meth:`reset` starts a new epoch."""

    total: torch.Tensor
    count: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("total", torch.zeros(()))
        self.register_buffer("count", torch.zeros(()))
        self.pending: torch.Tensor | None = None

    def observe(self, value: torch.Tensor) -> torch.Tensor:
        """Record this step's ``value`` (a scalar) and return the running mean including it."""
        self.pending = value.detach().float()
        return (self.total + self.pending) / (self.count + 1)

    @torch.no_grad()
    def commit_step(self) -> None:
        if self.pending is not None:
            self.total += self.pending
            self.count += 1
        self.discard_step()

    def discard_step(self) -> None:
        self.pending = None

    @torch.no_grad()
    def reset(self) -> None:
        self.total.zero_()
        self.count.zero_()


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SlotMIM's slot predictor: Linear -> GELU -> Linear, truncated-normal init (its ``DINOHead`` with
    ``nlayers=2``)."""
    layers = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
    for layer in (layers[0], layers[2]):
        nn.init.trunc_normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    return layers


def _rows(score_map: torch.Tensor) -> torch.Tensor:
    """``(B, K, h, w)`` -> ``(B * h * w, K)``."""
    return score_map.permute(0, 2, 3, 1).flatten(0, 2)


class SlotMIM(Method):
    name = "slotmim"
    defaults = {
        "crop_size": 224,
        "crop_scale": [0.08, 1.0],
        "min_overlap": 0.01,  # the second crop covers >= 1% of its area inside the first (SlotCon's two-crop)
        "num_prototypes": 1024,  # 1024 for object-centric or mixed data; the scene recipes use 512
        "hidden_dim": 2048,
        "bottleneck_dim": 256,
        "head_layers": 3,
        "student_temp": 0.1,
        "teacher_temp": 0.07,
        "warmup_teacher_temp": 0.04,
        "teacher_temp_warmup_epochs": 50.0,
        "center_momentum": 0.9,
        "centering": "center",
        "mask_ratio": [0.1, 0.5],
        "slot_temperature": 0.2,
        "patch_loss_weight": 0.5,
        "slot_loss_weight": 0.5,
    }
    uses_mask_token = True
    eval_network = "teacher"  # the released k-NN evaluation reads the EMA encoder (encoder_k)

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        self.mask_ratio = check_mask_options(o)
        if o["slot_temperature"] <= 0:
            raise ConfigError(f"method.slot_temperature={o['slot_temperature']} must be > 0 (SlotMIM: 0.2)")
        # Scores are cosines with the prototypes (the released SemanticGrouping normalizes both), which is a
        # DINO head with its prototype norms fixed at 1.
        self.distillation = SelfDistillation({**o, "out_dim": o["num_prototypes"], "norm_last_layer": True})
        width = self.student["backbone"].embed_dim
        self.student["head"] = self.distillation.build_head(width)
        self.student["predictor"] = _mlp(o["bottleneck_dim"], o["hidden_dim"], o["bottleneck_dim"])
        self.make_teacher(["backbone", "head"])
        self.specs = [CropSpec(o["crop_size"], tuple(o["crop_scale"]), photometric="dino_global1"),
                      CropSpec(o["crop_size"], tuple(o["crop_scale"]), photometric="dino_global2")]
        self.active_slots = ActiveSlotMean()

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return self.distillation.schedules(total_steps, steps_per_epoch)

    def on_epoch_end(self, epoch: int) -> None:
        self.active_slots.reset()

    @staticmethod
    def _project(networks: nn.ModuleDict, images: torch.Tensor, mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch tokens ``(B, N, width)``, their projections ``(B, N, d)`` and prototype scores ``(B, N, K)``."""
        patches = networks["backbone"](images, mask=mask)["patch"]
        head = networks["head"]
        projections = head.mlp(patches)
        return patches, projections, head.last_layer(F.normalize(projections, dim=-1))

    def _slot_loss(self, student_slots: torch.Tensor, student_owned: torch.Tensor, teacher_slots: torch.Tensor,
                   teacher_owned: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Slot loss of one direction and its number of queries."""
        index = matched_slots(student_owned, teacher_owned)
        queries = self.student["predictor"](student_slots.flatten(0, 1)[index])
        return slot_contrastive_loss(queries, index, teacher_slots, teacher_owned,
                                     self.options["slot_temperature"]), int(index.numel())

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        o = self.options
        batch = batches["train"]
        view_a, view_b = overlapping_views(batch["image"], self.specs, step.generator, batch["aspect"],
                                           o["min_overlap"])
        images = torch.cat([view_a.images, view_b.images])  # (2B, 3, S, S): rows [0, B) crop a, [B, 2B) crop b
        size = view_a.images.shape[0]
        grid = self.student["backbone"].patch_grid(*images.shape[-2:])
        masks = ibot_masks(images.shape[0], grid, self.mask_ratio, step.generator).to(images.device)
        teacher_temp = self.distillation.teacher_temp(step.values)
        overlap = overlap_in_views(view_a.boxes, view_b.boxes, view_a.flipped, view_b.flipped)
        boxes, flips = (overlap.in_a, overlap.in_b), (view_a.flipped, view_b.flipped)

        def aligned(scores: torch.Tensor) -> list[torch.Tensor]:
            """Both crops' ``(B, N, K)`` scores resampled on their overlap: ``[(B * h * w, K)] * 2``."""
            maps = scores.float().transpose(1, 2).unflatten(-1, grid)  # (2B, K, h, w)
            return [_rows(align_to_overlap(m, box, flip)) for m, box, flip in zip(maps.split(size), boxes, flips)]

        _, student_proj, student_scores = self._project(self.student, images, masks)
        with torch.no_grad():
            teacher_patches, teacher_proj, teacher_scores = self._project(self.teacher, images, None)
            probs = self.distillation.targets(teacher_scores.flatten(0, 1), teacher_temp).view(teacher_scores.shape)
            aligned_probs = [torch.softmax(self.distillation.centered_logits(t, teacher_temp), dim=-1)
                             for t in aligned(teacher_scores)]
            teacher_slots = attentive_slot_pooling(teacher_proj, teacher_scores, teacher_temp)
            teacher_owned = owned_prototypes(teacher_scores)

        temp = o["student_temp"]
        within = torch.stack([patch_cross_entropy(s[m], t[m], temp) for s, t, m in
                              zip(student_scores.split(size), probs.split(size), masks.split(size))]).mean()
        cells = overlap.valid.float().repeat_interleave(grid[0] * grid[1])  # pairs that share no region: weight 0
        student_aligned = aligned(student_scores)
        cross = (patch_cross_entropy(student_aligned[0], aligned_probs[1], temp, cells)
                 + patch_cross_entropy(student_aligned[1], aligned_probs[0], temp, cells)) / 2

        student_slots = attentive_slot_pooling(student_proj, student_scores, teacher_temp).split(size)
        student_owned = owned_prototypes(student_scores).split(size)
        teacher_slots, teacher_owned = teacher_slots.split(size), teacher_owned.split(size)
        slot_ab, queries_ab = self._slot_loss(student_slots[0], student_owned[0], teacher_slots[1], teacher_owned[1])
        slot_ba, queries_ba = self._slot_loss(student_slots[1], student_owned[1], teacher_slots[0], teacher_owned[0])
        slot = (slot_ab + slot_ba) / 2

        active = torch.cat(teacher_owned).sum(dim=1).float().mean()
        metrics = {"within_loss": within.detach(), "cross_loss": cross.detach(), "slot_loss": slot.detach(),
                   "active_slots": active, "active_slots_mean": self.active_slots.observe(active),
                   "slot_queries_per_image": (queries_ab + queries_ba) / (2 * size),
                   "overlap_fraction": overlap.valid.float().mean(),
                   **self.distillation.metrics(probs.flatten(0, 1), teacher_temp),
                   "embedding_std": normalized_embedding_std(teacher_patches.mean(dim=1))}
        metrics.pop("uniform_loss")  # the loss sums three terms: ln K is no uniform-collapse level of it
        loss = o["patch_loss_weight"] * (within + cross) + o["slot_loss_weight"] * slot
        return {"loss": loss, "metrics": metrics}
