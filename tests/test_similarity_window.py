import math

import pytest
import torch

from wildssl.methods.similarity_window import (SimilarityWindow, adaptive_partners, nearest_other,
                                               sampling_probabilities, spread_of, windowed_similarity)
from wildssl.train.logging import CollapseMonitor

# A constructed history: w = 3 epochs, K = 2, for images 4 and 7 (dataset indices). -1: empty entry.
# Image 4 is its own nearest neighbour in every epoch; image 7's nearest is image 2 in two epochs of three.
NEIGHBOURS = torch.tensor([
    [[4, 9], [4, 1], [9, 4]],
    [[2, 7], [7, 5], [2, -1]],   # epoch 3: image 7 was seen but only one cache entry existed
])
SIMILARITIES = torch.tensor([
    [[0.9, 0.5], [0.8, 0.6], [0.7, 0.65]],
    [[0.95, 0.6], [0.9, 0.3], [0.8, 0.0]],
])
WINDOW, TAU = 3, 0.2


def _expected_means(row: int) -> dict[int, float]:
    """Eq. 11 by hand: the sum over epochs of the similarity where j is in the epoch's support, / w."""
    totals: dict[int, float] = {}
    for epoch in range(WINDOW):
        for j, s in zip(NEIGHBOURS[row, epoch].tolist(), SIMILARITIES[row, epoch].tolist()):
            if j >= 0:
                totals[j] = totals.get(j, 0.0) + s
    return {j: total / WINDOW for j, total in totals.items()}


def test_windowed_similarity_support_union_and_probabilities_equal_hand_computed_values():
    support, mean = windowed_similarity(NEIGHBOURS, SIMILARITIES, WINDOW)
    probabilities = sampling_probabilities(support, mean, TAU)
    for row in range(2):
        expected = _expected_means(row)
        valid = support[row] >= 0
        assert support[row][valid].tolist() == sorted(expected)  # the union support, in increasing order
        got = dict(zip(support[row][valid].tolist(), mean[row][valid].tolist()))
        assert got == pytest.approx(expected, abs=1e-6)
        norm = sum(math.exp(m / TAU) for m in expected.values())
        got_p = dict(zip(support[row][valid].tolist(), probabilities[row][valid].tolist()))
        assert got_p == pytest.approx({j: math.exp(m / TAU) / norm for j, m in expected.items()}, abs=1e-6)
        assert probabilities[row][~valid].eq(0).all()
    # The numbers themselves, for image 4: m(4) = (0.9 + 0.8 + 0.65) / 3, m(9) = (0.5 + 0.7) / 3, m(1) = 0.6 / 3.
    assert _expected_means(0) == pytest.approx({4: 2.35 / 3, 9: 1.2 / 3, 1: 0.2})


def test_adaptive_rule_samples_from_p_win_when_the_image_is_its_own_argmax():
    support, mean = windowed_similarity(NEIGHBOURS[:1], SIMILARITIES[:1], WINDOW)
    draws = 2000
    uniforms = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws  # evenly spaced: counts = p * draws
    partners = adaptive_partners(support.expand(draws, -1), mean.expand(draws, -1),
                                 torch.full((draws,), 4), TAU, uniforms)
    probabilities = sampling_probabilities(support, mean, TAU)[0]
    for j, p in zip(support[0].tolist(), probabilities.tolist()):
        if j >= 0:
            assert abs(int((partners == j).sum()) - p * draws) <= 1


def test_adaptive_rule_falls_back_to_the_standard_pair_when_the_argmax_is_another_image():
    support, mean = windowed_similarity(NEIGHBOURS[1:], SIMILARITIES[1:], WINDOW)
    assert support[0, mean[0].argmax()] == 2  # m(2) = 1.75 / 3 beats m(7) = 1.5 / 3
    uniforms = torch.linspace(0, 0.999, 50, dtype=torch.float64)
    partners = adaptive_partners(support.expand(50, -1), mean.expand(50, -1), torch.full((50,), 7), 5.0, uniforms)
    assert partners.eq(7).all()  # even a flat distribution (tau = 5) never fires: 7 is not its own argmax


