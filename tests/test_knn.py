from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wildssl.errors import ConfigError, DataError
from wildssl.data import collate
from wildssl.data.views import IMAGENET_MEAN, IMAGENET_STD
from wildssl.eval.features import extract_features
from wildssl.eval.knn import knn_accuracy, knn_class_scores, knn_classify


def reference_knn_scores(train, train_labels, test, num_classes, k, temperature):
    """Per test sample: cosine similarities, sorted, k best vote exp(sim / T) for their class (float64)."""
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    test = test.double() / test.double().norm(dim=1, keepdim=True)
    scores = []
    for query in test:
        similarities = sorted(((float(query @ t), int(c)) for t, c in zip(train, train_labels)), reverse=True)
        votes = [0.0] * num_classes
        for similarity, label in similarities[:k]:
            votes[label] += math.exp(similarity / temperature)
        scores.append(votes)
    return torch.tensor(scores, dtype=torch.float64)


def random_problem(seed, n_train=30, n_test=11, dim=6, num_classes=6):
    generator = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=generator)
    labels = torch.randint(0, num_classes, (n_train,), generator=generator)
    test = torch.randn(n_test, dim, generator=generator)
    test_labels = torch.randint(0, num_classes, (n_test,), generator=generator)
    return train, labels, test, test_labels


@pytest.mark.parametrize("k, chunk_size", [(1, 4), (5, 3), (7, 100)])
def test_votes_and_predictions_equal_brute_force_reference(k, chunk_size):
    train, labels, test, _ = random_problem(seed=k)
    expected = reference_knn_scores(train, labels, test, 6, k, 0.1)
    scores = knn_class_scores(train, labels, test, 6, k=k, temperature=0.1, chunk_size=chunk_size)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)
    predictions = knn_classify(train, labels, test, 6, k=k, temperature=0.1, chunk_size=chunk_size)
    assert predictions.dtype == torch.long
    assert torch.equal(predictions, expected.argmax(dim=1))


def test_k_larger_than_train_set_uses_every_train_sample():
    train, labels, test, _ = random_problem(seed=10, n_train=5)
    scores = knn_class_scores(train, labels, test, 6, k=50, temperature=0.07)
    expected = reference_knn_scores(train, labels, test, 6, 5, 0.07)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)


def test_accuracy_top1_and_top5_equal_reference():
    train, labels, test, test_labels = random_problem(seed=11, n_test=40)
    expected = reference_knn_scores(train, labels, test, 6, 4, 0.5)
    top5 = expected.topk(5, dim=1).indices
    accuracy = knn_accuracy(train, labels, test, test_labels, 6, k=4, temperature=0.5, chunk_size=7)
    assert accuracy["top1"] == pytest.approx((expected.argmax(1) == test_labels).double().mean().item())
    assert accuracy["top5"] == pytest.approx((top5 == test_labels[:, None]).any(1).double().mean().item())
    assert accuracy["top1"] <= accuracy["top5"]


def test_separable_clusters_are_classified_perfectly():
    generator = torch.Generator().manual_seed(12)
    centres = torch.eye(3, 8) * 5
    train_labels = torch.arange(3).repeat_interleave(10)
    test_labels = torch.arange(3).repeat(4)
    train = centres[train_labels] + 0.3 * torch.randn(30, 8, generator=generator)
    test = centres[test_labels] + 0.3 * torch.randn(12, 8, generator=generator)
    accuracy = knn_accuracy(train, train_labels, test, test_labels, num_classes=3, k=20)
    assert accuracy == {"top1": 1.0}  # no top-5 with fewer than 5 classes


def test_unlabelled_train_images_are_rejected():
    train, labels, test, _ = random_problem(seed=13)
    labels[0] = -1
    with pytest.raises(DataError, match="unlabelled"):
        knn_classify(train, labels, test, 6)


