"""fusionlib.layers and fusionlib.embeddings: against PyTorch's own layers, masks, shapes (chapter 3)."""

import pytest
import torch
from torch import nn

from fusionlib.attention import MultiHeadAttention
from fusionlib.embeddings import RegionEmbeddings, TextEmbeddings
from fusionlib.layers import (
    CrossAttentionLayer,
    CrossAttentionWeights,
    TransformerLayer,
    masked_max,
    masked_mean,
)

ATOL = 1e-5


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lengths_mask(lengths, max_len):
    return torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]


def copy_attention(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        ours.load_state_dict(MultiHeadAttention.from_torch(theirs).state_dict())


def copy_ffn_and_norms(ours, theirs, residuals):
    with torch.no_grad():
        ours.ffn.linear1.load_state_dict(theirs.linear1.state_dict())
        ours.ffn.linear2.load_state_dict(theirs.linear2.state_dict())
        for mine, norm in zip(
            residuals, [theirs.norm1, theirs.norm2, getattr(theirs, "norm3", None)]
        ):
            mine.norm.load_state_dict(norm.state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_layer_matches_torch_encoder_layer(norm_first):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(
        32,
        4,
        dim_feedforward=48,
        dropout=0.1,
        activation="gelu",
        batch_first=True,
        norm_first=norm_first,
        layer_norm_eps=1e-12,
    ).eval()
    ours = TransformerLayer(32, 4, ffn_size=48, norm_first=norm_first).eval()
    copy_attention(ours.attention, ref.self_attn)
    copy_ffn_and_norms(ours, ref, [ours.attention_residual, ours.ffn_residual])
    x, mask = randn(3, 7, 32), lengths_mask([7, 4, 1], 7)
    expected = ref(x, src_key_padding_mask=~mask)  # torch: True = padded
    out, weights = ours(x, mask)
    assert weights is None
    real = mask.unsqueeze(-1).expand_as(out)
    torch.testing.assert_close(out[real], expected[real], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("norm_first", [False, True])
def test_cross_attention_layer_matches_torch_decoder_layer(norm_first):
    torch.manual_seed(0)
    ref = nn.TransformerDecoderLayer(
        32,
        4,
        dim_feedforward=48,
        dropout=0.1,
        activation="gelu",
        batch_first=True,
        norm_first=norm_first,
        layer_norm_eps=1e-12,
    ).eval()
    ours = CrossAttentionLayer(32, 4, ffn_size=48, norm_first=norm_first).eval()
    copy_attention(ours.self_attention, ref.self_attn)
    copy_attention(ours.cross_attention, ref.multihead_attn)
    copy_ffn_and_norms(ours, ref, [ours.self_residual, ours.cross_residual, ours.ffn_residual])
    x, x_mask = randn(3, 6, 32, seed=1), lengths_mask([6, 3, 2], 6)
    regions, region_mask = randn(3, 5, 32, seed=2), lengths_mask([5, 5, 2], 5)
    expected = ref(x, regions, tgt_key_padding_mask=~x_mask, memory_key_padding_mask=~region_mask)
    out, _ = ours(x, regions, x_mask, region_mask)
    real = x_mask.unsqueeze(-1).expand_as(out)
    torch.testing.assert_close(out[real], expected[real], atol=ATOL, rtol=ATOL)


def test_transformer_layer_padding_does_not_leak():
    layer = TransformerLayer(16, 2, dropout=0.0).eval()
    x, mask = randn(2, 6, 16), lengths_mask([6, 3], 6)
    out, weights = layer(x, mask, need_weights=True)
    noisy = x.clone()
    noisy[1, 3:] = 1e3 * randn(3, 16, seed=5)  # change only padded positions
    out2, _ = layer(noisy, mask)
    torch.testing.assert_close(out2[mask], out[mask], atol=ATOL, rtol=ATOL)
    assert weights.shape == (2, 2, 6, 6)
    assert torch.all(weights[1, :, :, 3:] == 0)  # nobody attends to padding
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 6))


def test_cross_attention_layer_context_padding_and_empty_context():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(16, 4, dropout=0.0, context_dim=10).eval()
    x, x_mask = randn(3, 5, 16), lengths_mask([5, 2, 4], 5)
    ctx, ctx_mask = (
        randn(3, 7, 10, seed=1),
        lengths_mask([7, 3, 0], 7),
    )  # sample 2 has no regions at all
    out, w = layer(x, ctx, x_mask, ctx_mask, need_weights=True)
    assert isinstance(w, CrossAttentionWeights)
    assert w.cross.shape == (3, 4, 5, 7) and w.self_attn.shape == (3, 4, 5, 5)
    assert torch.isfinite(out).all()
    assert torch.all(w.cross[1, :, :, 3:] == 0) and torch.all(w.cross[2] == 0)
    noisy = ctx.clone()
    noisy[1, 3:] = 1e3
    noisy[2] = -1e3
    out2, _ = layer(x, noisy, x_mask, ctx_mask)
    torch.testing.assert_close(out2[x_mask], out[x_mask], atol=ATOL, rtol=ATOL)

    # Gradients through a fully padded context are finite too (no NaN from an empty softmax).
    xg = x.clone().requires_grad_(True)
    layer.train()
    out3, _ = layer(xg, ctx, x_mask, ctx_mask)
    out3.sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_cross_attention_layer_without_self_attention():
    layer = CrossAttentionLayer(8, 2, self_attention=False, dropout=0.0).eval()
    assert layer.self_attention is None
    x, ctx = randn(2, 3, 8), randn(2, 4, 8, seed=1)
    out, w = layer(x, ctx, need_weights=True)
    assert out.shape == (2, 3, 8) and w.self_attn is None and w.cross.shape == (2, 2, 3, 4)
    # Without self-attention each query is processed on its own: permuting queries permutes outputs.
    perm = torch.tensor([2, 0, 1])
    out_p, _ = layer(x[:, perm], ctx)
    torch.testing.assert_close(out_p, out[:, perm], atol=ATOL, rtol=ATOL)


def test_layer_errors_name_the_argument():
    layer = TransformerLayer(8, 2)
    with pytest.raises(ValueError, match="mask"):
        layer(randn(2, 3, 8), torch.ones(2, 3))  # not bool
    with pytest.raises(ValueError, match="x must have shape"):
        layer(randn(2, 3, 9))
    with pytest.raises(ValueError, match="num_heads"):
        TransformerLayer(10, 3)
    cross = CrossAttentionLayer(8, 2, context_dim=4)
    with pytest.raises(ValueError, match="context"):
        cross(randn(2, 3, 8), randn(2, 5, 8))
    with pytest.raises(ValueError, match="context_mask"):
        cross(randn(2, 3, 8), randn(2, 5, 4), context_mask=torch.ones(2, 4, dtype=torch.bool))


def test_masked_poolings():
    x = torch.tensor(
        [[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [float("inf"), 0.0], [0.0, 0.0]]]
    )
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(masked_max(x, mask), torch.tensor([[3.0, 4.0], [0.0, 0.0]]))


def test_text_embeddings_is_bert_sum_and_checks_input():
    torch.manual_seed(0)
    emb = TextEmbeddings(20, 8, max_position=6, dropout=0.0)
    ids = torch.tensor([[1, 5, 7, 0], [2, 3, 0, 0]])
    types = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    expected = emb.norm(
        emb.word_embeddings(ids)
        + emb.position_embeddings(torch.arange(4))
        + emb.token_type_embeddings(types)
    )
    torch.testing.assert_close(emb(ids, types), expected)
    assert torch.all(emb.word_embeddings.weight[0] == 0)  # [PAD] starts at zero
    with pytest.raises(ValueError, match="max_position"):
        emb(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        emb(torch.tensor([[1, 20]]))
    with pytest.raises(ValueError, match="input_ids"):
        emb(torch.zeros(1, 3))


def test_text_embeddings_without_positions_are_word_plus_type():
    torch.manual_seed(0)
    emb = TextEmbeddings(20, 8, max_position=6, dropout=0.0, positions=False)
    ids = torch.tensor([[1, 5, 7, 0]])
    expected = emb.norm(emb.word_embeddings(ids) + emb.token_type_embeddings(torch.zeros_like(ids)))
    torch.testing.assert_close(emb(ids), expected)
    assert emb.position_embeddings is None
    with pytest.raises(ValueError, match="no positions"):
        emb(ids, position_ids=torch.arange(4))
    with pytest.raises(ValueError, match="positions must be a bool"):
        TextEmbeddings(20, 8, positions=0)


def test_region_embeddings_use_location_on_equal_footing():
    torch.manual_seed(0)
    emb = RegionEmbeddings(feature_dim=64, hidden_size=16, dropout=0.0)
    feats = 3 * randn(2, 4, 64)
    loc = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(1))
    out = emb(feats, loc)
    expected = emb.norm(emb.feature_proj(feats) + emb.location_proj(loc))
    torch.testing.assert_close(out, expected)
    # Moving a box changes its embedding substantially even next to large features.
    moved = loc.clone()
    moved[:, :, [0, 2]] += 0.5
    assert (emb(feats, moved) - out).norm(dim=-1).min() > 0.1
    mlp = RegionEmbeddings(64, 16, location_layers=2)
    assert mlp(feats, loc).shape == (2, 4, 16)
    with pytest.raises(ValueError, match="region_loc"):
        emb(feats, loc[..., :4])
    with pytest.raises(ValueError, match="region_feats"):
        emb(feats[..., :10], loc)
    with pytest.raises(ValueError, match="location_layers"):
        RegionEmbeddings(64, 16, location_layers=3)
