"""Annotation bootstrapping (seed 000, Alg. 1-2, Eq. 3-5) as one wrapper over a base method.

The base method (CLIP, SimCLR or DINO) learns p(annotation | image) on the **annotation** stream with
its own loss. On the **bootstrap** stream (unlabeled images) every image gets ``n`` crops
(RandomResizedCrop scale 0.05-1, no flip, no photometric augmentation); for each ordered pair (i, j),
i != j, a box-query decoder reads crop i's backbone tokens and the box of crop j in crop i's frame
(``phi_AB``), and predicts the annotation distribution that the EMA teacher's base method gives crop j:

    q(l_k | x_i, box_ij) = softmax_k(t_AB * cos(phi_AB(x_i, box_ij), psi_AB(l_k)))
    loss = base_loss(annotation batch) + ratio * CE(p_teacher(l | x_j), q(l | x_i, box_ij))

averaged over all n^2 - n pairs of all bootstrap images, which run in one packed decoder pass.
``psi_AB`` is an annotation head of its own on the **student's** annotation backbone, trained by the
bootstrap loss (Alg. 1): a Linear on the text tower's caption features (CLIP), a Linear on the image
backbone's features of the annotation images' second SimCLR views (SimCLR), a learned K x D embedding
matrix (DINO); see :class:`~wildssl.methods.base.AnnotationInput`. The targets are the teacher's base
distribution over the same K annotations (:meth:`~wildssl.methods.base.Method.annotation_space`).

Ablations (each one ``method.*`` key, each changing only what it names):
``ab_ema_target`` (false: targets from the student under stop-gradient), ``ab_box_tokens`` (false: a
learned mask token replaces the box tokens), ``ab_photometric`` (a pipeline name: augment the bootstrap
crops), ``ab_base_loss`` (false: bootstrap loss only), ``ab_iou_range`` (each pair's target is drawn from
the crops' RandomResizedCrop until its IoU with the source lies in the range; the sources and the
number of pairs drawn are unchanged, and a pair whose draws found no such target is left out of the loss:
the share that found one is logged as ``iou_range_found``, and a range none can reach raises an alarm; see
:func:`~wildssl.data.pairs.sample_targets_in_iou_range`).
"""

from __future__ import annotations

import torch

from wildssl.data.pairs import check_iou_range, pack_pairs, sample_targets_in_iou_range
from wildssl.data.views import CropSpec, crops_at_boxes, make_views
from wildssl.errors import ConfigError
from wildssl.losses.bootstrap_loss import bootstrap_agreement, bootstrap_loss
from wildssl.methods.base import StepContext
from wildssl.methods.clip import CLIP
from wildssl.methods.dino import DINO
from wildssl.methods.simclr import SimCLR
from wildssl.models.box_decoder import AnnotationBootstrapHead, BoxQueryDecoder

# Mixed into the step's seed for the bootstrap crops (any constant works; named so it is not a mystery).
BOOTSTRAP_SEED_SALT = 0x5EED_AB

# The method.ab_* keys (the base method's keys are its own; recipes ab_X inherit everything else from X).
AB_DEFAULTS = {
    "ab_n_crops": 4,  # crops per bootstrap image; n (n - 1) ordered pairs each
    "ab_crop_size": 224,  # pixels of each bootstrap crop
    "ab_crop_scale": [0.05, 1.0],  # RandomResizedCrop area range of the bootstrap crops
    "ab_decoder_depth": 6,  # box-query decoder blocks
    "ab_decoder_width": 384,  # decoder width (ViT-S's), also the width of phi_AB and psi_AB
    "ab_decoder_heads": 6,
    "ab_num_bins": 100,  # bins per box coordinate (box tokens)
    "ab_box_range": [-2.0, 3.0],  # relative-box coordinates outside it fall into the edge bins
    "ab_loss_ratio": 1.0,  # weight of the bootstrap loss against the base loss
    "ab_ema_target": True,  # ablation, false: targets from the student under stop-gradient
    "ab_box_tokens": True,  # ablation, false: one learned mask token instead of the box tokens
    "ab_photometric": None,  # ablation: a photometric pipeline name (e.g. simclr) for the bootstrap crops
    "ab_base_loss": True,  # ablation, false: the bootstrap loss alone
    "ab_iou_range": [0.0, 1.0],  # ablation: source/target IoU range of every pair ([0, 1]: all pairs)
}


