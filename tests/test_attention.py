"""fusionlib.attention against PyTorch's own attention (chapter 1)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusionlib.attention import (
    MultiHeadAttention,
    causal_mask,
    from_torch_mask,
    padding_mask,
    scaled_dot_product_attention,
)

ATOL = 1e-5


def make_qkv(batch, L, S, E, Ev, seed=0, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, L, E, generator=g, dtype=dtype)
    k = torch.randn(*batch, S, E, generator=g, dtype=dtype)
    v = torch.randn(*batch, S, Ev, generator=g, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


SHAPES = [
    ((), 1, 1, 4, 4),
    ((3,), 5, 7, 8, 3),
    ((2, 4), 6, 6, 16, 16),
    ((2, 3), 9, 2, 5, 11),
    ((1,), 33, 17, 32, 8),
]


@pytest.mark.parametrize("batch,L,S,E,Ev", SHAPES)
@pytest.mark.parametrize(
    "mask_kind", ["none", "bool", "float", "bool_broadcast", "float_broadcast"]
)
def test_sdpa_matches_torch(batch, L, S, E, Ev, mask_kind):
    q, k, v = make_qkv(batch, L, S, E, Ev)
    g = torch.Generator().manual_seed(1)
    if mask_kind == "none":
        mask = None
    elif mask_kind.startswith("bool"):
        shape = (L, S) if "broadcast" in mask_kind else (*batch, L, S)
        mask = torch.rand(shape, generator=g) > 0.3
    else:
        shape = (1, S) if "broadcast" in mask_kind else (*batch, L, S)
        mask = torch.randn(shape, generator=g)
    out, weights = scaled_dot_product_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert weights.shape == (*batch, L, S)
    row_sums = weights.sum(-1)
    assert torch.all(((row_sums - 1).abs() < 1e-5) | (row_sums == 0))


@pytest.mark.parametrize("L,S", [(5, 5), (4, 7), (7, 4)])
def test_causal_matches_torch(L, S):
    q, k, v = make_qkv((2, 3), L, S, 8, 8)
    out, _ = scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    out2, _ = scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(L, S))
    torch.testing.assert_close(out2, ref, atol=ATOL, rtol=0)


def test_scale_matches_torch():
    q, k, v = make_qkv((2,), 4, 6, 8, 8)
    out, _ = scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_are_zero_and_have_finite_gradients(kind):
    q, k, v = make_qkv((2,), 4, 5, 8, 8, requires_grad=True)
    allowed = torch.ones(2, 4, 5, dtype=torch.bool)
    allowed[0, 1] = False  # one query row with no key at all
    allowed[1] = False  # a whole sample with nothing to attend
    mask = allowed if kind == "bool" else torch.zeros(2, 4, 5).masked_fill(~allowed, float("-inf"))
    out, weights = scaled_dot_product_attention(q, k, v, mask)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    assert torch.all(out[0, 1] == 0) and torch.all(out[1] == 0)
    assert torch.all(weights[0, 1] == 0) and torch.all(weights[1] == 0)
    (out.square().sum() + weights.sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[1] == 0)
    # The rows that had keys still match PyTorch.
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_dropout_keeps_weights_and_changes_output():
    q, k, v = make_qkv((2,), 4, 5, 8, 8)
    torch.manual_seed(0)
    out, weights = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    ref, ref_weights = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(weights, ref_weights)
    assert not torch.allclose(out, ref)


def test_gradcheck_double():
    q, k, v = make_qkv((2,), 3, 4, 5, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True]] * 3)
    mask_full = mask.clone()
    mask_full[1] = False
    for m in (None, mask, mask_full):
        assert torch.autograd.gradcheck(
            lambda a, b, c: scaled_dot_product_attention(a, b, c, m)[0], (q, k, v)
        )


BAD_INPUTS = [
    (dict(q=(2, 4, 8), k=(3, 5, 8), v=(3, 5, 8)), "key must have shape"),
    (dict(q=(2, 4, 8), k=(2, 5, 7), v=(2, 5, 8)), "key's last dim"),
    (dict(q=(2, 4, 8), k=(2, 5, 8), v=(2, 6, 8)), "value must have shape"),
    (dict(q=(8,), k=(2, 5, 8), v=(2, 5, 8)), "query must have shape"),
]


@pytest.mark.parametrize("shapes,message", BAD_INPUTS)
def test_bad_shapes_raise(shapes, message):
    with pytest.raises(ValueError, match=message):
        scaled_dot_product_attention(
            torch.randn(shapes["q"]), torch.randn(shapes["k"]), torch.randn(shapes["v"])
        )


def test_bad_dtypes_devices_and_masks_raise():
    q, k, v = make_qkv((2,), 4, 5, 8, 8)
    with pytest.raises(ValueError, match="key dtype"):
        scaled_dot_product_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="query must be floating point"):
        scaled_dot_product_attention(q.long(), k, v)
    with pytest.raises(
        ValueError,
        match=r"attn_mask must broadcast to \(\.\.\., L, S\) = \(2, 4, 5\), got \(4, 4\)",
    ):
        scaled_dot_product_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be bool or the query dtype"):
        scaled_dot_product_attention(q, k, v, torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="key device"):
        scaled_dot_product_attention(q, k.to("meta"), v)


# ---------------------------------------------------------------- MultiHeadAttention


def torch_and_ours(E, H, kdim=None, vdim=None, bias=True, seed=0):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=vdim, bias=bias).eval()
    return ref, MultiHeadAttention.from_torch(ref).eval()


@pytest.mark.parametrize("B,L,E,H", [(1, 1, 8, 1), (2, 5, 16, 4), (3, 12, 32, 8), (2, 7, 24, 3)])
@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_matches_nn_multihead(B, L, E, H, need_weights):
    ref, ours = torch_and_ours(E, H)
    x = torch.randn(B, L, E)
    lengths = torch.randint(1, L + 1, (B,))
    key_mask = padding_mask(lengths, L)
    out, w = ours(x, key_mask=key_mask, need_weights=need_weights, average_weights=True)
    ref_out, ref_w = ref(x, x, x, key_padding_mask=from_torch_mask(key_mask), need_weights=True)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    if need_weights:
        torch.testing.assert_close(w, ref_w, atol=ATOL, rtol=0)
    else:
        assert w is None


@pytest.mark.parametrize("L,S,kdim,vdim", [(4, 9, None, None), (6, 3, 12, 20), (1, 5, 7, 7)])
def test_cross_attention_matches_nn_multihead(L, S, kdim, vdim):
    E, H, B = 16, 4, 3
    ref, ours = torch_and_ours(E, H, kdim=kdim, vdim=vdim)
    text = torch.randn(B, L, E)
    regions_k = torch.randn(B, S, kdim or E)
    regions_v = torch.randn(B, S, vdim or E)
    region_mask = padding_mask(torch.tensor([S, max(1, S - 2), 1]), S)
    for need_weights in (False, True):
        out, _ = ours(text, regions_k, regions_v, key_mask=region_mask, need_weights=need_weights)
        ref_out, _ = ref(text, regions_k, regions_v, key_padding_mask=~region_mask)
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mask_kind", ["causal_bool", "float_2d", "bool_3d", "is_causal"])
def test_attn_masks_match_nn_multihead(mask_kind):
    B, L, E, H = 2, 6, 16, 4
    ref, ours = torch_and_ours(E, H)
    x = torch.randn(B, L, E)
    if mask_kind == "causal_bool" or mask_kind == "is_causal":
        ours_mask = causal_mask(L)
        ref_mask = from_torch_mask(ours_mask)
    elif mask_kind == "float_2d":
        ours_mask = ref_mask = torch.randn(L, L)
    else:
        ours_mask = torch.rand(B, L, L) > 0.3
        ours_mask[..., 0] = True
        ref_mask = from_torch_mask(ours_mask).repeat_interleave(H, dim=0)  # torch wants (B*H, L, S)
    for need_weights in (False, True):
        if mask_kind == "is_causal":
            out, _ = ours(x, is_causal=True, need_weights=need_weights)
        else:
            out, _ = ours(x, attn_mask=ours_mask, need_weights=need_weights)
        ref_out, _ = ref(x, x, x, attn_mask=ref_mask, need_weights=False)
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)


def test_no_bias_and_dropout_in_eval_match():
    ref, ours = torch_and_ours(16, 2, bias=False)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(ours(x)[0], ref(x, x, x)[0], atol=ATOL, rtol=0)


def test_mha_fully_padded_sample_has_no_nan_in_output_or_gradients():
    _, ours = torch_and_ours(16, 4)
    ours.train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    key_mask = torch.tensor([[True, True, False, False, False], [False] * 5])
    for need_weights in (False, True):
        x.grad = None
        out, _ = ours(x, key_mask=key_mask, need_weights=need_weights)
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_mha_weights_shape_and_rows():
    _, ours = torch_and_ours(16, 4)
    out, w = ours(
        torch.randn(2, 3, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16), need_weights=True
    )
    assert out.shape == (2, 3, 16) and w.shape == (2, 4, 3, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 3))


def test_mha_gradcheck():
    torch.manual_seed(0)
    ours = MultiHeadAttention(8, 2, kdim=6, vdim=5).double()
    q = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    km = torch.tensor([[True, True, True, False], [True, False, False, False]])
    for nw in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, c: ours(a, b, c, key_mask=km, need_weights=nw)[0], (q, k, v)
        )


def test_mha_bad_inputs_raise():
    ours = MultiHeadAttention(16, 4, kdim=8)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 3)
    with pytest.raises(
        ValueError, match=r"query must have shape \(batch, L, 16\), got \(2, 5, 12\)"
    ):
        ours(torch.randn(2, 5, 12), torch.randn(2, 3, 8), torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"key must have shape \(2, S, 8\), got \(3, 4, 8\)"):
        ours(x, torch.randn(3, 4, 8), torch.randn(3, 4, 16))
    with pytest.raises(ValueError, match=r"value must have shape \(2, 4, 16\)"):
        ours(x, torch.randn(2, 4, 8), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="pass both key and value"):
        ours(x, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"key_mask must be bool of shape \(2, 4\)"):
        ours(x, torch.randn(2, 4, 8), torch.randn(2, 4, 16), key_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        ours(
            x,
            torch.randn(2, 4, 8),
            torch.randn(2, 4, 16),
            attn_mask=torch.ones(5, 5, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="batch_first"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(16, 4))


def test_padding_mask_and_causal_mask():
    assert padding_mask(torch.tensor([2, 0, 3]), 4).tolist() == [
        [True, True, False, False],
        [False] * 4,
        [True, True, True, False],
    ]
    assert causal_mask(2, 3).tolist() == [[True, False, False], [True, True, False]]
    with pytest.raises(ValueError, match="lengths"):
        padding_mask(torch.tensor([5]), 3)


def test_batch_first_false_mixes_the_batch():
    """The seed document's bug, pinned down: batch-first tensors into a seq-first module."""
    torch.manual_seed(0)
    seq_first = nn.MultiheadAttention(8, 2)  # batch_first=False by default
    x = torch.randn(4, 3, 8)  # meant as (batch=4, seq=3, dim)
    out, _ = seq_first(x, x, x)
    x2 = x.clone()
    x2[1] += 1.0  # change sample 1 only
    out2, _ = seq_first(x2, x2, x2)
    changed = [(out[i] - out2[i]).abs().max().item() > 1e-6 for i in range(4)]
    assert sum(changed) > 1, "with batch_first=False, other samples change too"
    ours = MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, batch_first=True))
    o1, o2 = ours(x)[0], ours(x2)[0]
    assert [(o1[i] - o2[i]).abs().max().item() > 1e-6 for i in range(4)] == [
        False,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize("B,L,E,H", list(itertools.product([1, 4], [3, 16], [16, 48], [1, 4])))
def test_many_shapes_with_training_grads_match(B, L, E, H):
    ref, ours = torch_and_ours(E, H)
    x = torch.randn(B, L, E, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ours(x)[0].square().sum().backward()
    ref(x2, x2, x2, need_weights=False)[0].square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        ours.in_proj_weight.grad, ref.in_proj_weight.grad, atol=1e-4, rtol=1e-4
    )
