"""Online linear probe during pre-training, on a detached feature (solo-learn's online linear evaluation).

With ``eval.online_probe: true`` the engine gives every finite training step's first-stream batch to an
:class:`OnlineProbe`: the evaluated encoder (``eval.encoder``, the method's ``eval_network`` by default)
encodes the batch's labelled images at the eval resolution in eval mode under ``no_grad`` (the feature is
detached: nothing flows back into the encoder), and a :class:`~wildssl.eval.linear.LinearClassifier`
(BatchNorm without affine + linear, the offline probe's head) takes one AdamW step on them.

``online_probe_top1`` is the accuracy on each batch *before* the probe trains on it (progressive
validation), averaged over the last :data:`WINDOW` steps with labels: within the first epoch every batch
is unseen, so it tracks generalization without a separate split or run; ``online_probe_loss`` likewise.
The probe is the engine's, not the method's: it is not in the checkpoint, it changes no weight,
optimizer state or RNG stream of the run (a run with and without it ends with the same weights), and
after a resume it starts again. Under DDP each rank trains its own copy; the main process's figures
are logged.
"""

from __future__ import annotations

import logging
from collections import deque

import torch
import torch.nn.functional as F

from wildssl.data.views import preprocess_images
from wildssl.eval.linear import LinearClassifier
from wildssl.eval.probe import seeded

log = logging.getLogger("wildssl")

LEARNING_RATE = 1e-3  # AdamW; the BatchNorm makes one rate fit every encoder's feature scale
WINDOW = 20  # steps the logged figures average over (one batch alone is noisy)


class OnlineProbe:
    """A linear classifier trained step by step on detached features of the evaluated encoder."""

    def __init__(self, dim: int, num_classes: int, image_size: int, pool: str, teacher: bool | None,
                 device: torch.device | str, use_bf16: bool = False, seed: int = 0) -> None:
        with seeded(seed):  # the run's global RNG stream is left as it was
            self.classifier = LinearClassifier(dim, num_classes, norm_momentum=0.1).to(device)  # features drift
        self.optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
        self.image_size, self.pool, self.teacher = image_size, pool, teacher
        self.device = torch.device(device)
        self.use_bf16 = use_bf16
        self.recent: deque[tuple[float, float]] = deque(maxlen=WINDOW)  # (loss, top1) of the last steps

    @torch.no_grad()
    def features(self, method, images: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, D)`` float32 of uint8 images ``(B, 3, S, S)``, encoder in eval mode."""
        encoder = method.encoder(self.teacher)
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                out = encoder(preprocess_images(images, self.image_size))
        finally:
            encoder.train(was_training)
        return (out["cls"] if self.pool == "cls" else out["patch"].mean(dim=1)).float()

    def step(self, method, batch: dict) -> dict[str, float]:
        """Score, then train on, the labelled images of one batch; ``{}`` when it has none."""
        labelled = batch["label"] >= 0
        if not bool(labelled.any()):
            return {}
        features = self.features(method, batch["image"][labelled])
        labels = batch["label"][labelled].to(features.device)
        self.classifier.train()
        logits = self.classifier(features)
        top1 = (logits.detach().argmax(dim=1) == labels).float().mean()
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.recent.append((float(loss.detach()), float(top1)))
        return {"online_probe_loss": sum(r[0] for r in self.recent) / len(self.recent),
                "online_probe_top1": sum(r[1] for r in self.recent) / len(self.recent)}


def make_online_probe(config: dict, source, method, device: torch.device | str) -> OnlineProbe | None:
    """The engine's online probe when ``eval.online_probe`` is on and ``source`` (the first stream) has
    class labels; None otherwise (with a log line saying why)."""
    ecfg = config["eval"]
    if not ecfg["online_probe"]:
        return None
    labels = source.class_labels()
    classes = getattr(source, "classes", None)
    if classes:
        num_classes = len(classes)
    elif labels is not None and max(labels, default=-1) >= 0:
        num_classes = max(labels) + 1
    else:
        log.warning("online probe is off: %s has no class labels to train it on", source.describe())
        return None
    teacher = None if ecfg["encoder"] == "auto" else ecfg["encoder"] == "teacher"
    dim = method.encoder(teacher).embed_dim
    device = torch.device(device)
    precision = config["train"]["precision"]
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return OnlineProbe(dim, num_classes, ecfg["image_size"] or config["model"]["img_size"], ecfg["pool"], teacher,
                       device, use_bf16, seed=config["train"]["seed"])
