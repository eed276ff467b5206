"""Checks for chapter 1's exercises (attention)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from fusionlib.attention import causal_mask
from fusionlib.exercises import call_student, expect_tensor, fail, passed


def _cases():
    g = torch.Generator().manual_seed(1234)
    for batch, L, S, E in [((2,), 3, 5, 8), ((2, 4), 6, 6, 16), ((1,), 1, 7, 4)]:
        q = torch.randn(*batch, L, E, generator=g)
        k = torch.randn(*batch, S, E, generator=g)
        mask = torch.rand(*batch, L, S, generator=g) > 0.4
        mask[..., 0] = True
        yield q, k, mask


def check_attention_weights(fn: Callable) -> None:
    """Exercise 1: ``fn(q (..., L, E), k (..., S, E), mask (..., L, S) bool) -> weights (..., L, S)``."""
    for q, k, mask in _cases():
        got = expect_tensor("the weights", call_student(fn, q, k, mask), tuple(mask.shape))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        want = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        if (got[~mask].abs() > 1e-6).any():
            fail(
                "masked positions (mask == False) still get weight: fill their scores with -inf before the softmax"
            )
        if not torch.allclose(got.sum(-1), torch.ones(got.shape[:-1]), atol=1e-5):
            fail("rows do not sum to 1: take the softmax over the last dimension (the keys)")
        unscaled = torch.softmax(
            (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")), dim=-1
        )
        if torch.allclose(got, unscaled, atol=1e-5) and not torch.allclose(got, want, atol=1e-5):
            fail("you forgot to divide the scores by sqrt(d_k)")
        if not torch.allclose(got, want, atol=1e-5):
            fail(
                f"weights differ from softmax(QK^T/sqrt(d_k)) by up to {(got - want).abs().max():.3g}"
            )
    passed("your weights match softmax(QKᵀ/√d_k) with the mask, on 3 shapes")


def check_causal_mask(fn: Callable) -> None:
    """Exercise 2: ``fn(L) -> (L, L) bool``, True where query i may attend to key j (j <= i)."""
    for L in (1, 2, 5, 9):
        got = call_student(fn, L)
        expect_tensor("the mask", got, (L, L))
        if got.dtype != torch.bool:
            fail(f"the mask should be bool (True = may attend), got dtype {got.dtype}")
        want = causal_mask(L)
        if torch.equal(got, want):
            continue
        if torch.equal(got, ~want):
            fail(
                "your mask is inverted: in fusionlib and F.scaled_dot_product_attention True means *allowed*"
            )
        if torch.equal(got, want.T):
            fail(
                "your mask lets each position see the future and not the past: use the lower triangle (tril)"
            )
        fail(f"for L={L} expected\n{want.int()}\ngot\n{got.int()}")
    passed("your causal mask is the lower triangle, True = allowed")


def check_split_merge_heads(split: Callable, merge: Callable) -> None:
    """Exercise 3: ``split(x (B, N, E), H) -> (B, H, N, E/H)`` and ``merge`` its inverse."""
    g = torch.Generator().manual_seed(0)
    for B, N, E, H in [(2, 5, 12, 3), (1, 7, 8, 8), (3, 1, 16, 4)]:
        x = torch.randn(B, N, E, generator=g)
        heads = expect_tensor("split(x, H)", call_student(split, x, H), (B, H, N, E // H))
        want = x.view(B, N, H, E // H).transpose(1, 2)
        if not torch.equal(heads, want):
            if torch.equal(heads, x.view(B, H, N, E // H)):
                fail(
                    "split reshapes (B, N, E) straight to (B, H, N, E/H): that mixes tokens between heads. "
                    "View as (B, N, H, E/H) first, then transpose(1, 2)"
                )
            fail("split(x, H)[:, h] should hold features h*E/H:(h+1)*E/H of every token")
        back = expect_tensor("merge(split(x, H))", call_student(merge, heads), (B, N, E))
        if not torch.equal(back, x):
            fail(
                "merge(split(x, H)) does not give x back: transpose(1, 2) then reshape to (B, N, E)"
            )
    passed("split and merge are inverses and keep each token's features together")


def check_score_variance(answer: Callable) -> None:
    """Exercise 4: ``answer(d_k) ->`` the variance of q·k for q, k with i.i.d. N(0, 1) entries."""
    for d in (1, 4, 64, 512):
        got = call_student(answer, d)
        try:
            got = float(got)
        except (TypeError, ValueError):
            fail(f"return a number, got {type(got).__name__}")
        if math.isclose(got, math.sqrt(d), rel_tol=1e-6) and d != 1:
            fail("that is the standard deviation; the variance is its square")
        if not math.isclose(got, d, rel_tol=1e-6):
            fail(
                f"for d_k={d}: each of the d_k products q_i k_i has variance 1, and they are independent"
            )
    g = torch.Generator().manual_seed(0)
    measured = (
        (torch.randn(20000, 64, generator=g) * torch.randn(20000, 64, generator=g))
        .sum(-1)
        .var()
        .item()
    )
    passed(f"Var(q·k) = d_k (measured at d_k=64: {measured:.1f})")


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """PyTorch's fused attention, for comparisons in the chapter."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
