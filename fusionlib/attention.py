"""Scaled dot-product attention, from scratch, and multi-head attention (chapter 1).

Mask convention, used everywhere in fusionlib
----------------------------------------------
A **boolean mask is True where attention is allowed**, exactly as
:func:`torch.nn.functional.scaled_dot_product_attention` reads it. A
**float mask is added to the scores** (``0`` keeps, ``-inf`` removes).
Padding masks in batch dicts (``attention_mask``, ``region_mask``) are
boolean and True at real positions, so they broadcast straight into
``attn_mask`` as ``mask[:, None, None, :]``.

Beware: :class:`torch.nn.MultiheadAttention` reads booleans the other way
round (True = *not* allowed) for both ``attn_mask`` and ``key_padding_mask``.
Convert at that edge (:func:`from_torch_mask`).

A query row whose keys are all masked has nothing to attend to. A plain
softmax over a row of ``-inf`` is ``0/0 = NaN`` and the NaN spreads through
the whole batch in the backward pass (pytorch#41508). Here such a row gives
zero weights and zero output, and zero gradient, as PyTorch's own SDPA has
done since 2.5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "scaled_dot_product_attention",
    "MultiHeadAttention",
    "causal_mask",
    "padding_mask",
    "from_torch_mask",
]


def _check_attention_inputs(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float
) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., seq, dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise ValueError(f"{name} dtype must match query dtype {query.dtype}, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(
                f"{name} device must match query device {query.device}, got {t.device}"
            )
    batch = tuple(query.shape[:-2])
    if tuple(key.shape[:-2]) != batch:
        raise ValueError(
            f"key must have shape ({', '.join(map(str, batch))}, S, {query.shape[-1]}) "
            f"to match query {tuple(query.shape)}, got {tuple(key.shape)}"
        )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"key's last dim must equal query's ({query.shape[-1]}), got key shape {tuple(key.shape)}"
        )
    if tuple(value.shape[:-2]) != batch or value.shape[-2] != key.shape[-2]:
        expected = (*batch, key.shape[-2], "Ev")
        raise ValueError(
            f"value must have shape {expected} to match query/key, got {tuple(value.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(
                f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}"
            )
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise ValueError(
                f"attn_mask must be bool or the query dtype {query.dtype}, got {attn_mask.dtype}"
            )
        if attn_mask.device != query.device:
            raise ValueError(
                f"attn_mask device must match query device {query.device}, got {attn_mask.device}"
            )
        target = (*batch, query.shape[-2], key.shape[-2])
        try:
            broadcast = torch.broadcast_shapes(tuple(attn_mask.shape), target)
        except RuntimeError:
            broadcast = None
        if broadcast != target:
            raise ValueError(
                f"attn_mask must broadcast to (..., L, S) = {target}, got {tuple(attn_mask.shape)}"
            )


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Attention written out: :math:`\mathrm{softmax}(QK^\top/\sqrt{d_k} + M)\,V` (chapter 1).

    Same shapes, broadcasting and masks as
    :func:`torch.nn.functional.scaled_dot_product_attention`, but it also
    returns the attention weights, which is what the book plots.

    Args:
        query: ``(..., L, E)``.
        key: ``(..., S, E)``, same leading dims as ``query``.
        value: ``(..., S, Ev)``.
        attn_mask: bool (True = may attend) or float (added to the scores),
            broadcastable to ``(..., L, S)``.
        dropout_p: dropout on the weights (applied only to the output, the
            returned weights are the attention distribution before dropout).
        is_causal: also forbid attending to later keys (upper triangle).
        scale: defaults to ``1/sqrt(E)``.

    Returns:
        ``(output (..., L, Ev), weights (..., L, S))``. Rows with no allowed
        key give zero output and zero weights.
    """
    _check_attention_inputs(query, key, value, attn_mask, dropout_p)
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale

    scores = (query @ key.transpose(-2, -1)) * scale  # (..., L, S)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(L, S, device=query.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask

    # A row of -inf only would softmax to NaN; give it finite scores, then zero it.
    empty_row = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (..., L, 1)
    scores = scores.masked_fill(empty_row, 0.0)
    weights = torch.softmax(scores, dim=-1).masked_fill(empty_row, 0.0)

    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    return dropped @ value, weights


def causal_mask(L: int, S: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """``(L, S)`` bool, True on and below the diagonal: query i may attend to keys 0..i."""
    S = L if S is None else S
    if L <= 0 or S <= 0:
        raise ValueError(f"L and S must be positive, got L={L}, S={S}")
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


def padding_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """``lengths (B,)`` -> ``(B, max_len)`` bool, True at real positions."""
    if lengths.dim() != 1:
        raise ValueError(f"lengths must have shape (batch,), got {tuple(lengths.shape)}")
    max_len = int(lengths.max()) if max_len is None else max_len
    if (lengths < 0).any() or (lengths > max_len).any():
        raise ValueError(f"lengths must be in [0, max_len={max_len}], got {lengths.tolist()}")
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def from_torch_mask(mask: Tensor) -> Tensor:
    """Turn a :class:`nn.MultiheadAttention` boolean mask (True = blocked) into ours (True = allowed)."""
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool to convert, got {mask.dtype}; float masks mean the same in both"
        )
    return ~mask


