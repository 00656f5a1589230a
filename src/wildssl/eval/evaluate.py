"""Evaluation protocols that tie sources, encoders and the k-NN classifier together (offline and online)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from wildssl.data import collate, open_source
from wildssl.data.decode import DEFAULT_MAX_PIXELS
from wildssl.data.sample import EachImageOnce, Source
from wildssl.errors import DataError
from wildssl.eval.features import base_source, class_space, extract_features
from wildssl.eval.knn import folded_knn_accuracy, knn_accuracy

log = logging.getLogger("wildssl")

# The online k-NN's images of a labelled training source, drawn by a fixed permutation: with ``--val``, at most
# ONLINE_MEMORY_IMAGES of them as the memory; without it, at most ONLINE_TEST_IMAGES + ONLINE_MEMORY_IMAGES, each
# ONLINE_FOLDS-th classified with the others as the memory.
ONLINE_TEST_IMAGES = 1000
ONLINE_MEMORY_IMAGES = 5000
ONLINE_FOLDS = 5


def _loader(source, batch_size: int, num_workers: int):
    """The source's batches in order, each image once (an unreadable one is left out, not read as its neighbour)."""
    return EachImageOnce(DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                    collate_fn=collate))


def _check_labelled(source, labels: torch.Tensor, name) -> None:
    if (labels < 0).any():
        where = name if isinstance(name, str) else base_source(source).describe()
        raise DataError(f"k-NN needs a class label for every image, but {where} has unlabeled "
                        "images (use an image folder with class subfolders, a manifest with 'label', or "
                        "synthetic:scenes)")


def dense_labels(train_labels: torch.Tensor, test_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Relabel ``(N_train,)`` and ``(N_test,)`` class labels jointly as ``0 .. C - 1`` in sorted order,
    where C is the number of distinct labels; returns both and C.

    A manifest label of 100000000 then costs one class, not 10^8 vote columns. Order is kept, so
    predictions (and their tie-breaking towards the lower class) are those of the original labels."""
    present, dense = torch.unique(torch.cat([train_labels, test_labels]), sorted=True, return_inverse=True)
    return dense[: len(train_labels)], dense[len(train_labels):], len(present)


def _class_names(source) -> list[str] | None:
    base = base_source(source)
    return list(base.classes) if getattr(base, "classes", None) else None


def align_test_labels(test_labels: torch.Tensor, test_classes: list[str],
                      memory_classes: list[str]) -> tuple[torch.Tensor, int]:
    """Test labels ``(N,)`` re-indexed into the memory's classes by name, and the number of classes.

    Two sources number their classes each on its own (sorted names), so a test folder that lacks one of
    the memory's classes would otherwise shift every later index and score against the wrong classes.
    A test class the memory does not have gets an index after the memory's: it can never be predicted,
    so its images count as errors."""
    names, position = class_space(memory_classes, test_classes)
    return position[test_labels], len(names)


def warn_unseen_test_classes(memory, test) -> list[str]:
    """Log which named classes of the k-NN's ``test`` source its ``memory`` lacks (a misspelt class folder in
    ``--val`` or ``--test``, say): the k-NN can never predict them, so their images count as errors. Returns
    those names."""
    memory_classes, test_classes = _class_names(memory), _class_names(test)
    unseen = [name for name in test_classes or [] if memory_classes and name not in memory_classes]
    if unseen:
        log.warning("k-NN: %d of the %d test classes are not among the memory's classes, so their images "
                    "count as errors: %s (test = %s; memory = %s)", len(unseen), len(test_classes),
                    ", ".join(unseen), base_source(test).describe(), base_source(memory).describe())
    return unseen


def same_data(spec: str, other: str) -> bool:
    """Whether two data SPECs name the same data: equal strings, or paths that resolve to the same file or folder."""
    if spec == other:
        return True
    paths = [Path(os.path.expanduser(s)) for s in (spec, other)]
    return all(p.exists() for p in paths) and paths[0].resolve() == paths[1].resolve()


def evaluate_knn(encoder: nn.Module, train, test, *, image_size: int, load_size: int | None = None, k: int = 20,
                 temperature: float = 0.07, pool: str = "cls", batch_size: int = 256, num_workers: int = 0,
                 device: torch.device | str = "cpu", progress: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, warn_unseen: bool = True) -> dict[str, float]:
    """Weighted k-NN (DINO protocol, k=20, T=0.07) of frozen ``encoder`` features; accuracies in [0, 1].

    ``train`` (the memory) and ``test`` are data specs or sources; their class labels are the targets,
    compared as they are (labels that differ are different classes: the classes are those present,
    see :func:`dense_labels`). ``max_pixels`` is the pixel cap of sources opened from specs. With
    ``warn_unseen``, named test classes that the memory lacks are logged (:func:`warn_unseen_test_classes`)."""
    load_size = load_size or image_size
    train, test = (os.fspath(spec) if isinstance(spec, os.PathLike) else spec for spec in (train, test))  # a Path
    if isinstance(train, str) and isinstance(test, str) and same_data(train, test):
        log.warning("k-NN: the test images are the memory's own (%s): each is its own nearest neighbour and casts "
                    "the largest vote, so the figure reads high for any encoder and says nothing about new images; "
                    "give held-out test images", test)
    train_source = open_source(train, load_size, max_pixels) if isinstance(train, str) else train
    test_source = open_source(test, load_size, max_pixels) if isinstance(test, str) else test
    if warn_unseen:
        warn_unseen_test_classes(train_source, test_source)
    train_features, train_labels = extract_features(
        encoder, _loader(train_source, batch_size, num_workers), device, image_size, pool, progress=progress)
    test_features, test_labels = extract_features(
        encoder, _loader(test_source, batch_size, num_workers), device, image_size, pool, progress=progress)
    _check_labelled(train_source, train_labels, train)
    _check_labelled(test_source, test_labels, test)
    memory_classes, test_classes = _class_names(train_source), _class_names(test_source)
    if memory_classes and test_classes and memory_classes != test_classes:
        test_labels, _ = align_test_labels(test_labels, test_classes, memory_classes)
    train_labels, test_labels, num_classes = dense_labels(train_labels, test_labels)
    accuracy = knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=k,
                            temperature=temperature)
    return {f"knn_{name}": value for name, value in accuracy.items()}


MIN_LABELLED_IMAGES = 20  # fewer labelled images give the online k-NN no figure worth printing


def _labelled_order(source: Source, seed: int) -> torch.Tensor | None:
    """The labelled items of ``source`` in a permutation fixed by ``seed``, or None when the source has fewer
    than MIN_LABELLED_IMAGES labelled images or cannot list its labels without decoding."""
    labels = source.class_labels()
    if labels is None:
        return None
    labelled = torch.tensor([i for i, label in enumerate(labels) if label >= 0], dtype=torch.long)
    if len(labelled) < MIN_LABELLED_IMAGES:
        return None
    return labelled[torch.randperm(len(labelled), generator=torch.Generator().manual_seed(seed))]


def labelled_memory(source: Source, seed: int = 0) -> Subset | None:
    """The k-NN memory that the labelled images of ``source`` give a ``--val`` test: all of them, at most
    ONLINE_MEMORY_IMAGES in the order's first places; None as :func:`_labelled_order`."""
    order = _labelled_order(source, seed)
    return None if order is None else Subset(source, order[:ONLINE_MEMORY_IMAGES].tolist())