class RecordingEncoder(nn.Module):
    """Returns per-channel means of its input as the class token and constant patches, and records inputs."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.modes: list[bool] = []

    def forward(self, x):
        self.inputs.append(x)
        self.modes.append(self.training)
        cls = x.mean(dim=(2, 3))
        patch = torch.stack([cls, cls.flip(-1) + 1], dim=1)  # (B, 2, 3), average pool not parallel to cls
        return {"cls": cls, "patch": patch}


def constant_image_batches():
    colours = torch.tensor([[10, 200, 90], [255, 0, 128], [40, 40, 40]], dtype=torch.uint8)
    images = colours[:, :, None, None].expand(3, 3, 12, 12).contiguous()
    return colours, [
        {"image": images[:2], "label": torch.tensor([4, 1])},
        {"image": images[2:], "label": torch.tensor([0])},
    ]


def test_features_are_normalized_imagenet_inputs_at_eval_size():
    colours, batches = constant_image_batches()
    encoder = RecordingEncoder().train()
    features, labels = extract_features(encoder, batches, "cpu", image_size=8, pool="cls")
    # A constant image stays constant under resizing, so the encoder sees (v / 255 - mean) / std per channel.
    normalized = (colours.double() / 255 - torch.tensor(IMAGENET_MEAN, dtype=torch.float64)) / torch.tensor(
        IMAGENET_STD, dtype=torch.float64
    )
    torch.testing.assert_close(torch.cat(encoder.inputs).mean(dim=(2, 3)).double(), normalized, rtol=1e-5, atol=1e-5)
    assert all(x.shape[-2:] == (8, 8) and x.dtype == torch.float32 for x in encoder.inputs)
    expected = normalized / normalized.norm(dim=1, keepdim=True)
    torch.testing.assert_close(features.double(), expected, rtol=1e-5, atol=1e-6)
    assert features.dtype == torch.float32 and labels.dtype == torch.long
    assert labels.tolist() == [4, 1, 0]
    assert encoder.modes == [False, False] and encoder.training


def test_features_resize_with_antialiasing_and_average_pool():
    # Every fourth column white: a plain bilinear 4x downsampling samples between two black columns and
    # returns black; an antialiased one averages to a grey near the pattern's mean of 255 / 4.
    image = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    image[..., ::4] = 255
    encoder = RecordingEncoder().eval()
    batch = {"image": image, "label": torch.tensor([0])}
    features, _ = extract_features(encoder, [batch], "cpu", image_size=4, pool="avg")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (encoder.inputs[0] * std + mean) * 255
    assert pixels.shape == (1, 3, 4, 4)
    assert pixels.min() > 40 and pixels.max() < 90
    cls = encoder.inputs[0].mean(dim=(2, 3))
    average = (cls + cls.flip(-1) + 1) / 2
    torch.testing.assert_close(features, average / average.norm(dim=1, keepdim=True))
    assert not encoder.training


def test_feature_extraction_errors_name_the_problem():
    encoder = RecordingEncoder()
    with pytest.raises(ConfigError, match="pool"):
        extract_features(encoder, [], "cpu", pool="max")
    with pytest.raises(DataError, match="no batches"):
        extract_features(encoder, [], "cpu")
    float_batch = [{"image": torch.rand(1, 3, 4, 4), "label": torch.tensor([0])}]
    with pytest.raises(DataError, match="uint8"):
        extract_features(encoder, float_batch, "cpu", image_size=4)
    features, _ = extract_features(encoder, float_batch, "cpu", image_size=4, normalize_images=False)
    torch.testing.assert_close(encoder.inputs[-1], float_batch[0]["image"])
    assert features.shape == (1, 3)


def test_knn_matches_classes_by_name_when_the_test_folder_lacks_one_of_the_memorys(tmp_path):
    """Folders number their classes each on its own: without matching by name, the test folder's 'c'
    (its index 1) would be scored as the memory's 'b'."""
    from PIL import Image

    from wildssl.eval.evaluate import evaluate_knn

    colours = {"a": (250, 20, 20), "b": (20, 250, 20), "c": (20, 20, 250)}
    for split, names in (("memory", "abc"), ("test", "ac")):
        for name in names:
            for k in range(3):
                path = tmp_path / split / name / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), tuple(v - 5 * k for v in colours[name])).save(path)

    class ChannelMeans(nn.Module):
        def forward(self, x):
            return {"cls": x.mean(dim=(2, 3)), "patch": x.flatten(2).transpose(1, 2)}

    result = evaluate_knn(ChannelMeans(), str(tmp_path / "memory"), str(tmp_path / "test"), image_size=8, k=3)
    assert result["knn_top1"] == 1.0


