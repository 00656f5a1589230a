from __future__ import annotations

import math

import pytest
import torch

from wildssl.errors import ConfigError
from wildssl.models.vit import ENCODER_SIZES, VisionTransformer, build_encoder, drop_path


def tiny_vit(**kwargs) -> VisionTransformer:
    args = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    args.update(kwargs)
    return VisionTransformer(**args)


@pytest.mark.parametrize("name,patch,height,width,registers", [
    ("tiny", 16, 32, 48, 0),
    ("vit_tiny", 8, 32, 32, 4),
    ("small", 14, 28, 42, 1),
])
def test_forward_output_shapes_match_tokens_layout(name, patch, height, width, registers):
    torch.manual_seed(0)
    encoder = build_encoder(name, patch_size=patch, img_size=patch * 2, num_register_tokens=registers, depth=2)
    out = encoder(torch.randn(2, 3, height, width))
    patches = (height // patch) * (width // patch)
    width_d = ENCODER_SIZES[name.removeprefix("vit_")][0]
    assert encoder.num_prefix_tokens == 1 + registers
    assert out["cls"].shape == (2, width_d)
    assert out["registers"].shape == (2, registers, width_d)
    assert out["patch"].shape == (2, patches, width_d)
    assert out["tokens"].shape == (2, 1 + registers + patches, width_d)
    assert torch.equal(out["tokens"][:, 0], out["cls"])
    assert torch.equal(out["tokens"][:, 1 + registers:], out["patch"])
    assert encoder.num_patches((height, width)) == patches
    assert encoder.forward_features(torch.randn(1, 3, height, width)).shape == (1, 1 + registers + patches, width_d)


def test_attention_equals_explicit_float64_softmax():
    torch.manual_seed(0)
    attn = tiny_vit(embed_dim=12, num_heads=3).double().blocks[0].attn
    for p in attn.parameters():  # biases start at zero; make them matter
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 12, dtype=torch.float64)

    heads, head_dim = 3, 4
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # (B, T, 3D) laid out (3, heads, head_dim)
    expected = torch.zeros(2, 5, 12, dtype=torch.float64)
    for b in range(2):
        for h in range(heads):
            q = qkv[b, :, 0 * 12 + h * head_dim:0 * 12 + (h + 1) * head_dim]
            k = qkv[b, :, 1 * 12 + h * head_dim:1 * 12 + (h + 1) * head_dim]
            v = qkv[b, :, 2 * 12 + h * head_dim:2 * 12 + (h + 1) * head_dim]
            scores = q @ k.T / math.sqrt(head_dim)
            weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            weights = weights / weights.sum(dim=1, keepdim=True)
            expected[b, :, h * head_dim:(h + 1) * head_dim] = weights @ v
    expected = expected @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


