"""The attentive (MAP) and decoder probes on constructed tokens: tasks that need a token's position."""

import torch

from conftest import make_feature_set
from wildssl.eval.attentive import AttentivePooling, attentive_probe
from wildssl.eval.decoder import DecoderProbe, box_fourier_features, decoder_probe, patch_boxes
from wildssl.eval.linear import linear_probe

GRID, DIM = 4, 32
MARKER = 3.0


def _marker_tokens(n: int, seed: int):
    """Tokens ``(n, 16, 32)`` = random content + a fixed code per position; one random patch per image
    holds a marker instead of random content. The label is the quadrant of the marker (4 classes).

    Pooling cannot solve it: the mean token is the mean of all position codes (the same for every image)
    plus the mean content, where the marker's position leaves no trace."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randn(GRID * GRID, DIM, generator=torch.Generator().manual_seed(0))
    marker = MARKER * torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    content = torch.randn(n, GRID * GRID, DIM, generator=generator)
    where = torch.randint(0, GRID * GRID, (n,), generator=generator)
    content[torch.arange(n), where] = marker
    rows, cols = where // GRID, where % GRID
    labels = (rows >= GRID // 2).long() * 2 + (cols >= GRID // 2).long()
    tokens = content + positions
    return make_feature_set(tokens.mean(dim=1), labels, patch=tokens)


def test_map_and_decoder_probes_beat_the_linear_probe_when_the_label_is_a_patch_position():
    train, test = _marker_tokens(600, seed=2), _marker_tokens(300, seed=3)
    linear = linear_probe(train, test, lrs=[1e-2], epochs=8, batch_size=32)
    attentive = attentive_probe(train, test, heads=4, lrs=[3e-3], epochs=8, batch_size=32)
    decoder = decoder_probe(train, test, lrs=[3e-3], epochs=6, batch_size=32, width=32, depth=1, heads=4)
    assert linear["top1"] < 0.40  # 4 classes: chance is 25%
    assert attentive["top1"] >= 0.9
    assert decoder["image_top1"] >= 0.9
    assert decoder["tasks"] == ["image (single-label)"]


def test_decoder_names_the_object_in_a_given_box():
    """Each image has 16 patches of random classes (content = a class code); the boxes of four random
    patches are asked for, each labelled with its patch's class: only the box says which patch is meant."""
    def make(n: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        codes = 2.0 * torch.randn(6, DIM, generator=torch.Generator().manual_seed(7))
        classes = torch.randint(0, 6, (n, GRID * GRID), generator=generator)
        tokens = codes[classes] + 0.3 * torch.randn(n, GRID * GRID, DIM, generator=generator)
        cells = patch_boxes((GRID, GRID))
        asked = torch.randint(0, GRID * GRID, (n, 4), generator=generator)  # four boxes per image
        boxes = [cells[a] for a in asked]
        box_labels = [classes[i, a] for i, a in enumerate(asked)]
        return make_feature_set(tokens.mean(1), torch.full((n,), -1), patch=tokens, boxes=boxes, box_labels=box_labels)

    result = decoder_probe(make(300, 0), make(200, 1), lrs=[1e-2], epochs=4, batch_size=32, width=32, depth=1,
                           heads=4)
    assert result["tasks"] == ["box"] and result["num_test_boxes"] == 800
    assert result["box_top1"] >= 0.9 > 0.35 > result["box_majority_baseline"]


def test_box_queries_attend_only_to_the_patches_their_box_overlaps():
    probe = DecoderProbe(8, (2, 2), width=8, depth=1, heads=2, image_classes=3, box_classes=3)
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.4], [0.3, 0.6, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0]]])
    mask = probe.attention_mask(boxes)[0, 0]
    assert mask.tolist() == [[True, True, True, True],  # the image query
                             [True, False, False, False],  # top-left cell only
                             [False, False, True, True],  # the two bottom cells
                             [True, False, False, False]]  # padding: one patch, so no row is empty


def test_map_pooling_is_attention_weighted_mean_of_projected_values():
    torch.manual_seed(0)
    probe = AttentivePooling(8, 3, num_heads=1).double()
    tokens = torch.randn(2, 5, 8, dtype=torch.float64)
    attention = probe.attention
    q = attention.q(probe.query)  # (1, 1, 8)
    k, v = attention.kv(tokens).chunk(2, dim=-1)
    weights = torch.softmax((q @ k.transpose(1, 2)) / 8 ** 0.5, dim=-1)  # (2, 1, 5)
    pooled = attention.proj(weights @ v)
    expected = pooled + probe.mlp(probe.norm(pooled))
    torch.testing.assert_close(probe.pool(tokens), expected[:, 0])


def test_box_fourier_features_are_sin_cos_of_doubling_frequencies():
    box = torch.tensor([[0.25, 0.5, 0.75, 1.0]])
    features = box_fourier_features(box, frequencies=3)
    assert features.shape == (1, 24)
    expected = []
    for coordinate in box[0].tolist():
        angles = [torch.pi * 2 ** k * coordinate for k in range(3)]
        expected += [torch.tensor(a).sin().item() for a in angles] + [torch.tensor(a).cos().item() for a in angles]
    torch.testing.assert_close(features[0], torch.tensor(expected), atol=1e-5, rtol=0)
    cells = torch.tensor([[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]])
    assert torch.equal(patch_boxes((2, 2)), cells)
