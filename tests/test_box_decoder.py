from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wildssl.models.box_decoder import AnnotationBootstrapHead, BoxQueryDecoder, BoxTokenizer

NUM_BINS, LOW, HIGH = 8, -1.0, 2.0
BIN_WIDTH = (HIGH - LOW) / NUM_BINS


def _bin_centre(k: int) -> float:
    return LOW + (k + 0.5) * BIN_WIDTH


def _decoder(use_box_tokens: bool = True, seed: int = 0) -> BoxQueryDecoder:
    torch.manual_seed(seed)
    decoder = BoxQueryDecoder(
        memory_dim=12, dim=8, depth=2, num_heads=2, mlp_ratio=2.0,
        num_bins=NUM_BINS, value_range=(LOW, HIGH), use_box_tokens=use_box_tokens,
    )
    return decoder.double()


def _inputs(batch: int, n_crops: int, n_tokens: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch, n_crops, n_tokens, 12, generator=generator, dtype=torch.float64)
    boxes = torch.rand(batch, n_crops * (n_crops - 1), 4, generator=generator, dtype=torch.float64) * 3 - 1
    return memory, boxes


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Plain multi-head attention on one sequence: q (L, D), k and v (S, D)."""
    head_dim = q.shape[-1] // num_heads
    heads = []
    for h in range(num_heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        weights = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(head_dim), dim=-1)
        heads.append(weights @ v[:, cols])
    return torch.cat(heads, dim=-1)


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def _decode_one_pair(decoder: BoxQueryDecoder, source_memory: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """The decoder written out for a single pair: 4 box tokens + readout query against one crop."""
    dim = decoder.dim
    memory = _linear(decoder.memory_proj, source_memory)
    x = torch.cat((decoder.box_tokenizer(box), decoder.readout_query[None]), dim=0)
    for block in decoder.blocks:
        heads = block.self_attn.num_heads
        h = F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias)
        q, k, v = _linear(block.self_attn.qkv, h).split(dim, dim=-1)
        x = x + _linear(block.self_attn.proj, _attention(q, k, v, heads))
        h = F.layer_norm(x, (dim,), block.norm2.weight, block.norm2.bias)
        k, v = _linear(block.cross_attn.kv, memory).split(dim, dim=-1)
        x = x + _linear(block.cross_attn.proj, _attention(_linear(block.cross_attn.q, h), k, v, heads))
        h = F.layer_norm(x, (dim,), block.norm3.weight, block.norm3.bias)
        x = x + _linear(block.mlp[2], F.gelu(_linear(block.mlp[0], h)))
    return F.layer_norm(x[-1], (dim,), decoder.norm.weight, decoder.norm.bias)


def test_box_tokens_are_four_per_box_identical_for_identical_boxes_and_different_otherwise():
    tokenizer = BoxTokenizer(6, NUM_BINS, (LOW, HIGH)).double()
    box_a = torch.tensor([_bin_centre(1), _bin_centre(2), _bin_centre(5), _bin_centre(6)], dtype=torch.float64)
    box_b = torch.tensor([_bin_centre(0), _bin_centre(2), _bin_centre(7), _bin_centre(6)], dtype=torch.float64)
    tokens = tokenizer(torch.stack((box_a, box_b, box_a))[None])
    assert tokens.shape == (1, 3, 4, 6)
    assert torch.equal(tokens[0, 0], tokens[0, 2])
    # box_b differs from box_a in x0 and x1 only: exactly those two tokens change.
    changed = (tokens[0, 0] != tokens[0, 1]).any(dim=-1)
    assert changed.tolist() == [True, False, True, False]


def test_box_tokens_give_each_coordinate_its_own_table():
    tokenizer = BoxTokenizer(6, NUM_BINS, (LOW, HIGH)).double()
    same_value = torch.full((4,), _bin_centre(3), dtype=torch.float64)
    other_value = torch.full((4,), _bin_centre(6), dtype=torch.float64)
    tokens, other_tokens = tokenizer(same_value), tokenizer(other_value)
    assert tokens.shape == (4, 6)
    # With a shared table, moving any coordinate from bin 3 to bin 6 would shift its token by one
    # and the same vector; separate tables shift each coordinate's token differently.
    shifts = other_tokens - tokens
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(shifts[a], shifts[b])


def test_box_tokens_accept_coordinates_far_outside_the_range():
    tokenizer = BoxTokenizer(6, NUM_BINS, (LOW, HIGH))
    tokens = tokenizer(torch.tensor([[-50.0, -1.5, 2.5, 50.0]]))
    assert tokens.shape == (1, 4, 6) and torch.isfinite(tokens).all()


def test_mask_tokens_of_the_ablation_are_the_same_for_every_box():
    tokenizer = BoxTokenizer(6, use_box_tokens=False)
    boxes = torch.rand(2, 5, 4) * 3 - 1
    tokens = tokenizer(boxes)
    assert tokens.shape == (2, 5, 4, 6)
    assert torch.equal(tokens, tokens[:1, :1].expand_as(tokens))
    assert not hasattr(tokenizer, "coordinate_embed")


@pytest.mark.parametrize("batch, n_crops", [(2, 3), (1, 4), (2, 2)])
def test_packed_decoder_pass_equals_a_per_pair_loop(batch, n_crops):
    decoder = _decoder()
    memory, boxes = _inputs(batch, n_crops)
    phi = decoder(memory, boxes)
    assert phi.shape == (batch, n_crops * (n_crops - 1), 8)
    pairs = [(i, j) for i in range(n_crops) for j in range(n_crops) if i != j]
    with torch.no_grad():
        for b in range(batch):
            for p, (i, _) in enumerate(pairs):
                torch.testing.assert_close(phi[b, p], _decode_one_pair(decoder, memory[b, i], boxes[b, p]))


def test_changing_one_pairs_box_changes_only_that_pairs_output():
    decoder = _decoder()
    memory, boxes = _inputs(2, 4)
    phi = decoder(memory, boxes)
    moved = boxes.clone()
    moved[1, 5] = torch.tensor([-0.9, 1.8, 0.1, 1.95])  # pair (1, 3) of image 1, far from its old box
    phi_moved = decoder(memory, moved)
    changed = (phi != phi_moved).any(dim=-1)
    expected = torch.zeros(2, 12, dtype=torch.bool)
    expected[1, 5] = True
    assert torch.equal(changed, expected)


def test_output_depends_on_the_source_crop_memory_only():
    decoder = _decoder()
    memory, boxes = _inputs(2, 3)
    phi = decoder(memory, boxes)
    perturbed = memory.clone()
    perturbed[0, 2] += torch.randn_like(perturbed[0, 2])
    changed = (decoder(perturbed, boxes) != phi).any(dim=-1)
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected[0, 4:6] = True  # pairs (2, 0) and (2, 1): the ones whose source is crop 2
    assert torch.equal(changed, expected)


def test_without_box_tokens_all_targets_of_a_source_decode_alike():
    decoder = _decoder(use_box_tokens=False)
    memory, boxes = _inputs(2, 3)
    phi = decoder(memory, boxes).reshape(2, 3, 2, 8)
    torch.testing.assert_close(phi[:, :, 0], phi[:, :, 1])
    assert not torch.allclose(phi[:, 0], phi[:, 1])


def test_every_decoder_parameter_receives_gradient():
    decoder = _decoder()
    memory, boxes = _inputs(2, 3)
    decoder(memory, boxes).square().sum().backward()
    for name, parameter in decoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_decoder_rejects_boxes_that_do_not_match_the_crop_count():
    decoder = _decoder()
    memory, _ = _inputs(2, 3)
    with pytest.raises(ValueError, match="relative_boxes"):
        decoder(memory, torch.zeros(2, 12, 4, dtype=torch.float64))


def test_head_logits_are_scaled_cosine_similarities_to_projected_annotations():
    head = AnnotationBootstrapHead(_decoder(), feature_dim=5, init_scale=7.0).double()
    memory, boxes = _inputs(1, 3)
    phi = head(memory, boxes)
    features = torch.randn(4, 5, dtype=torch.float64)
    logits = head.logits(phi, head.annotations(features))
    assert logits.shape == (1, 6, 4)
    projected = features @ head.annotation_head.weight.T
    scale = head.logit_scale().item()
    assert scale == pytest.approx(7.0, rel=1e-6)
    for p in range(6):
        for k in range(4):
            cosine = phi[0, p] @ projected[k] / (phi[0, p].norm() * projected[k].norm())
            assert logits[0, p, k].item() == pytest.approx(scale * cosine.item(), rel=1e-10)


def test_head_for_a_fixed_annotation_set_scores_a_learned_embedding_matrix():
    head = AnnotationBootstrapHead(_decoder(), num_annotations=6).double()
    memory, boxes = _inputs(2, 3)
    phi = head(memory, boxes)
    psi = head.annotations()
    assert psi.shape == (6, 8) and psi.requires_grad
    expected = head.logit_scale() * F.normalize(phi, dim=-1) @ F.normalize(head.annotation_embedding, dim=-1).T
    torch.testing.assert_close(head.logits(phi, psi), expected)
    head.logits(phi, psi).sum().backward()
    assert head.annotation_embedding.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fixed annotation set"):
        head.annotations(torch.zeros(6, 5, dtype=torch.float64))


def test_head_takes_exactly_one_annotation_form():
    for kwargs in ({}, {"feature_dim": 5, "num_annotations": 6}):
        with pytest.raises(ValueError, match="exactly one"):
            AnnotationBootstrapHead(_decoder(), **kwargs)


def test_head_logit_scale_above_100_still_learns_and_is_clamped_back_after_the_step():
    head = AnnotationBootstrapHead(_decoder(), feature_dim=5, init_scale=150.0).double()
    phi = torch.randn(1, 2, 8, dtype=torch.float64)
    head.logits(phi, head.annotations(torch.randn(3, 5, dtype=torch.float64))).logsumexp(-1).sum().backward()
    grad = head.logit_scale.log_scale.grad
    assert grad is not None and grad != 0  # an output clamp would make this exactly 0
    head.logit_scale.commit_step()  # what the engine does after every optimizer step
    assert head.logit_scale.log_scale.item() == pytest.approx(math.log(100.0))


def test_head_logits_stay_fp32_under_bf16_autocast():
    head = AnnotationBootstrapHead(_decoder(), feature_dim=5)
    phi, features = torch.randn(1, 2, 8), torch.randn(3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head.logits(phi.bfloat16(), head.annotations(features)).dtype == torch.float32