def test_block_is_prenorm_residual_with_exact_gelu():
    torch.manual_seed(0)
    block = tiny_vit().double().blocks[0]
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)

    def layer_norm(t, norm):
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias

    def gelu(t):
        return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))

    mid = x + block.attn(layer_norm(x, block.norm1))
    hidden = gelu(layer_norm(mid, block.norm2) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    expected = mid + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    assert block.mlp.fc1.out_features == 64  # mlp_ratio 4
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def zero_patch_embedding(encoder: VisionTransformer) -> VisionTransformer:
    with torch.no_grad():
        encoder.patch_embed.proj.weight.zero_()
        encoder.patch_embed.proj.bias.zero_()
    return encoder


def test_position_embedding_is_identity_at_native_grid():
    torch.manual_seed(0)
    encoder = zero_patch_embedding(tiny_vit(num_register_tokens=2))
    tokens = encoder.prepare_tokens(torch.randn(2, 3, 32, 32))
    assert encoder.grid_size == (4, 4)
    assert torch.equal(tokens[:, 3:], encoder.pos_embed.expand(2, -1, -1))
    # cls and registers get no position embedding (timm no_embed_class=True)
    assert torch.equal(tokens[:, 0], encoder.cls_token[0].expand(2, -1))
    assert torch.equal(tokens[:, 1:3], encoder.reg_token.expand(2, -1, -1))


def test_position_embedding_resized_keeps_constant_table_constant_and_shape():
    encoder = zero_patch_embedding(tiny_vit())
    with torch.no_grad():
        encoder.pos_embed.fill_(0.7)
    tokens = encoder.prepare_tokens(torch.randn(2, 3, 24, 56))  # grid 3x7 vs stored 4x4
    assert tokens.shape == (2, 1 + 21, 16)
    torch.testing.assert_close(tokens[:, 1:], torch.full((2, 21, 16), 0.7), rtol=0, atol=1e-6)


def test_position_embedding_resize_keeps_rows_and_columns_apart():
    # A table that varies along columns only, resized in the row direction only, must keep each
    # column's values exactly: a row/column mix-up in the reshape would break this.
    encoder = tiny_vit()
    column_values = torch.randn(4, 16)
    with torch.no_grad():
        encoder.pos_embed.copy_(column_values.repeat(4, 1).unsqueeze(0))  # index = row * 4 + column
    table = encoder.position_embedding((6, 4)).detach()
    assert table.shape == (1, 24, 16)
    torch.testing.assert_close(table[0].reshape(6, 4, 16), column_values.expand(6, 4, 16), rtol=0, atol=1e-5)


def cubic_resize_1d(values: torch.Tensor, size: int, a: float = -0.75) -> torch.Tensor:
    """Keys' cubic convolution, half-pixel centres, edge clamping (PyTorch's bicubic), along dim 0."""
    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a if d < 2 else 0.0

    length = values.shape[0]
    rows = []
    for out in range(size):
        source = (out + 0.5) * length / size - 0.5
        base = math.floor(source)
        rows.append(sum(kernel(source - (base + k)) * values[min(max(base + k, 0), length - 1)]
                        for k in range(-1, 3)))
    return torch.stack(rows)


def test_position_embedding_resize_is_bicubic_along_rows():
    torch.manual_seed(0)
    encoder = tiny_vit()
    row_values = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():
        encoder.pos_embed.copy_(row_values.repeat_interleave(4, dim=0).unsqueeze(0))
    table = encoder.position_embedding((7, 4)).detach().double()[0].reshape(7, 4, 16)
    expected = cubic_resize_1d(row_values, 7)
    torch.testing.assert_close(table, expected[:, None].expand(7, 4, 16), rtol=0, atol=1e-5)


def test_position_embedding_resize_is_differentiable():
    encoder = tiny_vit()
    encoder.position_embedding((3, 5)).sum().backward()
    assert encoder.pos_embed.grad is not None and encoder.pos_embed.grad.abs().sum() > 0


def test_image_size_not_multiple_of_patch_raises_config_error_naming_size():
    encoder = tiny_vit()
    with pytest.raises(ConfigError, match="30x32"):
        encoder(torch.randn(1, 3, 30, 32))


def test_keep_indices_tokens_equal_full_tokens_at_those_indices():
    torch.manual_seed(0)
    encoder = tiny_vit(num_register_tokens=2)
    x = torch.randn(2, 3, 32, 40)  # 20 patches, not the stored grid
    keep = torch.stack([torch.randperm(20)[:7], torch.randperm(20)[:7]])
    full = encoder.prepare_tokens(x)
    expected = torch.cat([full[:, :3], torch.stack([full[b, 3 + keep[b]] for b in range(2)])], dim=1)

    seen = []
    encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = encoder(x, keep_indices=keep)
    assert out["patch"].shape == (2, 7, 16)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


def test_keep_indices_with_depth_zero_is_norm_of_kept_tokens():
    torch.manual_seed(0)
    encoder = tiny_vit(depth=0)
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[5, 0, 15], [2, 2, 9]])
    full = encoder.prepare_tokens(x)
    kept = torch.cat([full[:, :1], torch.stack([full[b, 1 + keep[b]] for b in range(2)])], dim=1)
    torch.testing.assert_close(encoder.forward_features(x, keep_indices=keep), encoder.norm(kept))


