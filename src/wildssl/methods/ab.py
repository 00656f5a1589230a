"""Annotation bootstrapping (seed 000, Alg. 1-2, Eq. 3-5) as one wrapper over a base method.

The base method (CLIP, SimCLR or DINO) learns p(annotation | image) on the **annotation** stream with
its own loss. On the **bootstrap** stream (unlabeled images) every image gets ``n`` crops
(RandomResizedCrop scale 0.05-1, no photometric augmentation); for each ordered pair (i, j), i != j, a
box-query decoder reads crop i's backbone tokens and the box of crop j in crop i's frame, and predicts
the annotation distribution that the EMA teacher's base method gives crop j:

    loss = base_loss(annotation batch) + ratio * CE(softmax(teacher logits_j), log_softmax(student logits_ij))

averaged over all n^2 - n pairs of all bootstrap images, which run in one packed decoder pass.

Ablations (each one ``method.*`` key, each changing only what it names):
``ab_ema_target`` (false: targets from the student under stop-gradient), ``ab_box_tokens`` (false: a
learned mask token replaces the box tokens), ``ab_photometric`` (a pipeline name: augment the bootstrap
crops), ``ab_base_loss`` (false: bootstrap loss only), ``ab_iou_range`` (only pairs whose source/target
IoU lies in the range count; crops are sampled as usual, so crop marginals are unchanged).
"""

from __future__ import annotations

import torch

from wildssl.data.pairs import pack_pairs, sample_pairs_in_iou_range
from wildssl.data.views import CropSpec, make_views
from wildssl.errors import ConfigError
from wildssl.losses.bootstrap_loss import bootstrap_agreement, bootstrap_loss
from wildssl.methods.base import StepContext
from wildssl.methods.clip import CLIP
from wildssl.methods.dino import DINO
from wildssl.methods.simclr import SimCLR
from wildssl.models.box_decoder import AnnotationBootstrapHead, BoxQueryDecoder

AB_DEFAULTS = {
    "ab_n_crops": 4,
    "ab_crop_size": 224,
    "ab_crop_scale": [0.05, 1.0],
    "ab_decoder_depth": 6,
    "ab_decoder_width": 384,
    "ab_decoder_heads": 6,
    "ab_num_bins": 100,
    "ab_box_range": [-2.0, 3.0],
    "ab_loss_ratio": 1.0,
    "ab_ema_target": True,
    "ab_box_tokens": True,
    "ab_photometric": None,
    "ab_base_loss": True,
    "ab_iou_range": [0.0, 1.0],
}


