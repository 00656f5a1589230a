"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO's eval_knn protocol).

Each test image votes with its ``k`` most cosine-similar training images; a neighbour with similarity
``s`` adds ``exp(s / T)`` to its class. The class with the largest summed vote wins.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from wildssl.errors import ConfigError, DataError

log = logging.getLogger("wildssl")
_said_k_is_cut: set[tuple[int, int]] = set()  # (k, memory size) pairs already said: the online k-NN repeats


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        unlabelled = int((labels < 0).sum())
        raise DataError(
            f"k-NN {what} labels span [{int(labels.min())}, {int(labels.max())}] ({unlabelled} unlabelled, -1); "
            f"every image needs a label in [0, {num_classes - 1}]"
        )


# Floats in one chunk's (chunk, num_classes) vote matrix (64 MiB): chunks shrink as classes grow, and
# more classes than this in one row is refused (a label space that large is a labelling error).
MAX_VOTES = 2**24


def _check_arguments(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                     num_classes: int, k: int, temperature: float, chunk_size: int) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"k-NN needs (N_train, D) and (N_test, D) features, got {tuple(train_features.shape)} "
            f"and {tuple(test_features.shape)}"
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"k-NN train labels have shape {tuple(train_labels.shape)}, expected ({train_features.shape[0]},)"
        )
    if train_features.shape[0] == 0:
        raise DataError("k-NN has no training images; the train source of the evaluation is empty")
    if k < 1 or not temperature > 0:  # options a user sets (a suite's knn probe, eval.knn_k): a one-line error
        raise ConfigError(f"the k-NN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if chunk_size < 1:
        raise ValueError(f"k-NN needs chunk_size >= 1, got {chunk_size}")
    if num_classes > MAX_VOTES:
        raise DataError(f"k-NN over {num_classes:,} classes would need {4 * num_classes / 2**30:.1f} GiB per test "
                        f"image; at most {MAX_VOTES:,} classes (number the classes densely, 0 .. C - 1)")
    _check_labels(train_labels, num_classes, "train")
    if k > train_features.shape[0] and (k, train_features.shape[0]) not in _said_k_is_cut:
        _said_k_is_cut.add((k, train_features.shape[0]))
        log.warning("k-NN: k=%d is more than the %d images of its memory, so every one of them votes (k=%d)", k,
                    train_features.shape[0], train_features.shape[0])
    for features, split in ((train_features, "train"), (test_features, "test")):
        require_finite_features(features, f"k-NN's {split} features")


def require_finite_features(features: torch.Tensor, what: str) -> None:
    """A DataError when a row of ``features`` holds a NaN or an infinity. Such a feature has no neighbours and no
    class: the k-NN's votes came out as class 0's, a figure near the chance rate without a word (35% on all-NaN
    features of 5 classes), and a probe trains on NaN."""
    bad = int((~torch.isfinite(features)).flatten(1).any(dim=1).sum())
    if bad:
        raise DataError(f"{what}: {bad} of {features.shape[0]} are not finite (NaN or inf), so nothing can be measured "
                        "on them; the encoder gave them (check its weights, or the precision it ran in)")


def _chunk_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                  num_classes: int, k: int, temperature: float, chunk_size: int):
    """Yields ``(start, votes)``: the summed votes ``(chunk, num_classes)`` of test rows ``start ..``."""
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device).long()
    k = min(k, train.shape[0])
    chunk_size = max(1, min(chunk_size, MAX_VOTES // num_classes))
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        similarity, neighbour = (test @ train.T).topk(k, dim=1)  # (chunk, k)
        votes = torch.zeros(test.shape[0], num_classes, device=device)
        votes.scatter_add_(1, train_labels[neighbour], (similarity / temperature).exp())
        yield start, votes


def knn_class_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Summed neighbour votes per class: ``(N_test, num_classes)`` float32.

    ``train_features``: ``(N_train, D)``; ``train_labels``: ``(N_train,)`` long in ``[0, num_classes)``;
    ``test_features``: ``(N_test, D)``. Features are l2-normalized here (a no-op for the output of
    :func:`wildssl.eval.features.extract_features`), so similarities are cosines. ``k`` larger than the
    training set uses every training image. Test rows are processed at most ``chunk_size`` at a time,
    fewer when ``chunk * num_classes`` would pass :data:`MAX_VOTES`, to bound the ``(chunk, N_train)``
    similarity and ``(chunk, num_classes)`` vote matrices; everything runs on the device of
    ``train_features``. :func:`knn_classify` and :func:`knn_accuracy` never hold the whole output.
    """
    _check_arguments(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    scores = [votes for _, votes in _chunk_scores(train_features, train_labels, test_features, num_classes, k,
                                                  temperature, chunk_size)]
    if not scores:
        return torch.zeros(0, num_classes, device=train_features.device)
    return torch.cat(scores)


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted class of every test image, ``(N_test,)`` long; arguments as :func:`knn_class_scores`.

    A tie between classes goes to the lowest class index.
    """
    _check_arguments(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    predictions = [votes.argmax(dim=1) for _, votes in _chunk_scores(
        train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)]
    if not predictions:
        return torch.zeros(0, dtype=torch.long, device=train_features.device)
    return torch.cat(predictions)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """k-NN accuracy as fractions in [0, 1]: ``{"top1": ...}``, plus ``"top5"`` when ``num_classes >= 5``.

    ``test_labels``: ``(N_test,)`` long in ``[0, num_classes)``; other arguments as
    :func:`knn_class_scores`. Top-5 counts a test image as correct when its label is among the five
    classes with the largest votes.
    """
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(
            f"k-NN test labels have shape {tuple(test_labels.shape)}, expected ({test_features.shape[0]},)"
        )
    if test_features.shape[0] == 0:
        raise DataError("k-NN has no test images; the test source of the evaluation is empty")
    _check_arguments(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    _check_labels(test_labels, num_classes, "test")
    test_labels = test_labels.to(train_features.device).long()
    top1 = top5 = 0
    for start, votes in _chunk_scores(train_features, train_labels, test_features, num_classes, k, temperature,
                                      chunk_size):
        labels = test_labels[start : start + len(votes)]
        top1 += int((votes.argmax(dim=1) == labels).sum())
        if num_classes >= 5:
            top5 += int((votes.topk(5, dim=1).indices == labels[:, None]).any(dim=1).sum())
    accuracy = {"top1": top1 / len(test_labels)}
    if num_classes >= 5:
        accuracy["top5"] = top5 / len(test_labels)
    return accuracy


def folded_knn_accuracy(features: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int = 5, k: int = 20,
                        temperature: float = 0.07, seed: int = 0) -> dict[str, float]:
    """Cross-validated k-NN accuracy of one labelled set, as fractions of all its images (the keys of
    :func:`knn_accuracy`).

    The images are cut into ``folds`` folds (a random partition fixed by ``seed``), and each fold is classified
    with the other folds as the memory: every image is a test image once. At the cost of one k-NN over the whole
    set, the figure rests on every image, not on the fifth a single split holds out."""
    if not 2 <= folds <= len(labels):
        raise ValueError(f"folded k-NN needs 2 <= folds <= {len(labels)} images, got {folds} folds")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    correct: dict[str, int] = {}
    for fold in order.chunk(folds):
        memory = torch.ones(len(labels), dtype=torch.bool)
        memory[fold] = False
        accuracy = knn_accuracy(features[memory], labels[memory], features[fold], labels[fold], num_classes, k=k,
                                temperature=temperature)
        for name, value in accuracy.items():
            correct[name] = correct.get(name, 0) + round(value * len(fold))
    return {name: count / len(labels) for name, count in correct.items()}