def test_keep_indices_of_every_patch_give_the_full_output_at_those_indices():
    torch.manual_seed(0)
    encoder = tiny_vit(num_register_tokens=1, depth=3).eval()
    x = torch.randn(3, 3, 32, 32)  # 16 patches
    keep = torch.stack([torch.randperm(16) for _ in range(3)])  # nothing dropped, order shuffled
    full = encoder(x)
    subset = encoder(x, keep_indices=keep)
    torch.testing.assert_close(subset["cls"], full["cls"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(subset["patch"], torch.stack([full["patch"][b, keep[b]] for b in range(3)]),
                               rtol=1e-5, atol=1e-5)


def test_padded_keep_sets_give_each_image_its_unpadded_output_on_valid_tokens():
    torch.manual_seed(1)
    encoder = tiny_vit(num_register_tokens=2, depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    sets = [torch.tensor([3, 7, 8]), torch.tensor([0, 1, 5, 9, 10, 14, 15])]
    keep = torch.tensor([[3, 7, 8, 3, 0, 12, 4], [0, 1, 5, 9, 10, 14, 15]])  # row 0 padded with junk
    valid = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    padded = encoder(x, keep_indices=keep, keep_valid=valid)
    for b, indices in enumerate(sets):
        alone = encoder(x[b: b + 1], keep_indices=indices[None])
        count = len(indices)
        torch.testing.assert_close(padded["patch"][b, :count], alone["patch"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded["cls"][b], alone["cls"][0], rtol=1e-5, atol=1e-5)
    # Without the mask the junk would leak into the valid tokens: the mask is what makes them equal.
    unmasked = encoder(x, keep_indices=keep)
    assert (unmasked["patch"][0, :3] - padded["patch"][0, :3]).abs().max() > 1e-3


def test_keep_valid_needs_keep_indices_of_its_shape():
    encoder = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ConfigError, match="keep_indices"):
        encoder(x, keep_valid=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="keep_valid"):
        encoder(x, keep_indices=torch.zeros(1, 4, dtype=torch.long), keep_valid=torch.ones(1, 3, dtype=torch.bool))


def test_mask_replaces_patch_embedding_before_position_embedding():
    torch.manual_seed(0)
    encoder = tiny_vit(num_register_tokens=1)
    with torch.no_grad():
        encoder.mask_token.normal_()
    x = torch.randn(3, 3, 32, 48)  # 4x6 grid: position table resized
    mask = torch.rand(3, 24) < 0.4
    mask[0, 0], mask[0, 1] = True, False
    plain = encoder.prepare_tokens(x)
    masked = encoder.prepare_tokens(x, mask)
    pos = encoder.position_embedding((4, 6))[0]
    for b in range(3):
        for i in range(24):
            if mask[b, i]:
                torch.testing.assert_close(masked[b, 2 + i], encoder.mask_token[0, 0] + pos[i])
            else:
                assert torch.equal(masked[b, 2 + i], plain[b, 2 + i])
    assert torch.equal(masked[:, :2], plain[:, :2])
    masked.sum().backward()
    assert encoder.mask_token.grad.abs().sum() > 0


def test_drop_path_zeroes_or_rescales_whole_samples():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2)
    out = drop_path(x, 0.25, training=True)
    per_sample = out.reshape(4000, -1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))
    assert abs(out.mean().item() - 1.0) < 0.05
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_drop_path_rate_rises_linearly_to_last_block():
    encoder = tiny_vit(depth=3, drop_path_rate=0.2)
    assert [b.drop_path_rate for b in encoder.blocks] == pytest.approx([0.0, 0.1, 0.2])


def test_no_weight_decay_names_are_the_token_parameters():
    encoder = tiny_vit(num_register_tokens=2)
    params = dict(encoder.named_parameters())
    assert encoder.no_weight_decay() == {"pos_embed", "cls_token", "reg_token", "mask_token"}
    assert all(name in params for name in encoder.no_weight_decay())


def test_init_matches_dino_convention():
    torch.manual_seed(0)
    encoder = build_encoder("small", depth=1)
    assert torch.count_nonzero(encoder.mask_token) == 0
    qkv = encoder.blocks[0].attn.qkv
    assert torch.count_nonzero(qkv.bias) == 0
    assert abs(qkv.weight.std().item() - 0.02) < 0.001
    assert torch.equal(encoder.norm.weight, torch.ones(384))


def test_build_encoder_rejects_unknown_name_listing_valid_names():
    with pytest.raises(ConfigError) as error:
        build_encoder("vit_gigantic")
    message = str(error.value)
    assert "vit_gigantic" in message
    for name in ENCODER_SIZES:
        assert name in message


def test_build_encoder_overrides_size_values():
    encoder = build_encoder("vit_base", depth=1, embed_dim=32, num_heads=4, patch_size=8, img_size=64,
                            num_register_tokens=3)
    assert (encoder.embed_dim, encoder.depth, encoder.num_heads, encoder.patch_size) == (32, 1, 4, 8)
    assert encoder.pos_embed.shape == (1, 64, 32)
    assert encoder.reg_token.shape == (1, 3, 32)


def test_a_model_config_built_by_hand_is_checked_as_a_recipe_is():
    """build_encoder_from_config({'patch_size': '16'}) ended in "'<' not supported between str and int"."""
    from wildssl.models.loading import build_encoder_from_config

    assert build_encoder_from_config({"name": "tiny", "patch_size": "8", "img_size": 32}).patch_size == 8
    with pytest.raises(ConfigError, match=r'model.patch_size="x" is invalid: model.patch_size must be an integer'):
        build_encoder_from_config({"name": "tiny", "patch_size": "x"})
    with pytest.raises(ConfigError, match=r"model.depth=0 is invalid"):
        build_encoder_from_config({"name": "tiny", "depth": 0})


def test_build_encoder_rejects_width_not_divisible_by_heads():
    with pytest.raises(ConfigError, match="divisible"):
        build_encoder("tiny", embed_dim=100, num_heads=3, depth=1)


@pytest.mark.parametrize("name,width,depth,heads,billions", [
    ("2b", 2560, 24, 32, 1.89),
    ("6.5b", 4096, 32, 32, 6.45),
])
def test_large_configs_have_right_shape_on_meta_device(name, width, depth, heads, billions):
    with torch.device("meta"):
        encoder = build_encoder(name, patch_size=14)
    assert (encoder.embed_dim, encoder.depth, encoder.num_heads) == (width, depth, heads)
    assert len(encoder.blocks) == depth
    assert encoder.blocks[-1].attn.qkv.weight.shape == (3 * width, width)
    assert encoder.blocks[0].mlp.fc1.weight.shape == (4 * width, width)
    assert encoder.pos_embed.is_meta
    assert sum(p.numel() for p in encoder.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_last_block_attention_is_the_explicit_softmax_of_the_last_block_and_forward_is_unchanged():
    torch.manual_seed(0)
    vit = build_encoder("tiny", depth=2, embed_dim=16, num_heads=2, patch_size=4, img_size=8,
                        num_register_tokens=1).double().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = vit(images)["tokens"]
    attention = vit.last_block_attention(images)
    assert attention.shape == (2, 2, 1 + 1 + 4, 6)
    tokens = vit.blocks[0](vit.prepare_tokens(images))
    last = vit.blocks[1]
    x = last.norm1(tokens).double()
    q, k, v = (x @ last.attn.qkv.weight.double().T + last.attn.qkv.bias.double()).chunk(3, dim=-1)
    for head in range(2):
        part = slice(8 * head, 8 * (head + 1))
        expected = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / 8 ** 0.5, dim=-1)
        torch.testing.assert_close(attention[:, head].double(), expected, atol=1e-6, rtol=1e-5)
    # the weights reproduce the block's own attention output: proj(merge(weights @ v))
    merged = torch.cat([attention[:, h].double() @ v[..., 8 * h: 8 * (h + 1)] for h in range(2)], dim=-1)
    torch.testing.assert_close(last.attn.proj(merged), last.attn(last.norm1(tokens)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(vit(images)["tokens"], before, atol=0, rtol=0)


def test_encoder_without_class_token_reports_mean_patch_as_cls():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_register_tokens=2,
                            class_token=False).eval()
    assert vit.cls_token is None and vit.num_prefix_tokens == 2
    out = vit(torch.randn(3, 3, 8, 8))
    assert out["tokens"].shape == (3, 2 + 4, 16) and out["registers"].shape == (3, 2, 16)
    torch.testing.assert_close(out["cls"], out["patch"].mean(dim=1))
    torch.testing.assert_close(out["patch"], out["tokens"][:, 2:])


# The MAWS seed's encoders (Singh et al. 2023, Table 1): name, patch, MLP width, parameters in billions.
SEED_SIZES = [("base", 16, 3072, 0.086), ("large", 16, 4096, 0.304), ("huge", 14, 5120, 0.632),
              ("2b", 14, 10240, 1.89), ("6.5b", 14, 16384, 6.44)]


@pytest.mark.parametrize("name,patch,mlp,billions", SEED_SIZES)
def test_seed_model_sizes_build_on_the_meta_device_with_the_seeds_parameter_counts(name, patch, mlp, billions):
    with torch.device("meta"):
        encoder = build_encoder(name, patch_size=patch)
    assert all(p.is_meta for p in encoder.parameters())  # no memory until sharded or materialized
    assert encoder.blocks[0].mlp.fc1.weight.shape == (mlp, encoder.embed_dim)
    assert encoder.patch_size == patch
    assert sum(p.numel() for p in encoder.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)


def test_images_the_encoder_cannot_read_are_one_line_naming_the_shape_or_type_it_takes():
    """A 1-channel batch ended in the convolution's "weight of size [D, 3, p, p] ... 1 channels", uint8 pixels in
    "Input type (unsigned char) and bias type (float) should be the same"."""
    encoder = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ConfigError, match=r"takes images of shape \(B, 3, H, W\); got shape \(2, 1, 16, 16\)"):
        encoder.forward_features(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ConfigError, match=r"takes images of shape \(B, 3, H, W\); got shape \(3, 16, 16\)"):
        encoder.forward_features(torch.zeros(3, 16, 16))
    with pytest.raises(ConfigError, match="takes float images .* got torch.uint8; .*preprocess_images"):
        encoder.forward_features(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert encoder.forward_features(torch.zeros(2, 3, 16, 16)).shape == (2, 17, 32)
