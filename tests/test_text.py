from __future__ import annotations

import pytest
import torch

from wildssl.errors import ConfigError
from wildssl.models.text import TEXT_SIZES, TextTransformer, build_text_tower
from wildssl.models.tokenizer import EOT_ID, SOT_ID, ByteTokenizer

VOCAB, CONTEXT, WIDTH, EMBED = 40, 12, 16, 8


def tiny_tower(seed: int = 0) -> TextTransformer:
    torch.manual_seed(seed)
    return build_text_tower("tiny", VOCAB, EMBED, CONTEXT, depth=2, width=WIDTH, heads=2).eval()


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    # Ids >= 3 so no row holds an accidental special token.
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_output_shapes():
    tower = tiny_tower()
    tokens = random_tokens(3, CONTEXT)
    tokens[:, 5] = EOT_ID
    assert tower.forward_tokens(tokens).shape == (3, CONTEXT, WIDTH)
    assert tower(tokens).shape == (3, EMBED)
    assert tower(tokens[:, :7]).shape == (3, EMBED)


@pytest.mark.parametrize("position", [0, 4, CONTEXT - 2])
def test_changing_tokens_after_a_position_leaves_earlier_hidden_states_unchanged(position):
    tower = tiny_tower()
    tokens = random_tokens(2, CONTEXT)
    changed = tokens.clone()
    changed[:, position + 1 :] = (changed[:, position + 1 :] + 7 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        before, after = tower.forward_tokens(tokens), tower.forward_tokens(changed)
    assert torch.allclose(before[:, : position + 1], after[:, : position + 1], atol=1e-6)
    # Position p + 1 sees its own changed token, so the comparison above is not vacuous.
    assert not torch.allclose(before[:, position + 1], after[:, position + 1], atol=1e-4)


def test_earlier_tokens_do_reach_later_positions():
    tower = tiny_tower()
    tokens = random_tokens(1, CONTEXT)
    changed = tokens.clone()
    changed[0, 0] = 3 if tokens[0, 0] != 3 else 4
    with torch.no_grad():
        before, after = tower.forward_tokens(tokens), tower.forward_tokens(changed)
    assert not torch.allclose(before[0, -1], after[0, -1], atol=1e-5)


def test_output_is_the_projection_of_the_hidden_state_at_the_first_eot():
    tower = tiny_tower()
    tokens = random_tokens(3, CONTEXT)
    eot_positions = [2, 6, CONTEXT - 1]
    for row, position in enumerate(eot_positions):
        tokens[row, position] = EOT_ID
    tokens[0, 8] = EOT_ID  # a second EOT later in row 0 must not be the one pooled
    with torch.no_grad():
        hidden = tower.forward_tokens(tokens)
        pooled = torch.stack([hidden[row, position] for row, position in enumerate(eot_positions)])
        want = pooled @ tower.projection.weight.T
        got = tower(tokens)
    assert torch.allclose(got, want, atol=1e-6)


def test_pooled_output_depends_on_where_the_eot_is():
    tower = tiny_tower()
    tokens = random_tokens(1, CONTEXT)
    early, late = tokens.clone(), tokens.clone()
    early[0, 3] = EOT_ID
    late[0, 7] = EOT_ID
    with torch.no_grad():
        assert not torch.allclose(tower(early), tower(late), atol=1e-4)


def test_anything_after_the_eot_does_not_change_the_output():
    tower = tiny_tower()
    tokens = random_tokens(2, CONTEXT)
    tokens[:, 5] = EOT_ID
    padded = tokens.clone()
    padded[:, 6:] = 0
    with torch.no_grad():
        reference = tower(tokens)
        assert torch.allclose(tower(padded), reference, atol=1e-6)
        assert torch.allclose(tower(tokens[:, :6]), reference, atol=1e-6)


def test_works_with_byte_tokenizer_output_and_padding_is_invisible():
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    tower = build_text_tower("tiny", tokenizer.vocab_size, EMBED, 32, depth=1, width=WIDTH, heads=2).eval()
    short = tokenizer.encode_batch(["a cat", "a dog on a mat"], context_length=32)
    with torch.no_grad():
        full = tower(short)
        trimmed = tower(short[:, :16])
    assert short[0, 0].item() == SOT_ID
    assert torch.allclose(full, trimmed, atol=1e-6)
    assert not torch.allclose(full[0], full[1], atol=1e-4)


def test_init_follows_open_clip_standard_deviations():
    torch.manual_seed(0)
    width, depth = 64, 4
    tower = TextTransformer(vocab_size=500, embed_dim=32, context_length=64, width=width, depth=depth, heads=4)

    def std(t: torch.Tensor) -> float:
        return t.detach().double().std().item()

    assert std(tower.token_embedding.weight) == pytest.approx(0.02, rel=0.05)
    assert std(tower.positional_embedding) == pytest.approx(0.01, rel=0.05)
    blocks = tower.blocks
    residual_std = width**-0.5 * (2 * depth) ** -0.5
    assert std(torch.cat([b.attn.qkv.weight.flatten() for b in blocks])) == pytest.approx(width**-0.5, rel=0.05)
    assert std(torch.cat([b.attn.proj.weight.flatten() for b in blocks])) == pytest.approx(residual_std, rel=0.05)
    assert std(torch.cat([b.mlp.fc1.weight.flatten() for b in blocks])) == pytest.approx((2 * width) ** -0.5, rel=0.05)
    assert std(torch.cat([b.mlp.fc2.weight.flatten() for b in blocks])) == pytest.approx(residual_std, rel=0.05)
    assert std(tower.projection.weight) == pytest.approx(width**-0.5, rel=0.05)
    assert tower.projection.bias is None
    assert all(not b.attn.qkv.bias.detach().any() for b in blocks)


def test_named_sizes_and_overrides():
    assert TEXT_SIZES["small"] == (384, 12, 6)
    tower = build_text_tower("small", vocab_size=VOCAB, embed_dim=EMBED, context_length=CONTEXT, depth=1)
    assert tower.token_embedding.embedding_dim == 384 and len(tower.blocks) == 1
    assert tower.blocks[0].attn.num_heads == 6
    assert tower.positional_embedding.shape == (CONTEXT, 384)


def test_bad_sizes_and_too_long_tokens_are_rejected():
    with pytest.raises(ConfigError, match="size"):
        build_text_tower("gigantic", VOCAB, EMBED)
    with pytest.raises(ConfigError, match="divisible"):
        build_text_tower("tiny", VOCAB, EMBED, width=10, heads=3, depth=1)
    with pytest.raises(ValueError, match="context_length"):
        tiny_tower()(random_tokens(1, CONTEXT + 1))


def test_gradients_reach_every_parameter():
    tower = tiny_tower().train()
    tokens = random_tokens(2, CONTEXT)
    tokens[:, -1] = EOT_ID
    tower(tokens).square().sum().backward()
    missing = [name for name, p in tower.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
