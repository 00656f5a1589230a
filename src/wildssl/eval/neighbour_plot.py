"""``wildssl plot RUN --neighbours K``: what AdaSim pairs, as the seed's Figure 1 shows it.

For K query images of a run's training data: the query, then the candidates of its union support sorted by
their sampling probability p_win(j | i) (Eq. 9-11, from the window records in the run's checkpoint), the
query itself marked. A query whose own entry is not the argmax of m_win is drawn with the standard pair
only (AdaSim's adaptive rule), and says so. For a +NN run the candidate is the nearest other image of the
last completed epoch, with probability 1. Needs matplotlib.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from wildssl.data import open_source
from wildssl.errors import CheckpointError, ConfigError, DataError
from wildssl.methods import get_method_class
from wildssl.methods.similarity_window import nearest_other, sampling_probabilities, windowed_similarity
from wildssl.models.loading import resolve_checkpoint

log = logging.getLogger("wildssl")

# Candidates shown per query (the most probable ones).
SHOWN = 6
# Images among which the queries are chosen.
CANDIDATES = 5000
_WINDOW_KEYS = ("neighbours", "similarities", "epochs_seen")


def _read_window(checkpoint: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The run's config and its window buffers, read without loading the rest of the checkpoint."""
    try:
        with safe_open(str(checkpoint), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = set(handle.keys())
            names = [f"method.window.{k}" for k in _WINDOW_KEYS]
            if not all(name in keys for name in names):
                raise ConfigError(f"{checkpoint} holds no neighbour records: --neighbours needs a run of "
                                  "adasim_* or nn_* (a method that pairs images with their neighbours)")
            window = {k: handle.get_tensor(name) for k, name in zip(_WINDOW_KEYS, names)}
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {checkpoint}: {error}") from None
    return json.loads(metadata["config"]), window


def neighbour_queries(run_dir: str | Path, count: int) -> list[dict]:
    """Up to ``count`` queries of a run: ``{"index", "support" (list of dataset indices, most probable
    first), "probabilities", "self_is_argmax", "active"}``. Queries where AdaSim would bootstrap (the
    image is its own argmax and has other candidates) come first, in a fixed pseudo-random order."""
    if count < 1:
        raise ConfigError(f"--neighbours {count}: give at least 1 query image")
    config, window = _read_window(resolve_checkpoint(run_dir))
    method = get_method_class(config["method"]["name"])
    pairing = getattr(method, "pairing", None)
    if pairing not in ("adasim", "nn"):
        raise ConfigError(f"--neighbours shows similarity-based partners; method {method.name} draws its "
                          "partners by class (oracle), not by similarity")
    seen = int(window["epochs_seen"])
    if seen == 0:
        raise DataError(f"run {run_dir} has not completed an epoch yet: no neighbour records to show")
    if count > window["neighbours"].shape[1]:  # one row per image at most
        log.warning("--neighbours %d: the run has %d images, so the plot shows %d rows", count,
                    window["neighbours"].shape[1], window["neighbours"].shape[1])
    # Candidates are looked for among a fixed pseudo-random sample, not all N images (N may be 1.3M).
    images = torch.randperm(window["neighbours"].shape[1], generator=torch.Generator().manual_seed(0))
    images = images[: max(50 * count, CANDIDATES)]
    size = len(images)
    if pairing == "adasim":
        o = config["method"]
        history = window["neighbours"][:, images].transpose(0, 1).long()
        support, mean = windowed_similarity(history, window["similarities"][:, images].transpose(0, 1),
                                            o["adasim_window"])
        probabilities = sampling_probabilities(support, mean, o["adasim_tau"])
        best = mean.masked_fill(support < 0, float("-inf")).argmax(dim=1)
        self_is_argmax = support.gather(1, best.unsqueeze(1)).squeeze(1) == images
        active = seen >= o["adasim_window"] and o["adasim_tau"] > 0
    else:
        latest = window["neighbours"][(seen - 1) % window["neighbours"].shape[0], images].long()
        partner = nearest_other(latest, images)
        support = partner.unsqueeze(1)
        probabilities = torch.ones(size, 1)
        self_is_argmax = torch.zeros(size, dtype=torch.bool)
        active = True
    others = ((support >= 0) & (support != images.unsqueeze(1))).any(dim=1)
    order = torch.argsort((~(self_is_argmax & others)).long() if pairing == "adasim" else (~others).long(),
                          stable=True)[:count]
    queries = []
    for row in order.tolist():
        valid = support[row] >= 0
        ids, probs = support[row][valid], probabilities[row][valid]
        ranked = torch.argsort(probs, descending=True, stable=True)
        queries.append({"index": int(images[row]), "support": ids[ranked].tolist(),
                        "probabilities": probs[ranked].tolist(), "self_is_argmax": bool(self_is_argmax[row]),
                        "active": bool(active), "pairing": pairing})
    return queries


def plot_neighbours(run_dir: str | Path, count: int, out: str | Path | None = None) -> Path:
    """Write ``<run>/neighbours.png`` (or ``out``): one row per query (see :func:`neighbour_queries`)."""
    run_dir = Path(run_dir)
    queries = neighbour_queries(run_dir, count)
    config, _ = _read_window(resolve_checkpoint(run_dir))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("wildssl plot needs matplotlib: pip install matplotlib (or wildssl[plot])") from None
    source = open_source(config["data"]["train"], load_size=config["data"]["load_size"])
    columns = 1 + SHOWN
    figure, axes = plt.subplots(len(queries), columns, figsize=(1.6 * columns, 1.9 * len(queries)), squeeze=False)
    for axis_row, query in zip(axes, queries):
        for axis in axis_row:
            axis.axis("off")
        axis_row[0].imshow(source[query["index"]]["image"].permute(1, 2, 0).numpy())
        if query["pairing"] == "nn":
            rule = "+NN partner"
        elif not query["active"]:
            rule = "inactive (w epochs not seen)"
        else:
            rule = "bootstraps" if query["self_is_argmax"] else "standard pair"
        axis_row[0].set_title(f"query {query['index']}\n{rule}", fontsize=7)
        for axis, index, probability in zip(axis_row[1:], query["support"], query["probabilities"]):
            axis.imshow(source[index]["image"].permute(1, 2, 0).numpy())
            label = "itself" if index == query["index"] else str(index)
            axis.set_title(f"{label}\np={probability:.2f}", fontsize=7)
    figure.suptitle(f"{run_dir}: sampled partners ({config['method']['name']})", fontsize=9)
    figure.tight_layout()
    out = Path(out) if out else run_dir / "neighbours.png"
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