def labelled_subset(source: Source, seed: int = 0) -> Subset | None:
    """The labelled images of ``source`` that a folded online k-NN classifies, or None (see
    :func:`_labelled_order`)."""
    order = _labelled_order(source, seed)
    return None if order is None else Subset(source, order[: ONLINE_TEST_IMAGES + ONLINE_MEMORY_IMAGES].tolist())


def online_knn_data(config: dict):
    """The ``(memory, test)`` of the online k-NN, ``(images, None)`` for a folded k-NN over one labelled set
    (:func:`evaluate_folded_knn`), or None (with a log line saying why) when there is none.

    ``eval.knn_train`` and ``eval.knn_test`` name memory and test. Left null, they come from the run's own data, so
    that the number a user watches measures their data, not the recipe's: with only ``eval.knn_test`` set
    (``--val``), the first stream's labelled images are the memory and ``--val`` the test; without it, the first
    stream's labelled images are classified in ``ONLINE_FOLDS`` folds, each with the others as the memory (or
    ``--val``'s, when the training data has no labels; and when ``--val`` is the training data itself, which a memory
    of it would find every image in). A fold holds as many images as a held-out fifth would, but every image is
    tested once, at the cost of one pass: on 1,700 images the standard error of the k-NN is 2.2 times smaller than
    on the 340 a held-out fifth holds.
    """
    from wildssl.methods import get_method_class

    ecfg, dcfg = config["eval"], config["data"]
    load_size, max_pixels = dcfg["load_size"], dcfg["max_pixels"]
    if ecfg["knn_train"] and ecfg["knn_test"]:
        return ecfg["knn_train"], ecfg["knn_test"]
    first_stream = get_method_class(config["method"]["name"]).streams[0]
    train_source = open_source(dcfg[first_stream], load_size, max_pixels) if dcfg[first_stream] else None
    seed = config["train"]["seed"]
    if ecfg["knn_test"] and dcfg[first_stream] and same_data(dcfg[first_stream], ecfg["knn_test"]):
        log.warning("online k-NN: --val is the training data itself (%s); a memory of it would hold every test image, "
                    "so the k-NN folds over it instead", ecfg["knn_test"])
        images = labelled_subset(train_source, seed)
    elif ecfg["knn_test"]:
        memory = labelled_memory(train_source, seed) if train_source is not None else None
        if memory is not None:
            return memory, ecfg["knn_test"]
        images = labelled_subset(open_source(ecfg["knn_test"], load_size, max_pixels), seed)
    else:
        images = labelled_subset(train_source, seed) if train_source is not None else None
    if images is not None:
        return images, None
    log.warning("online k-NN is off: %s %s; give labelled images with --val SPEC (eval.knn_test), or set "
                "eval.knn_train and eval.knn_test", dcfg[first_stream],
                _why_unlabelled(train_source) if train_source is not None else "is not set")
    return None