def test_tau_zero_always_gives_the_standard_pair():
    support, mean = windowed_similarity(NEIGHBOURS, SIMILARITIES, WINDOW)
    uniforms = torch.tensor([0.0, 0.999], dtype=torch.float64)
    assert adaptive_partners(support, mean, torch.tensor([4, 7]), 0.0, uniforms).tolist() == [4, 7]


def test_nearest_other_skips_the_image_itself_and_empty_entries():
    neighbours = torch.tensor([[3, 8, 1], [5, 3, -1], [-1, -1, -1], [6, -1, -1]])
    assert nearest_other(neighbours, torch.tensor([3, 2, 4, 6])).tolist() == [8, 5, 4, 6]


def test_window_keeps_the_last_w_epochs_and_images_unseen_in_an_epoch_count_as_empty():
    window = SimilarityWindow(size=4, topk=1, window=2)
    for epoch, seen in enumerate(([0, 1, 2, 3], [0, 1], [0, 2])):
        images = torch.tensor(seen)
        window.observe(images, (images + 1).remainder(4).unsqueeze(1) * 0 + epoch, torch.full((len(seen), 1), 0.1 * (epoch + 1)),
                       torch.zeros(len(seen), dtype=torch.bool))
        window.commit_step()
        window.push_epoch()
    neighbours, similarities = window.history(torch.tensor([0, 3]))
    assert window.completed_epochs == 3
    assert sorted(neighbours[0, :, 0].tolist()) == [1, 2]  # epochs 2 and 3 (ids = epoch number), epoch 1 dropped
    assert neighbours[1, :, 0].tolist() == [-1, -1]  # image 3 was not seen in the last two epochs
    assert window.latest(torch.tensor([2])).tolist() == [[2]]


def test_epoch_diagnostics_count_bootstrapped_pairs_and_neighbour_label_accuracy():
    window = SimilarityWindow(size=4, topk=2, window=1)
    images = torch.tensor([0, 1, 2])
    window.observe(images, torch.tensor([[0, 1], [3, 1], [2, 0]]), torch.ones(3, 2), torch.tensor([True, False, False]))
    window.commit_step()
    figures = window.epoch_diagnostics(torch.tensor([0, 1, 0, 1]))
    assert figures["neighbour_ratio"] == pytest.approx(1 / 3)
    assert figures["nn_self_ratio"] == pytest.approx(2 / 3)  # images 0 and 2 are their own first neighbour
    assert figures["nn_top1_accuracy"] == pytest.approx(1.0)  # 0->0, 1->3 (label 1), 2->2
    assert figures["nn2_top1_accuracy"] == pytest.approx(2 / 3)  # 0->1 wrong, 1->1, 2->0


def test_a_collapsed_cache_trips_the_collapse_alarm_and_a_spread_one_does_not():
    generator = torch.Generator().manual_seed(0)
    spread = torch.nn.functional.normalize(torch.randn(500, 16, generator=generator), dim=1)
    collapsed = torch.nn.functional.normalize(torch.ones(500, 16) + 1e-4 * torch.randn(500, 16, generator=generator), dim=1)
    healthy, dead = spread_of(spread), spread_of(collapsed)
    assert healthy["cache_embedding_std"] == pytest.approx(1.0, abs=0.1) and healthy["cache_effective_rank"] > 12
    assert dead["cache_embedding_std"] < 0.01
    monitor = CollapseMonitor(after_step=0, patience=2)
    assert monitor.check(1, healthy) == [] and monitor.check(2, healthy) == []
    assert monitor.check(3, dead) == []
    alarms = monitor.check(4, dead)
    assert len(alarms) == 1 and "cache embedding std" in alarms[0]