class AnnotationBootstrapping:
    """Mixin placed before a base method class: ``class ABDINO(AnnotationBootstrapping, DINO)``.

    The base keeps its student/teacher and loss; this adds ``student["bootstrap"]`` (decoder, psi_AB and
    t_AB: :class:`~wildssl.models.box_decoder.AnnotationBootstrapHead`) and an EMA teacher when the base
    has none (the targets come from it)."""

    streams = ("annotation", "bootstrap")

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        if o["ab_n_crops"] < 2:
            raise ConfigError(f"method.ab_n_crops={o['ab_n_crops']} must be at least 2 (pairs of crops)")
        if self.teacher is None and o["ab_ema_target"]:
            self.make_teacher()  # before adding the bootstrap head: it has no EMA copy
        decoder = BoxQueryDecoder(self.student["backbone"].embed_dim, o["ab_decoder_width"],
                                  o["ab_decoder_depth"], o["ab_decoder_heads"], num_bins=o["ab_num_bins"],
                                  value_range=tuple(o["ab_box_range"]), use_box_tokens=o["ab_box_tokens"])
        annotation = self.annotation_input()
        self.student["bootstrap"] = AnnotationBootstrapHead(decoder, feature_dim=annotation.feature_dim,
                                                            num_annotations=annotation.num_annotations)
        # Not flipped (the paper's Table 7): the box tokens say where a crop lies, not whether it is mirrored.
        self.bootstrap_spec = CropSpec(o["ab_crop_size"], tuple(o["ab_crop_scale"]), flip_prob=0.0,
                                       photometric=o["ab_photometric"])
        self.bootstrap_specs = [self.bootstrap_spec] * o["ab_n_crops"]
        low, high = check_iou_range(o["ab_iou_range"])
        self.iou_range = (low, high) if (low, high) != (0.0, 1.0) else None

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
        return torch.Generator(device=device).manual_seed(step.generator.initial_seed() ^ BOOTSTRAP_SEED_SALT)

    def bootstrap(self, bootstrap_batch: dict, annotation_batch: dict, step: StepContext) -> dict:
        """Bootstrap loss and diagnostics for one bootstrap batch; see the module docstring."""
        o = self.options
        n = o["ab_n_crops"]
        generator = self.bootstrap_generator(step)
        views = make_views(bootstrap_batch["image"], self.bootstrap_specs, generator, aspect=bootstrap_batch["aspect"])
        images = torch.cat([v.images for v in views])  # (n * B, 3, h, w), crop-major
        batch = views[0].images.shape[0]
        boxes = torch.stack([v.boxes for v in views], dim=1)  # (B, n, 4)
        flipped = torch.stack([v.flipped for v in views], dim=1)  # (B, n)
        found = None
        if self.iou_range is None:  # pair (i, j)'s target is crop j: the teacher sees the n crops
            pairs = pack_pairs(boxes, flipped)
            target_images = images
        else:  # every pair has a target crop of its own, in the IoU range: the teacher sees n (n - 1) crops
            target_boxes, found = sample_targets_in_iou_range(
                boxes, *self.iou_range, self.bootstrap_spec.scale, self.bootstrap_spec.ratio,
                aspect=bootstrap_batch["aspect"], generator=generator)
            pairs = pack_pairs(boxes, flipped, target_boxes=target_boxes)
            target_images = crops_at_boxes(bootstrap_batch["image"], target_boxes, o["ab_crop_size"], generator,
                                           o["ab_photometric"])  # (P * B, 3, h, w), pair-major

        tokens = self.student["backbone"].forward_features(images)
        memory = tokens.view(n, batch, *tokens.shape[1:]).transpose(0, 1)  # (B, n, T, D)
        head = self.student["bootstrap"]
        phi = head(memory, pairs["relative_boxes"])  # (B, P, D)

        targets = self.teacher if o["ab_ema_target"] else self.student
        target_logits = self.annotation_space(targets, target_images, annotation_batch, step).logits
        if found is None:
            teacher_logits = target_logits.view(n, batch, -1).transpose(0, 1)[:, pairs["tgt_idx"]]  # (B, P, K)
        else:
            teacher_logits = target_logits.view(-1, batch, target_logits.shape[-1]).transpose(0, 1)  # (B, P, K)
        features = None if head.fixed_set else self.annotation_features(self.student, annotation_batch, step)
        student_logits = head.logits(phi, head.annotations(features))  # (B, P, K), fp32
        loss = bootstrap_loss(student_logits, teacher_logits, valid=found)
        metrics = {"bootstrap_loss": loss.detach()}
        if found is not None:
            metrics["iou_range_found"] = found.float().mean()  # pairs with an in-range target (the rest left out)
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