def _why_unlabelled(source: Source) -> str:
    """Why ``source`` gives the online k-NN no labelled images (the end of a sentence naming it)."""
    labels = source.class_labels()
    if labels is None:
        return "cannot list its class labels without reading every shard"
    labelled = sum(1 for label in labels if label >= 0)
    if labelled == 0:
        return "has no class labels to evaluate on"
    return f"has only {labelled} labelled images (the online k-NN needs {MIN_LABELLED_IMAGES})"


def evaluate_folded_knn(encoder: nn.Module, images, *, image_size: int, folds: int = ONLINE_FOLDS, k: int = 20,
                        temperature: float = 0.07, pool: str = "cls", batch_size: int = 256, num_workers: int = 0,
                        device: torch.device | str = "cpu", seed: int = 0) -> dict[str, float]:
    """Cross-validated weighted k-NN of frozen ``encoder`` features over the labelled source ``images``
    (:func:`~wildssl.eval.knn.folded_knn_accuracy`); the keys of :func:`evaluate_knn`."""
    features, labels = extract_features(encoder, _loader(images, batch_size, num_workers), device, image_size, pool)
    _check_labelled(images, labels, images)
    dense, _, num_classes = dense_labels(labels, labels[:0])  # one set: no test labels beside it
    accuracy = folded_knn_accuracy(features, dense, num_classes, folds=folds, k=k, temperature=temperature, seed=seed)
    return {f"knn_{name}": value for name, value in accuracy.items()}


def make_online_knn(config: dict, device: torch.device | str):
    """The engine's periodic k-NN (``eval.knn_every``), on the data :func:`online_knn_data` picks; None when
    it is off. It evaluates the method's own evaluation network unless ``eval.encoder`` says otherwise."""
    ecfg = config["eval"]
    if not ecfg["knn_every"]:
        return None
    data = online_knn_data(config)
    if data is None:
        return None
    memory, test = data
    image_size = ecfg["image_size"] or config["model"]["img_size"]
    teacher = None if ecfg["encoder"] == "auto" else ecfg["encoder"] == "teacher"
    options = dict(image_size=image_size, k=ecfg["knn_k"], temperature=ecfg["knn_temperature"], pool=ecfg["pool"],
                   batch_size=ecfg["batch_size"], device=device)
    if test is None:
        log.info("online k-NN: %d labelled images (of %s) in %d folds, each classified with the other %d as the "
                 "memory", len(memory), base_source(memory).describe(), ONLINE_FOLDS, ONLINE_FOLDS - 1)
    else:  # opened once for every evaluation, and checked against the memory's classes
        memory, test = (open_source(spec, config["data"]["load_size"], config["data"]["max_pixels"])
                        if isinstance(spec, str) else spec for spec in (memory, test))
        log.info("online k-NN: test = %s; memory = %d labelled images of %s", base_source(test).describe(),
                 len(memory), base_source(memory).describe())
        labels = test.class_labels()
        unlabelled = sum(1 for label in labels if label < 0) if labels is not None else 0
        if unlabelled:  # now, not at the first evaluation, once the run has started
            raise DataError(f"the online k-NN needs a class label for every test image, but {unlabelled} of "
                            f"{len(labels)} images of {base_source(test).describe()} have none (--val / eval.knn_test: "
                            "an image folder with class subfolders, a manifest with 'label', or synthetic:scenes)")
        warn_unseen_test_classes(memory, test)

    def evaluate(method) -> dict[str, float]:
        if test is None:
            return evaluate_folded_knn(method.encoder(teacher), memory, **options)
        return evaluate_knn(method.encoder(teacher), memory, test, warn_unseen=False, **options)  # warned above

    return evaluate


KNN_OPTIONS = {
    "train": None,  # data SPEC of the labelled memory
    "test": None,  # data SPEC of the labelled test images
    "k": 20,
    "temperature": 0.07,
    "pool": "cls",
}


def run_knn(context, options: dict | None = None) -> dict:
    """The suite's ``knn`` entry (:mod:`wildssl.eval.report`): weighted k-NN on the cached features;
    ``top1`` (and ``top5`` with 5+ classes) as fractions."""
    from wildssl.eval.probe import align_classes, class_count, require_labels, resolve_options

    options = resolve_options("knn", KNN_OPTIONS, options, required=("train", "test"))
    train = context.features(options["train"], options)
    test = context.features(options["test"], options)
    train, test = align_classes(train, test, "knn probe")
    train_labels, test_labels = require_labels(train, "knn", "train"), require_labels(test, "knn", "test")
    num_classes = max(class_count(train.classes, train_labels), class_count(test.classes, test_labels))
    accuracy = knn_accuracy(train.pooled(options["pool"]), train_labels, test.pooled(options["pool"]), test_labels,
                            num_classes, k=options["k"], temperature=options["temperature"])
    return {**accuracy, "k": options["k"], "temperature": options["temperature"], "pool": options["pool"],
            "num_train": len(train), "num_test": len(test)}
