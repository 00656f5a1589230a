import math

import torch

from wildssl.losses.slot_loss import matched_slots, slot_contrastive_loss
from wildssl.models.slots import attentive_slot_pooling, owned_prototypes


def test_owned_prototypes_are_exactly_the_argmax_of_some_patch():
    # Image 0: patches pick prototypes 2, 2, 0; image 1: 3, 1, 3. Prototype 1 of image 0 scores high on
    # every patch but is never the top one, so it owns nothing.
    scores = torch.tensor([[[0.5, 0.9, 1.0, 0.0], [0.1, 0.8, 0.9, 0.2], [0.9, 0.85, 0.1, 0.3]],
                           [[0.0, 0.1, 0.2, 0.9], [0.3, 0.7, 0.1, 0.6], [0.2, 0.1, 0.0, 0.4]]])
    owned = owned_prototypes(scores)
    assert owned.tolist() == [[True, False, True, False], [False, True, False, True]]


def test_matched_slots_are_those_active_in_both_views_in_flat_order():
    query_active = torch.tensor([[True, False, True], [True, True, False]])
    key_active = torch.tensor([[True, True, False], [False, True, True]])
    assert matched_slots(query_active, key_active).tolist() == [0, 4]  # (0, 0) and (1, 1)


def test_attentive_slot_pooling_is_the_assignment_weighted_mean_of_patches():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    scores = torch.rand(2, 5, 4, generator=generator, dtype=torch.float64) * 2 - 1
    slots = attentive_slot_pooling(embeddings, scores, temperature=0.07)
    for b in range(2):
        for k in range(4):
            weights = [math.exp(float(scores[b, n, k]) / 0.07) / sum(math.exp(float(s) / 0.07) for s in scores[b, n])
                       for n in range(5)]
            expected = sum(w * embeddings[b, n] for n, w in enumerate(weights)) / sum(weights)
            assert torch.allclose(slots[b, k].double(), expected, atol=1e-5)


def _slot_loss_reference(queries, index, keys, key_active, tau):
    """Wen et al.'s slot loss written out: every query (b, k) against every active teacher slot of the
    batch, its own slot (b, k) the positive; 2 tau times the mean cross-entropy, in float64."""
    batch, slots, _ = keys.shape
    candidates = [(b, k) for b in range(batch) for k in range(slots) if key_active[b, k]]
    total = 0.0
    for q, flat in zip(queries, index.tolist()):
        q = q / q.norm()
        logits = {c: float(q @ (keys[c] / keys[c].norm())) / tau for c in candidates}
        log_norm = math.log(sum(math.exp(v) for v in logits.values()))
        total += -(logits[(flat // slots, flat % slots)] - log_norm)
    return 2 * tau * total / len(index)


def test_slot_contrastive_loss_matches_a_float64_implementation_of_the_equation():
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)
    student_active = torch.rand(3, 4, generator=generator) < 0.6
    key_active = torch.rand(3, 4, generator=generator) < 0.6
    index = matched_slots(student_active, key_active)
    assert 2 <= len(index) < int(key_active.sum())  # some queries, and negatives that are no query's key
    queries = torch.randn(len(index), 6, generator=generator, dtype=torch.float64)
    expected = _slot_loss_reference(queries, index, keys, key_active, 0.2)
    loss = slot_contrastive_loss(queries, index, keys, key_active, temperature=0.2)
    assert math.isclose(float(loss), expected, rel_tol=1e-5)
    # Inactive teacher slots are no candidates: changing them changes nothing.
    moved = torch.where(key_active.unsqueeze(-1), keys, torch.randn_like(keys))
    assert math.isclose(float(slot_contrastive_loss(queries, index, moved, key_active)), float(loss), rel_tol=1e-6)


def test_slot_contrastive_loss_is_zero_without_queries():
    keys = torch.randn(2, 3, 4)
    loss = slot_contrastive_loss(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long), keys,
                                 torch.ones(2, 3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
