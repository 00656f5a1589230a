"""Few-shot classification: N-way K-shot episodes with a prototypical (nearest-centroid) classifier.

Prototypical networks (Snell et al., NeurIPS 2017) on frozen features, no training: in each episode,
``N`` classes are drawn, ``K`` support and ``Q`` query images per class; a class's prototype is the mean
of its l2-normalized support features, and each query goes to the prototype at the smallest squared
Euclidean distance. Reported: the mean accuracy over episodes and its 95% interval,
``1.96 * std / sqrt(episodes)`` (std over episodes, unbiased), as few-shot papers report it.
Default: 5-way 5-shot, 15 queries, 600 episodes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from wildssl.errors import ConfigError, DataError
from wildssl.eval.probe import ProbeContext, require_labels, resolve_options
from wildssl.eval.progress import progress_bar

OPTIONS: dict[str, Any] = {
    "data": None,  # data SPEC of the labelled images the episodes are drawn from
    "pool": "cls",  # "cls" or "avg"
    "n_way": 5,
    "k_shot": 5,
    "n_query": 15,
    "episodes": 600,
}

EPISODE_CHUNK = 100  # episodes scored together


def sample_episodes(labels: torch.Tensor, n_way: int, k_shot: int, n_query: int, episodes: int, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Episodes as indices into ``labels`` ``(N,)``: support ``(E, n_way, k_shot)`` and query
    ``(E, n_way, n_query)``; row ``c`` of an episode holds images of its ``c``-th drawn class. Classes
    are drawn among those with at least ``k_shot + n_query`` images; support and query never share one."""
    if min(n_way, k_shot, n_query, episodes) < 1 or n_way < 2:
        raise ConfigError(f"few-shot needs n_way >= 2 and k_shot, n_query, episodes >= 1; got {n_way}, "
                          f"{k_shot}, {n_query}, {episodes}")
    generator = torch.Generator().manual_seed(seed)
    members = {int(c): (labels == c).nonzero()[:, 0] for c in labels.unique().tolist() if c >= 0}
    eligible = [c for c, rows in members.items() if len(rows) >= k_shot + n_query]
    if len(eligible) < n_way:
        raise DataError(f"few-shot {n_way}-way {k_shot}-shot with {n_query} queries needs {n_way} classes with "
                        f"at least {k_shot + n_query} images each; the data has {len(eligible)} such classes")
    eligible_tensor = torch.tensor(eligible)
    support = torch.empty(episodes, n_way, k_shot, dtype=torch.long)
    query = torch.empty(episodes, n_way, n_query, dtype=torch.long)
    for episode in range(episodes):
        classes = eligible_tensor[torch.randperm(len(eligible), generator=generator)[:n_way]]
        for row, cls in enumerate(classes.tolist()):
            rows = members[cls]
            chosen = rows[torch.randperm(len(rows), generator=generator)[:k_shot + n_query]]
            support[episode, row], query[episode, row] = chosen[:k_shot], chosen[k_shot:]
    return support, query


def episode_accuracies(features: torch.Tensor, support: torch.Tensor, query: torch.Tensor,
                       progress: bool = False) -> torch.Tensor:
    """Accuracy of the nearest-centroid classifier in every episode: ``(E,)`` float64.

    ``features`` ``(N, D)`` (l2-normalized here); ``support`` ``(E, n, K)``; ``query`` ``(E, n, Q)``.
    A query of row ``c`` is correct when prototype ``c`` is the nearest (ties go to the lower row)."""
    normalized = F.normalize(features.double(), dim=1)
    accuracies = []
    chunks = range(0, support.shape[0], EPISODE_CHUNK)
    for start in progress_bar(chunks, "few-shot episodes", progress):
        s, q = support[start:start + EPISODE_CHUNK], query[start:start + EPISODE_CHUNK]
        prototypes = normalized[s].mean(dim=2)  # (e, n, D)
        queries = normalized[q].flatten(1, 2)  # (e, n * Q, D)
        distances = torch.cdist(queries, prototypes).square()  # (e, n * Q, n)
        truth = torch.arange(s.shape[1]).repeat_interleave(q.shape[2])
        accuracies.append((distances.argmin(dim=2) == truth).double().mean(dim=1))
    return torch.cat(accuracies)


def fewshot_accuracy(features: torch.Tensor, labels: torch.Tensor, *, n_way: int = 5, k_shot: int = 5,
                     n_query: int = 15, episodes: int = 600, seed: int = 0, progress: bool = False) -> dict:
    """Mean episode accuracy ``accuracy`` in [0, 1], its 95% half-interval ``ci95`` and the settings."""
    support, query = sample_episodes(labels, n_way, k_shot, n_query, episodes, seed)
    accuracies = episode_accuracies(features, support, query, progress)
    spread = accuracies.std().item() if episodes > 1 else 0.0
    return {"accuracy": accuracies.mean().item(), "ci95": 1.96 * spread / math.sqrt(episodes), "n_way": n_way,
            "k_shot": k_shot, "n_query": n_query, "episodes": episodes}


def run(context: ProbeContext, options: dict | None = None) -> dict:
    """The suite's ``fewshot`` entry: options of :data:`OPTIONS`."""
    options = resolve_options("fewshot", OPTIONS, options, required=("data",))
    data = context.features(options["data"], options)
    labels = require_labels(data, "fewshot", "data")
    return {**fewshot_accuracy(data.pooled(options["pool"]), labels, n_way=options["n_way"],
                               k_shot=options["k_shot"], n_query=options["n_query"],
                               episodes=options["episodes"], seed=context.seed, progress=context.progress),
            "pool": options["pool"]}
