"""Evaluation protocols that tie sources, encoders and the k-NN classifier together (offline and online)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from wildssl.data.sources import collate, open_source
from wildssl.errors import DataError
from wildssl.eval.features import extract_features
from wildssl.eval.knn import knn_accuracy


def _loader(source, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate)


def _num_classes(train_source, labels: torch.Tensor, spec: str) -> int:
    if (labels < 0).any():
        raise DataError(f"k-NN needs a class label for every image, but {spec} has unlabeled images "
                        "(use an image folder with class subfolders, a manifest with 'label', or synthetic:scenes)")
    classes = getattr(train_source, "classes", None)
    return len(classes) if classes else int(labels.max()) + 1


def evaluate_knn(encoder: nn.Module, train_spec: str, test_spec: str, *, image_size: int,
                 load_size: int | None = None, k: int = 20, temperature: float = 0.07, pool: str = "cls",
                 batch_size: int = 256, num_workers: int = 0, device: torch.device | str = "cpu",
                 progress: bool = False) -> dict[str, float]:
    """Weighted k-NN (DINO protocol, k=20, T=0.07) of frozen ``encoder`` features; accuracies in [0, 1].

    Train and test sources are given as data specs; their class labels are the targets."""
    load_size = load_size or image_size
    train_source = open_source(train_spec, load_size=load_size)
    test_source = open_source(test_spec, load_size=load_size)
    train_features, train_labels = extract_features(
        encoder, _loader(train_source, batch_size, num_workers), device, image_size, pool, progress=progress)
    test_features, test_labels = extract_features(
        encoder, _loader(test_source, batch_size, num_workers), device, image_size, pool, progress=progress)
    num_classes = max(_num_classes(train_source, train_labels, train_spec),
                      _num_classes(test_source, test_labels, test_spec))
    accuracy = knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=k,
                            temperature=temperature)
    return {f"knn_{name}": value for name, value in accuracy.items()}


def make_online_knn(config: dict, device: torch.device | str):
    """The engine's periodic k-NN (``eval.knn_every``); None when no evaluation sources are configured."""
    ecfg = config["eval"]
    if not (ecfg["knn_every"] and ecfg["knn_train"] and ecfg["knn_test"]):
        return None
    image_size = ecfg["image_size"] or config["model"]["img_size"]
    teacher = None if ecfg["encoder"] == "auto" else ecfg["encoder"] == "teacher"

    def evaluate(method) -> dict[str, float]:
        return evaluate_knn(method.encoder(teacher), ecfg["knn_train"], ecfg["knn_test"],
                            image_size=image_size, load_size=config["data"]["load_size"], k=ecfg["knn_k"],
                            temperature=ecfg["knn_temperature"], pool=ecfg["pool"],
                            batch_size=ecfg["batch_size"], device=device)

    return evaluate