def test_folded_knn_classifies_every_image_once_against_the_other_folds_as_a_brute_force_knn_does():
    from wildssl.eval.knn import folded_knn_accuracy

    generator = torch.Generator().manual_seed(3)
    features = torch.nn.functional.normalize(torch.randn(53, 8, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 6, (53,), generator=generator)
    folds, temperature = 5, 0.07

    def reference(k):
        """Written independently: the seed's order cut into folds, each image voted on by its k most similar
        images of the other folds with weights exp(similarity / T); top-5 = the label among the five largest
        votes (with k = every memory image, no class is left at a zero vote, so the five are unambiguous)."""
        order = torch.randperm(53, generator=torch.Generator().manual_seed(11))
        top1 = top5 = 0
        for fold in order.chunk(folds):
            memory = [i for i in range(53) if i not in set(fold.tolist())]
            for i in fold.tolist():
                sims = sorted(((float(features[i] @ features[j]), j) for j in memory), reverse=True)[:k]
                votes = [0.0] * 6
                for sim, j in sims:
                    votes[int(labels[j])] += math.exp(sim / temperature)
                ranked = sorted(range(6), key=lambda c: -votes[c])
                top1 += ranked[0] == int(labels[i])
                top5 += int(labels[i]) in ranked[:5]
        return top1 / 53, top5 / 53

    top1, _ = reference(6)
    assert folded_knn_accuracy(features.float(), labels, 6, folds, k=6, temperature=temperature,
                               seed=11)["top1"] == pytest.approx(top1)
    top1, top5 = reference(53)
    assert folded_knn_accuracy(features.float(), labels, 6, folds, k=53, temperature=temperature,
                               seed=11) == pytest.approx({"top1": top1, "top5": top5})
    separable = torch.nn.functional.normalize(torch.eye(6)[labels] + 0.01 * features[:, :6].float(), dim=1)
    assert folded_knn_accuracy(separable, labels, 6, folds, k=6, temperature=temperature)["top1"] == 1.0
    for bad in (1, 54):
        with pytest.raises(ValueError, match="folds"):
            folded_knn_accuracy(features.float(), labels, 6, bad)


def _class_folder(root, classes: int = 3, per_class: int = 10):
    from PIL import Image

    for c in range(classes):
        for k in range(per_class):
            path = root / f"class{c}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            colour = [20 + 7 * k, 20 + 7 * k, 20 + 7 * k]
            colour[c % 3] = 230 - 9 * k
            Image.new("RGB", (8, 8), tuple(colour)).save(path)
    return str(root)


def test_the_online_knn_of_a_labelled_folder_tests_every_image_once_in_five_folds(tmp_path):
    from conftest import tiny_config
    from torch.utils.data import Subset

    from wildssl.eval.evaluate import ONLINE_FOLDS, make_online_knn, online_knn_data
    from wildssl.eval.knn import folded_knn_accuracy
    from wildssl.methods import build_initial_method

    folder = _class_folder(tmp_path / "photos")
    config = tiny_config("simclr", f"data.train={folder}", "eval.knn_every=1", "eval.knn_k=5")
    images, test = online_knn_data(config)
    assert isinstance(images, Subset) and test is None
    assert sorted(images.indices) == list(range(30))  # every labelled image, none left out
    encoder = build_initial_method(config).encoder()
    batch = [collate([images[i] for i in range(30)])]
    features, labels = extract_features(encoder.eval(), batch, "cpu", config["model"]["img_size"], config["eval"]["pool"])
    expected = folded_knn_accuracy(features, labels, 3, ONLINE_FOLDS, k=5)
    assert make_online_knn(config, "cpu")(build_initial_method(config)) == pytest.approx(
        {f"knn_{name}": value for name, value in expected.items()})


def test_the_online_knn_with_val_keeps_a_memory_of_the_training_images_and_tests_val(tmp_path):
    from conftest import tiny_config
    from torch.utils.data import Subset

    from wildssl.eval.evaluate import online_knn_data

    folder, val = _class_folder(tmp_path / "photos"), _class_folder(tmp_path / "val", per_class=7)
    memory, test = online_knn_data(tiny_config("simclr", f"data.train={folder}", f"eval.knn_test={val}"))
    assert isinstance(memory, Subset) and sorted(memory.indices) == list(range(30)) and test == val  # every one
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for k in range(5):
        (unlabelled / f"{k}.png").write_bytes((tmp_path / "photos" / "class0" / f"{k}.png").read_bytes())
    images, test = online_knn_data(tiny_config("simclr", f"data.train={unlabelled}", f"eval.knn_test={val}"))
    assert test is None and isinstance(images, Subset) and sorted(images.indices) == list(range(21))


def test_the_online_knn_names_the_val_classes_its_memory_lacks_and_scores_them_as_errors(tmp_path, caplog):
    """A --val folder with a class the training images do not have (a misspelt class folder, say): the log names
    it once when the k-NN is set up, and the k-NN scores its images as errors against the memory's classes."""
    import logging
    import shutil

    from conftest import tiny_config

    from wildssl.eval.evaluate import evaluate_knn, make_online_knn
    from wildssl.methods import build_initial_method

    folder, val = _class_folder(tmp_path / "photos"), tmp_path / "val"
    shutil.copytree(tmp_path / "photos" / "class0", val / "class0")
    shutil.copytree(tmp_path / "photos" / "class1", val / "klass1")  # misspelt: not a class of the memory
    config = tiny_config("simclr", f"data.train={folder}", f"eval.knn_test={val}", "eval.knn_every=1", "eval.knn_k=5")
    with caplog.at_level(logging.INFO, logger="wildssl"):
        knn = make_online_knn(config, "cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 of the 2 test classes" in warnings[0] and ": klass1 (" in warnings[0], warnings
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wildssl"):
        assert knn(build_initial_method(config))["knn_top1"] <= 0.5  # the 10 klass1 images can never be right
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # said once, at set-up
    with caplog.at_level(logging.INFO, logger="wildssl"):  # `wildssl eval knn --train ... --test ...` says it too
        evaluate_knn(build_initial_method(config).encoder(), folder, str(val), image_size=16)
    assert [r for r in caplog.records if r.levelno == logging.WARNING and ": klass1 (" in r.getMessage()]
    caplog.clear()
    same_classes = shutil.copytree(folder, tmp_path / "val_ok")
    with caplog.at_level(logging.INFO, logger="wildssl"):
        make_online_knn(tiny_config("simclr", f"data.train={folder}", f"eval.knn_test={same_classes}",
                                    "eval.knn_every=1"), "cpu")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_val_that_is_the_training_data_itself_gives_the_folded_knn_with_a_warning(tmp_path, caplog):
    """--val naming the training folder (here with a trailing slash) would test every image against a memory that
    holds it (each its own nearest neighbour, near 100% for any encoder): the k-NN folds over the images instead."""
    import logging

    from conftest import tiny_config
    from torch.utils.data import Subset

    from wildssl.eval.evaluate import online_knn_data

    folder = _class_folder(tmp_path / "photos")
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        images, test = online_knn_data(tiny_config("simclr", f"data.train={folder}", f"eval.knn_test={folder}/"))
    assert test is None and isinstance(images, Subset) and sorted(images.indices) == list(range(30))
    assert any("--val is the training data itself" in r.getMessage() for r in caplog.records)
    other = _class_folder(tmp_path / "val", per_class=7)
    memory, test = online_knn_data(tiny_config("simclr", f"data.train={folder}", f"eval.knn_test={other}"))
    assert test == other and len(memory) == 30


def test_offline_knn_of_a_set_against_itself_warns_that_the_figure_says_nothing(tmp_path, caplog):
    import logging

    from conftest import tiny_config

    from wildssl.eval.evaluate import evaluate_knn
    from wildssl.methods import build_initial_method

    folder = _class_folder(tmp_path / "photos")
    encoder = build_initial_method(tiny_config("simclr")).encoder()
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        result = evaluate_knn(encoder, folder, folder, image_size=16, k=5)
    assert result["knn_top1"] == 1.0  # every image finds itself
    assert any("the test images are the memory's own" in r.getMessage() for r in caplog.records)


def test_the_online_knn_says_why_it_is_off_no_labels_or_too_few(tmp_path, caplog):
    """A folder without class folders has no labels; a labelled folder of 6 images has too few for a figure (the
    log used to say "no class labels" for both, which sent a user with labelled data looking for a format fault)."""
    import logging

    from conftest import tiny_config

    from wildssl.eval.evaluate import MIN_LABELLED_IMAGES, online_knn_data

    few = _class_folder(tmp_path / "few", classes=2, per_class=3)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for k in range(3):
        (unlabelled / f"{k}.png").write_bytes((tmp_path / "few" / "class0" / f"{k}.png").read_bytes())
    for folder, reason in ((few, f"has only 6 labelled images (the online k-NN needs {MIN_LABELLED_IMAGES})"),
                           (unlabelled, "has no class labels to evaluate on")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="wildssl"):
            assert online_knn_data(tiny_config("simclr", f"data.train={folder}")) is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [f"online k-NN is off: {folder} {reason}; give labelled images with --val SPEC "
                            "(eval.knn_test), or set eval.knn_train and eval.knn_test"]


def test_an_unlabelled_val_set_is_refused_when_the_online_knn_is_set_up(tmp_path):
    """It used to fail at the first evaluation, once the run had started (and mid-line of the progress bar)."""
    from conftest import tiny_config

    from wildssl.errors import DataError
    from wildssl.eval.evaluate import make_online_knn

    folder = _class_folder(tmp_path / "photos")
    manifest = tmp_path / "val.jsonl"
    manifest.write_text("".join(f'{{"path": "{p}"}}\n' for p in sorted((tmp_path / "photos").rglob("*.png"))[:6]))
    config = tiny_config("simclr", f"data.train={folder}", f"eval.knn_test={manifest}", "eval.knn_every=1")
    with pytest.raises(DataError, match="the online k-NN needs a class label for every test image, but 6 of 6 "):
        make_online_knn(config, "cpu")


def test_non_finite_features_are_refused_not_classified_as_class_zero():
    """A NaN feature has no neighbours: its votes came out as class 0's, and the k-NN gave a figure near the
    chance rate without a word (35% on all-NaN features of 5 classes)."""
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=generator), torch.randn(20, 8, generator=generator)
    train_labels, test_labels = torch.arange(50) % 5, torch.arange(20) % 5
    for bad_train, bad_test, match in ((float("nan"), 0.0, "1 of 50 are not finite"),
                                       (0.0, float("inf"), "1 of 20 are not finite")):
        with pytest.raises(DataError, match=match):
            knn_accuracy(train + torch.nn.functional.pad(torch.tensor([[bad_train]]), (0, 7, 3, 46)),
                         train_labels, test + torch.nn.functional.pad(torch.tensor([[bad_test]]), (0, 7, 0, 19)),
                         test_labels, 5)
    encoder = RecordingEncoder()
    nan_batch = [{"image": torch.full((2, 3, 4, 4), float("nan")), "label": torch.tensor([0, 1])}]
    with pytest.raises(DataError, match="2 of 2 are not finite"):
        extract_features(encoder, nan_batch, "cpu", image_size=4, normalize_images=False)


def test_a_k_larger_than_the_memory_is_said_once_not_cut_silently(caplog):
    """eval.knn_k / --k above the memory's size voted with every image without a word; it is said once per (k,
    memory size), since the online k-NN repeats the same evaluation."""
    torch.manual_seed(0)
    train, test = torch.randn(6, 4), torch.randn(3, 4)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    caplog.set_level("WARNING", logger="wildssl")
    every = knn_accuracy(train, labels, test, torch.tensor([0, 1, 0]), num_classes=2, k=50)
    knn_accuracy(train, labels, test, torch.tensor([0, 1, 0]), num_classes=2, k=50)
    said = [r.message for r in caplog.records if "more than the 6 images" in r.message]
    assert said == ["k-NN: k=50 is more than the 6 images of its memory, so every one of them votes (k=6)"]
    assert every == knn_accuracy(train, labels, test, torch.tensor([0, 1, 0]), num_classes=2, k=6)  # the same vote
    caplog.clear()
    knn_accuracy(train, labels, test, torch.tensor([0, 1, 0]), num_classes=2, k=6)
    assert not caplog.records
