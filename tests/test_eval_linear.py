import pytest
import torch

from conftest import make_feature_set
from wildssl.errors import ConfigError, DataError
from wildssl.eval.linear import LinearClassifier, linear_probe, train_linear
from wildssl.eval.probe import align_classes, held_out_split, resolve_options

FAST = dict(lrs=[1e-2], epochs=15, batch_size=64)


def _separable(n: int, classes: int, dim: int, seed: int, noise: float = 0.3):
    """Points around ``classes`` well-separated centres; labels cycle so every class is present."""
    generator = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(n) % classes
    return centres[labels] + noise * torch.randn(n, dim, generator=generator), labels


def test_linear_probe_reaches_100_percent_on_linearly_separable_features():
    x_train, y_train = _separable(600, 10, 16, seed=0)
    x_test, y_test = _separable(300, 10, 16, seed=1)
    result = linear_probe(make_feature_set(x_train, y_train), make_feature_set(x_test, y_test), pools=["cls"], **FAST)
    assert result["top1"] >= 0.99 and result["top5"] == 1.0
    assert sum(map(sum, result["confusion"])) == 300
    assert all(result["confusion"][c][c] >= 29 for c in range(10))


def test_linear_probe_is_at_chance_on_shuffled_labels():
    x_train, y_train = _separable(600, 10, 16, seed=0)
    x_test, y_test = _separable(1000, 10, 16, seed=1)
    shuffled = y_train[torch.randperm(600, generator=torch.Generator().manual_seed(5))]
    result = linear_probe(make_feature_set(x_train, shuffled), make_feature_set(x_test, y_test), pools=["cls"], **FAST)
    # chance is 10%; the binomial std over 1000 test images is ~1%, so 18% is far outside chance
    assert result["top1"] < 0.18


def test_linear_probe_picks_the_informative_pool_on_the_held_out_split():
    informative, labels = _separable(400, 4, 8, seed=0)
    noise = torch.randn(400, 8, generator=torch.Generator().manual_seed(9))
    test_informative, test_labels = _separable(200, 4, 8, seed=1)
    test_noise = torch.randn(200, 8, generator=torch.Generator().manual_seed(10))
    for cls, avg, test_cls, test_avg, expected in ((informative, noise, test_informative, test_noise, "cls"),
                                                   (noise, informative, test_noise, test_informative, "avg")):
        result = linear_probe(make_feature_set(cls, labels, avg=avg),
                              make_feature_set(test_cls, test_labels, avg=test_avg), **FAST)
        assert result["pool"] == expected and result["top1"] >= 0.99
        assert {(row["pool"], row["lr"]) for row in result["grid"]} == {("cls", 1e-2), ("avg", 1e-2)}


def test_batchnorm_without_affine_makes_the_probe_blind_to_feature_scale():
    x, y = _separable(200, 5, 8, seed=0, noise=2.0)
    model_a, curve_a = train_linear(x, y, 5, lr=1e-2, epochs=3, batch_size=50, weight_decay=0.0, seed=0)
    model_b, curve_b = train_linear(1000.0 * x + 7.0, y, 5, lr=1e-2, epochs=3, batch_size=50, weight_decay=0.0, seed=0)
    assert not any(name.startswith("norm.") for name, _ in model_a.named_parameters())  # no affine
    torch.testing.assert_close(torch.tensor(curve_a), torch.tensor(curve_b), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model_a(x), model_b(1000.0 * x + 7.0), rtol=1e-4, atol=1e-4)
    assert isinstance(model_a, LinearClassifier)


def test_held_out_split_is_a_seeded_disjoint_cover():
    fit, val = held_out_split(50, 0.2, seed=3)
    assert len(val) == 10 and len(fit) == 40
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(50))
    again = held_out_split(50, 0.2, seed=3)
    assert torch.equal(fit, again[0]) and not torch.equal(val, held_out_split(50, 0.2, seed=4)[1])


def test_unlabelled_images_and_unknown_options_are_one_line_errors():
    x, y = _separable(20, 2, 4, seed=0)
    y[3] = -1
    with pytest.raises(DataError, match="train split has 1 of 20 unlabelled"):
        linear_probe(make_feature_set(x, y), make_feature_set(x, y.abs()), **FAST)
    with pytest.raises(ConfigError, match="unknown option 'lr' of the linear probe; valid options: .*lrs"):
        resolve_options("linear", {"lrs": [1.0], "train": None}, {"lr": 1.0})
    with pytest.raises(ConfigError, match="needs 'train'"):
        resolve_options("linear", {"train": None}, {}, required=("train",))


def test_test_split_classes_are_renumbered_into_the_train_split_names():
    """Two manifests index their own sorted names: 'dog' is 1 in train (cat, dog), 2 in test (ant, cat, dog)."""
    x, y = _separable(300, 2, 8, seed=0)
    train = make_feature_set(x, y, classes=["cat", "dog"])
    x_test, y_test = _separable(100, 2, 8, seed=1)
    test_labels = y_test + 1  # cat and dog in the test split's own indices
    test_labels[:10] = 0  # ten "ant" images: a class the probe never saw, counted as errors
    test = make_feature_set(x_test, test_labels, classes=["ant", "cat", "dog"])
    train_aligned, test_aligned = align_classes(train, test)
    assert test_aligned.classes == train_aligned.classes == ["cat", "dog", "ant"]
    assert torch.equal(test_aligned.labels[10:], y_test[10:]) and (test_aligned.labels[:10] == 2).all()
    result = linear_probe(train, test, pools=["cls"], **FAST)
    assert result["top1"] == pytest.approx(0.9)  # the 90 cats and dogs right, the 10 ants wrong


def test_top5_ranks_only_the_classes_the_probe_learned():
    """A class only the test split has gets an untrained output; it ranked among the top 5 and credited its images
    (the linear probe read top-1 0% and top-5 15.6% on test classes it had never seen)."""
    import torch
    from wildssl.eval.probe import topk_accuracy

    learned = torch.arange(6).repeat(3)  # classes 0-5 trained; class 6 only in the test split
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 9],  # class 6: its untrained output is the largest
                           [5.0, 4, 3, 2, 1, 0, 9],  # class 1: second among the learned, top-5 not top-1
                           [0.0, 1, 2, 3, 4, 5, 9]])  # class 0: last among the learned six
    labels = torch.tensor([6, 1, 0])
    # the former count: the unseen class ranked, so its image was "right" at top-1 and top-5
    assert topk_accuracy(logits, labels) == pytest.approx({"top1": 1 / 3, "top5": 2 / 3})
    assert topk_accuracy(logits, labels, learned=learned) == pytest.approx({"top1": 0.0, "top5": 1 / 3})
    everything = torch.arange(7)
    assert topk_accuracy(logits, labels, learned=everything) == topk_accuracy(logits, labels)
