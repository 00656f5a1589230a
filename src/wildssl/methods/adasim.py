"""Positive pairs across images for self-distillation: AdaSim (seed 001, Lebailly et al. ICCV 2023), the
+NN baseline and the supervised oracle, as one mixin over DINO or SimSiam.

A base method learns from a pair of views (t(x_i), t'(x_i)); these variants replace the second image by a
partner j*, chosen before the step by the data sampler's index hook (so the partner's image is loaded like
any other): each step reads its B images i and then their B partners, and the base method cuts its second
view (DINO's second global crop; SimSiam's second view) from the partner. A partner equal to i is the
standard pair, with exactly the standard views.

How the partner is chosen (``pairing``):

- ``adasim``: AdaSim's adaptive rule on the windowed similarity (:mod:`wildssl.methods.similarity_window`,
  Eq. 9-11): once ``adasim_window`` epochs are recorded, j* ~ softmax(m_win(i, .) / adasim_tau) over the
  union support, but only for images that are their own argmax; ``adasim_tau = 0`` is the base method.
- ``nn``: the +NN baseline (NNCLR-style): from the second epoch on, always the nearest other image in the
  cache (the top-K record of i's last visit, computed against the whole cache).
- ``oracle``: the supervised oracle: with probability ``oracle_p_start`` -> ``oracle_p`` (linear per step)
  a uniformly drawn other image of the same class (needs labelled data).

Every variant keeps the latent cache (the base's latent of i's first view: DINO's teacher features, SimSiam's
backbone features) and the per-epoch top-K records, for the rule and for the per-epoch diagnostics:
neighbour ratio, NN top-1 / 2-NN top-1 accuracy (with labels), and the spread of the cache (collapse).

Config keys (``method.*``, besides the base's):

- ``neighbour_topk`` (3): K, the support recorded per image and epoch (+NN needs at least 2);
- ``neighbour_chunk`` (65536): cache rows per block of the top-K search (memory B x chunk);
- ``neighbour_cache_dtype`` (``float32``): ``float16`` / ``bfloat16`` halve the cache and make its search a
  half-precision matmul (GPU recipes; on a CPU half precision is slower);
- ``adasim_tau`` (0.2) and ``adasim_window`` (10): AdaSim's temperature and window w (the seed's Table 4);
- ``oracle_p_start`` (1.0) and ``oracle_p`` (0.5, a choice: the issue fixes only the schedule's shape):
  the oracle's probability of a same-class partner at the first and the last step.

State and exactness: the cache, the records and the completed-epoch count are buffers (in checkpoints);
partners depend only on the records of completed epochs and on a generator seeded by (seed, step, rank),
so a resumed run draws the same partners. Cache and records change only after a finite step, with the
step's updates gathered across ranks first, so every rank holds the same state.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from wildssl import distributed as dist
from wildssl.data.sampler import partner_seed
from wildssl.errors import ConfigError, DataError
from wildssl.methods.base import StepContext
from wildssl.methods.dino import DINO
from wildssl.methods.latent_cache import DEFAULT_CHUNK, LatentCache
from wildssl.methods.similarity_window import (SimilarityWindow, adaptive_partners, nearest_other, spread_of,
                                               windowed_similarity)
from wildssl.methods.simsiam import SimSiam

log = logging.getLogger("wildssl")

PAIRINGS = ("adasim", "nn", "oracle")

# Keys every pairing has: K of the per-epoch top-K records, cache rows per block of the top-K search, and
# the cache's dtype (float16 halves its memory and makes the search a half-precision matmul on a GPU).
PAIR_DEFAULTS = {"neighbour_topk": 3, "neighbour_chunk": DEFAULT_CHUNK, "neighbour_cache_dtype": "float32"}
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The seed's Table 4 default (its best long run: window 50, top-K 10).
ADASIM_DEFAULTS = {"adasim_tau": 0.2, "adasim_window": 10}
ORACLE_DEFAULTS = {"oracle_p_start": 1.0, "oracle_p": 0.5}


def _positive_int(options: dict, key: str, minimum: int = 1) -> int:
    value = options[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"method.{key}={value!r} must be an integer >= {minimum}")
    return value


def _probability(options: dict, key: str) -> float:
    value = options[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"method.{key}={value!r} must be a probability in [0, 1]")
    return float(value)


class NeighbourPairs:
    """Mixin placed before DINO or SimSiam: ``class AdaSimDINO(NeighbourPairs, DINO)``; ``pairing`` names
    the rule (:data:`PAIRINGS`). The base provides ``loss_and_latents(batch, step)`` and accepts
    ``batch["partner_image"]`` / ``batch["partner_aspect"]`` for its second view."""

    pairing: ClassVar[str] = "adasim"
    # The cache and records are identical on every rank by construction; copying them from rank 0 before
    # every forward (DDP's default for buffers) would move N x d floats per step.
    broadcast_buffers = False

    def __init__(self, config: dict):
        super().__init__(config)
        o = self.options
        minimum_topk = 2 if self.pairing == "nn" else 1  # the nearest *other* image needs a second entry
        self.topk = _positive_int(o, "neighbour_topk", minimum_topk)
        self.chunk = _positive_int(o, "neighbour_chunk")
        if o["neighbour_cache_dtype"] not in CACHE_DTYPES:
            raise ConfigError(f"method.neighbour_cache_dtype={o['neighbour_cache_dtype']!r} is not one of "
                              f"{', '.join(CACHE_DTYPES)}")
        self.cache_dtype = CACHE_DTYPES[o["neighbour_cache_dtype"]]
        self.window_size = 1
        if self.pairing == "adasim":
            self.window_size = _positive_int(o, "adasim_window")
            tau = o["adasim_tau"]
            if not isinstance(tau, (int, float)) or isinstance(tau, bool) or tau < 0:
                raise ConfigError(f"method.adasim_tau={tau!r} must be a number >= 0 (0: the base method)")
            self.tau = float(tau)
        if self.pairing == "oracle":
            self.oracle_range = (_probability(o, "oracle_p_start"), _probability(o, "oracle_p"))
        self.cache: LatentCache | None = None
        self.window: SimilarityWindow | None = None
        self.labels: torch.Tensor | None = None  # (N,) long, -1 = none; data, not state
        self.oracle_probability: np.ndarray | None = None

    # -- set-up ------------------------------------------------------------------------------------
    def prepare(self, sources: dict, run_dir) -> None:
        """Size the cache and the records by the training source (N images), on the method's device, and
        read its class labels (for the accuracy diagnostics and the oracle)."""
        super().prepare(sources, run_dir)
        source = sources["train"]
        size = len(source)
        if self.topk > size:  # its records are window x N x K: K = 100,000 on 2,000 images wrote a 6.4 GB checkpoint
            log.warning("method.neighbour_topk=%d is above the %d images of %s; %d neighbours are kept (every image)",
                        self.topk, size, source.describe(), size)
            self.topk = size
        device = next(self.parameters()).device
        self.cache = LatentCache(size, self.student["backbone"].embed_dim, self.chunk, self.cache_dtype).to(device)
        self.window = SimilarityWindow(size, self.topk, self.window_size).to(device)
        labels = source.class_labels()
        self.labels = None
        if labels is not None and any(label >= 0 for label in labels):
            self.labels = torch.tensor(labels, dtype=torch.long)
        if self.pairing == "oracle":
            if self.labels is None:
                raise DataError(f"method {self.name} (the supervised oracle) needs class labels, but "
                                f"{source.describe()} has none; use an image folder with class subfolders or a "
                                "manifest with 'label'")
            self._index_classes(self.labels)

    def _index_classes(self, labels: torch.Tensor) -> None:
        """For same-class draws: the images sorted by label (unlabelled first), each class's first position
        in that order and its size, and every image's position inside its class."""
        self.members = torch.argsort(labels, stable=True)
        labelled = labels >= 0
        self.class_size = torch.bincount(labels[labelled], minlength=int(labels.max()) + 1)
        self.class_start = int((~labelled).sum()) + self.class_size.cumsum(0) - self.class_size
        positions = torch.arange(len(labels)) - self.class_start[labels[self.members].clamp(min=0)]
        self.position_in_class = torch.zeros_like(labels)
        self.position_in_class[self.members] = torch.where(labels[self.members] >= 0, positions, 0)

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        values = super().schedules(total_steps, steps_per_epoch)
        if self.pairing == "oracle":
            start, end = self.oracle_range
            # Read by the index hook, which runs before the step and has no StepContext.
            self.oracle_probability = np.linspace(start, end, total_steps, dtype=np.float64)
        return values

    def schedule_warnings(self, total_steps: int, steps_per_epoch: int) -> list[str]:
        """A run that ends before the first partner can be drawn trains on standard pairs only (its base method):
        AdaSim needs ``adasim_window`` completed epochs of records, nearest-neighbour pairing one."""
        if self.pairing == "adasim":
            epochs = self.window_size if self.tau > 0 else 0  # tau 0 is the base method on purpose
        else:
            epochs = 1 if self.pairing == "nn" else 0
        if not epochs or total_steps > epochs * steps_per_epoch:
            return []
        key = " (method.adasim_window)" if self.pairing == "adasim" else ""
        return [f"method {self.name} draws a neighbour as an image's partner only after {epochs} completed epochs"
                f"{key}, {epochs * steps_per_epoch} steps, and the run has {total_steps}: every step trains on "
                "standard pairs, as its base method would; lengthen the run"
                + (" or lower method.adasim_window" if key else "")]

    def _require_prepared(self) -> None:
        if self.cache is None or self.window is None:
            raise RuntimeError(f"method {self.name}: call prepare(sources, run_dir) before training (the engine does)")

    # -- which images a step reads (the index hook) ------------------------------------------------
    def index_hook(self, stream: str):
        return self.partner_indices if stream == "train" else None

    def partner_indices(self, step: int, indices: list[int]) -> list[int]:
        """The step's images followed by their partners: ``indices + [j*(i) for i in indices]``."""
        return list(indices) + self.choose_partners(step, torch.tensor(indices, dtype=torch.long)).tolist()

    @torch.no_grad()
    def choose_partners(self, step: int, images: torch.Tensor) -> torch.Tensor:
        """The partner ``(B,)`` of each of this rank's images ``(B,)`` at ``step`` (the image itself for a
        standard pair). Reads only the records of completed epochs."""
        self._require_prepared()
        generator = torch.Generator().manual_seed(partner_seed(self.config["train"]["seed"], step, dist.get_rank()))
        uniforms = torch.rand(images.shape[0], 2, generator=generator, dtype=torch.float64)
        epochs = self.window.completed_epochs
        if self.pairing == "adasim":
            if epochs < self.window_size or self.tau == 0:
                return images.clone()
            neighbours, similarities = self.window.history(images)
            support, mean = windowed_similarity(neighbours, similarities, self.window_size)
            return adaptive_partners(support, mean, images, self.tau, uniforms[:, 0])
        if self.pairing == "nn":
            return images.clone() if epochs < 1 else nearest_other(self.window.latest(images), images)
        return self._same_class_partners(step, images, uniforms)

    def _same_class_partners(self, step: int, images: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        if self.oracle_probability is None:
            raise RuntimeError(f"method {self.name}: schedules() sets the oracle probability (the engine calls it)")
        labels = self.labels[images]
        size = self.class_size[labels.clamp(min=0)]
        usable = (labels >= 0) & (size >= 2)
        # A uniform position among the class's other images: skip over the image's own position.
        position = (uniforms[:, 1] * (size - 1).clamp(min=0).double()).long()
        position = position + (position >= self.position_in_class[images]).long()
        candidate = self.members[(self.class_start[labels.clamp(min=0)] + position).clamp(max=len(self.members) - 1)]
        coin = uniforms[:, 0] < float(self.oracle_probability[step])
        return torch.where(usable & coin, candidate, images)

    # -- the step ----------------------------------------------------------------------------------
    def forward(self, batches: dict[str, dict], step: StepContext) -> dict:
        self._require_prepared()
        batch = batches["train"]
        count = batch["image"].shape[0] // 2
        pair = {"image": batch["image"][:count], "aspect": batch["aspect"][:count],
                "partner_image": batch["image"][count:], "partner_aspect": batch["aspect"][count:]}
        loss, metrics, latents = self.loss_and_latents(pair, step)
        self._record(batch["index"][:count], batch["index"][count:], latents)
        return {"loss": loss, "metrics": metrics}

    @torch.no_grad()
    def _record(self, images: torch.Tensor, partners: torch.Tensor, latents: torch.Tensor) -> None:
        """Top-K of this step's latents against the cache as it was before the step, then the step's cache
        rows and records, gathered across ranks; both are written only after a finite step."""
        with torch.autocast(latents.device.type, enabled=False):
            z = F.normalize(latents.float(), dim=-1)
            similarities, neighbours = self.cache.neighbours(z, self.topk)
        device = z.device
        ints = torch.cat([images.to(device).unsqueeze(1), (partners.to(device) != images.to(device)).long().unsqueeze(1),
                          neighbours], dim=1)
        floats = torch.cat([z, similarities], dim=1)
        ints, floats = dist.all_gather_no_grad(ints), dist.all_gather_no_grad(floats)
        width = z.shape[1]
        self.cache.observe(ints[:, 0], floats[:, :width])
        self.window.observe(ints[:, 0], ints[:, 2:], floats[:, width:], ints[:, 1].bool())

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """The epoch's diagnostics (see :meth:`SimilarityWindow.epoch_diagnostics` and
        :func:`~wildssl.methods.similarity_window.spread_of`), then the epoch's record enters the window."""
        self._require_prepared()
        figures = self.window.epoch_diagnostics(self.labels)
        figures.update(spread_of(self.cache.latents, self.cache.filled, self.chunk))
        self.window.push_epoch()
        return figures


def _paired(base: type, pairing: str, name: str) -> type:
    defaults = {**base.defaults, **PAIR_DEFAULTS,
                **(ADASIM_DEFAULTS if pairing == "adasim" else {}), **(ORACLE_DEFAULTS if pairing == "oracle" else {})}
    title = {"adasim": "AdaSim", "nn": "NN", "oracle": "Oracle"}[pairing]
    return type(f"{title}{base.__name__}", (NeighbourPairs, base), {
        "name": name, "pairing": pairing, "defaults": defaults, "__module__": __name__,
        "__doc__": f"{base.__name__} whose second view comes from a partner chosen by the {pairing!r} rule."})


AdaSimDINO = _paired(DINO, "adasim", "adasim_dino")
NNDINO = _paired(DINO, "nn", "nn_dino")
OracleDINO = _paired(DINO, "oracle", "oracle_dino")
AdaSimSimSiam = _paired(SimSiam, "adasim", "adasim_simsiam")
NNSimSiam = _paired(SimSiam, "nn", "nn_simsiam")
OracleSimSiam = _paired(SimSiam, "oracle", "oracle_simsiam")