class MultiHeadAttention(nn.Module):
    """Batch-first multi-head attention: self-attention, or cross-attention (chapters 1 and 3).

    ``forward(query)`` is self-attention; ``forward(query, key, value)`` is
    cross-attention, where text queries attend over image regions of another
    length and width (``kdim``, ``vdim``).

    When ``kdim == vdim == embed_dim`` the three input projections are stored
    stacked as ``in_proj_weight (3E, E)``, the same layout as
    :class:`torch.nn.MultiheadAttention`, so one matrix product projects all
    three for self-attention. Otherwise ``q_proj_weight``, ``k_proj_weight``
    and ``v_proj_weight`` are separate.

    Shapes:
        query ``(B, L, E)``, key ``(B, S, kdim)``, value ``(B, S, vdim)``;
        ``key_mask (B, S)`` bool, True at real keys;
        ``attn_mask`` bool/float broadcastable to ``(B, H, L, S)``.
        Returns ``(output (B, L, E), weights (B, H, L, S) or None)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
    ):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be positive, got {embed_dim}, {num_heads}"
            )
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.dropout = dropout
        self.packed = self.kdim == embed_dim and self.vdim == embed_dim
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same initialisation as nn.MultiheadAttention.
        if self.packed:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _projections(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E : 2 * E], b[2 * E :])
        if self.packed:
            if self_attention:
                return F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
            w = self.in_proj_weight
            wq, wk, wv = w[:E], w[E : 2 * E], w[2 * E :]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape  # (B, N, E)
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
        average_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        self_attention = key is None and value is None
        if self_attention:
            key = value = query
        elif key is None or value is None:
            raise ValueError(
                "pass both key and value for cross-attention, or neither for self-attention"
            )
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query must have shape (batch, L, {self.embed_dim}), got {tuple(query.shape)}"
            )
        B, L, _ = query.shape
        if key.dim() != 3 or key.shape[0] != B or key.shape[-1] != self.kdim:
            raise ValueError(f"key must have shape ({B}, S, {self.kdim}), got {tuple(key.shape)}")
        S = key.shape[1]
        if value.dim() != 3 or tuple(value.shape[:2]) != (B, S) or value.shape[-1] != self.vdim:
            raise ValueError(
                f"value must have shape ({B}, {S}, {self.vdim}), got {tuple(value.shape)}"
            )

        mask = self._combine_masks(key_mask, attn_mask, B, L, S, query)
        q, k, v = (
            self._split_heads(t) for t in self._projections(query, key, value, self_attention)
        )
        p = self.dropout if self.training else 0.0

        if need_weights:
            out, weights = scaled_dot_product_attention(
                q, k, v, mask, dropout_p=p, is_causal=is_causal
            )
        else:
            # The fused kernel (flash / memory-efficient / math, picked by PyTorch).
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal
            )
            weights = None
        out = out.transpose(1, 2).reshape(B, L, self.embed_dim)  # merge heads: (B, L, E)
        if weights is not None and average_weights:
            weights = weights.mean(dim=1)  # (B, L, S)
        return self.out_proj(out), weights

    @staticmethod
    def _combine_masks(
        key_mask: Tensor | None, attn_mask: Tensor | None, B: int, L: int, S: int, query: Tensor
    ) -> Tensor | None:
        if key_mask is not None:
            if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, S):
                raise ValueError(
                    f"key_mask must be bool of shape ({B}, {S}) with True at real keys, "
                    f"got {key_mask.dtype} {tuple(key_mask.shape)}"
                )
            key_mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
        if attn_mask is None:
            return key_mask
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise ValueError(f"attn_mask must be bool or {query.dtype}, got {attn_mask.dtype}")
        if attn_mask.dim() == 3:  # (B, L, S): one mask per sample
            attn_mask = attn_mask[:, None]
        try:
            ok = torch.broadcast_shapes(tuple(attn_mask.shape), (B, 1, L, S))[-2:] == (L, S)
        except RuntimeError:
            ok = False
        if not ok or attn_mask.dim() > 4:
            raise ValueError(
                f"attn_mask must broadcast to (B, H, L, S) = ({B}, H, {L}, {S}), "
                f"got {tuple(attn_mask.shape)}"
            )
        if key_mask is None:
            return attn_mask
        if attn_mask.dtype == torch.bool:
            return attn_mask & key_mask
        return attn_mask.masked_fill(~key_mask, float("-inf"))

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiHeadAttention":
        """A copy of a ``batch_first`` :class:`nn.MultiheadAttention` with identical weights."""
        if not mha.batch_first:
            raise ValueError(
                "from_torch expects nn.MultiheadAttention(batch_first=True); "
                "batch_first=False reads (seq, batch, dim)"
            )
        ours = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            kdim=mha.kdim,
            vdim=mha.vdim,
        )
        with torch.no_grad():
            if ours.packed:
                ours.in_proj_weight.copy_(mha.in_proj_weight)
            else:
                ours.q_proj_weight.copy_(mha.q_proj_weight)
                ours.k_proj_weight.copy_(mha.k_proj_weight)
                ours.v_proj_weight.copy_(mha.v_proj_weight)
            if ours.in_proj_bias is not None:
                ours.in_proj_bias.copy_(mha.in_proj_bias)
            ours.out_proj.load_state_dict(mha.out_proj.state_dict())
        return ours.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, "
            f"vdim={self.vdim}, dropout={self.dropout}"
        )