class AnnotationBootstrapping:
    """Mixin placed before a base method class: ``class ABDINO(AnnotationBootstrapping, DINO)``.

    The base keeps its student/teacher and loss; this adds ``student["bootstrap"]`` (decoder + psi_AB +
    t_AB) and an EMA teacher when the base has none (the targets come from it)."""

    streams = ("annotation", "bootstrap")

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        if o["ab_n_crops"] < 2:
            raise ConfigError(f"method.ab_n_crops={o['ab_n_crops']} must be at least 2 (pairs of crops)")
        if self.teacher is None and o["ab_ema_target"]:
            self.make_teacher()  # before adding the decoder: the decoder has no EMA copy
        decoder = BoxQueryDecoder(self.student["backbone"].embed_dim, o["ab_decoder_width"],
                                  o["ab_decoder_depth"], o["ab_decoder_heads"], num_bins=o["ab_num_bins"],
                                  value_range=tuple(o["ab_box_range"]), use_box_tokens=o["ab_box_tokens"])
        self.student["bootstrap"] = AnnotationBootstrapHead(decoder, self.annotation_dim())
        # Not flipped (the paper's Table 7): the box tokens say where a crop lies, not whether it is mirrored.
        self.bootstrap_specs = [CropSpec(o["ab_crop_size"], tuple(o["ab_crop_scale"]), flip_prob=0.0,
                                         photometric=o["ab_photometric"])] * o["ab_n_crops"]
        low, high = o["ab_iou_range"]
        self.iou_filter = (low, high) if (low, high) != (0.0, 1.0) else None

    @property
    def may_leave_parameters_unused(self) -> bool:
        # Without the base loss the base method's student heads get no gradient.
        return not self.options["ab_base_loss"]

    def stream_batch_size(self, stream: str, first_batch_size: int) -> int:
        """The paper's bootstrap batch: base batch / n images, each with n crops."""
        return max(1, first_batch_size // self.options["ab_n_crops"])

    def bootstrap_generator(self, step: StepContext) -> torch.Generator:
        """A generator for the bootstrap crops that does not depend on how many numbers the base
        method drew, so switching the base loss off leaves the bootstrap crops unchanged."""
        device = step.generator.device
        return torch.Generator(device=device).manual_seed(step.generator.initial_seed() ^ 0x5EED_AB)

    def bootstrap(self, bootstrap_batch: dict, annotation_batch: dict, step: StepContext) -> dict:
        """Bootstrap loss and diagnostics for one bootstrap batch; see the module docstring."""
        o = self.options
        n = o["ab_n_crops"]
        views = make_views(bootstrap_batch["image"], self.bootstrap_specs, self.bootstrap_generator(step),
                           aspect=bootstrap_batch["aspect"])
        images = torch.cat([v.images for v in views])  # (n * B, 3, h, w), crop-major
        batch = views[0].images.shape[0]
        boxes = torch.stack([v.boxes for v in views], dim=1)  # (B, n, 4)
        flipped = torch.stack([v.flipped for v in views], dim=1)  # (B, n)
        pairs = pack_pairs(boxes, flipped)

        tokens = self.student["backbone"].forward_features(images)
        memory = tokens.view(n, batch, *tokens.shape[1:]).transpose(0, 1)  # (B, n, T, D)
        phi = self.student["bootstrap"](memory, pairs["relative_boxes"])  # (B, P, D)

        targets = self.teacher if o["ab_ema_target"] else self.student
        space = self.annotation_space(targets, images, annotation_batch, step)  # logits (n * B, K)
        teacher_logits = space.logits.view(n, batch, -1).transpose(0, 1)[:, pairs["tgt_idx"]]  # (B, P, K)
        student_logits = self.student["bootstrap"].logits(phi, space.annotations)  # (B, P, K)
        valid = None if self.iou_filter is None else sample_pairs_in_iou_range(boxes, *self.iou_filter)
        loss = bootstrap_loss(student_logits, teacher_logits, valid=valid)
        metrics = {"bootstrap_loss": loss.detach()}
        if step.log:
            metrics.update(bootstrap_agreement(student_logits.detach(), teacher_logits, pairs["iou"]))
        return {"loss": loss, "metrics": metrics}

    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        o = self.options
        # Bootstrap first: its targets must see the base method's state (e.g. DINO's center) before the
        # base step updates it, whether or not the base loss is on.
        boot = self.bootstrap(batches["bootstrap"], batches["annotation"], step)
        metrics = dict(boot["metrics"])
        loss = o["ab_loss_ratio"] * boot["loss"]
        if o["ab_base_loss"]:
            base = super().forward({"train": batches["annotation"]}, step)
            metrics.update(base["metrics"])
            metrics["base_loss"] = base["loss"].detach()
            loss = base["loss"] + loss
        return {"loss": loss, "metrics": metrics}


def _annotation_bootstrapped(base: type, name: str) -> type:
    return type(f"AB{base.__name__}", (AnnotationBootstrapping, base), {
        "name": name, "defaults": {**base.defaults, **AB_DEFAULTS}, "__module__": __name__,
        "__doc__": f"Annotation bootstrapping over {base.__name__} ({base.name} learns p(annotation | image))."})


ABSimCLR = _annotation_bootstrapped(SimCLR, "ab_simclr")
ABDINO = _annotation_bootstrapped(DINO, "ab_dino")
ABCLIP = _annotation_bootstrapped(CLIP, "ab_clip")
