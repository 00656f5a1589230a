import math

import pytest
import torch

from wildssl.errors import DataError
from wildssl.eval.fewshot import episode_accuracies, fewshot_accuracy, sample_episodes


def _data(n_per_class=30, classes=8, dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    centres = torch.randn(classes, dim, generator=generator)
    return centres[labels] + 0.9 * torch.randn(len(labels), dim, generator=generator), labels


def test_episodes_draw_distinct_classes_and_disjoint_support_and_query():
    _, labels = _data()
    support, query = sample_episodes(labels, n_way=5, k_shot=3, n_query=4, episodes=50, seed=1)
    assert support.shape == (50, 5, 3) and query.shape == (50, 5, 4)
    for e in range(50):
        row_classes = [int(labels[support[e, c, 0]]) for c in range(5)]
        assert len(set(row_classes)) == 5
        for c in range(5):
            assert (labels[support[e, c]] == row_classes[c]).all() and (labels[query[e, c]] == row_classes[c]).all()
        used = torch.cat([support[e].flatten(), query[e].flatten()])
        assert len(used.unique()) == len(used)  # no image twice in an episode
    again = sample_episodes(labels, 5, 3, 4, 50, seed=1)
    assert torch.equal(support, again[0]) and torch.equal(query, again[1])


def test_fewshot_accuracy_matches_a_brute_force_reference_on_fixed_episodes():
    features, labels = _data()
    support, query = sample_episodes(labels, n_way=4, k_shot=2, n_query=5, episodes=30, seed=2)
    got = episode_accuracies(features, support, query)
    for e in range(30):
        prototypes = []
        for c in range(4):
            members = [features[i].double() / features[i].double().norm() for i in support[e, c].tolist()]
            prototypes.append(sum(members) / len(members))
        correct = 0
        for c in range(4):
            for i in query[e, c].tolist():
                q = features[i].double() / features[i].double().norm()
                distances = [float(((q - p) ** 2).sum()) for p in prototypes]
                correct += int(min(range(4), key=lambda j: distances[j]) == c)
        assert got[e].item() == pytest.approx(correct / 20, abs=1e-12)


def test_fewshot_reports_mean_and_95_percent_interval_over_episodes():
    features, labels = _data()
    result = fewshot_accuracy(features, labels, n_way=5, k_shot=5, n_query=15, episodes=40, seed=3)
    accuracies = episode_accuracies(features, *sample_episodes(labels, 5, 5, 15, 40, seed=3))
    assert result["accuracy"] == pytest.approx(accuracies.mean().item())
    assert result["ci95"] == pytest.approx(1.96 * accuracies.std(unbiased=True).item() / math.sqrt(40))
    assert 0.2 + 0.1 < result["accuracy"]  # clustered features: far above the 20% of 5-way chance


def test_too_few_images_per_class_is_a_one_line_error():
    _, labels = _data(n_per_class=10, classes=8)
    with pytest.raises(DataError, match="5 classes with at least 20 images each; the data has 0"):
        sample_episodes(labels, 5, 5, 15, 10, seed=0)
