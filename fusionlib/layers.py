"""Transformer building blocks: self-attention layers and cross-attention layers (chapters 3, 5, 6).

Every layer here is made of the same three parts, and every attention in it
is :class:`fusionlib.attention.MultiHeadAttention` (chapter 1):

* a **sublayer** (self-attention, cross-attention or the feed-forward block);
* **dropout** on the sublayer's output;
* a **residual connection and LayerNorm**, placed either after the residual
  (``norm_first=False``, "post-LN", as in BERT, ViLBERT and UNITER) or before
  the sublayer (``norm_first=True``, "pre-LN", as in GPT-2 and most recent
  models). Post-LN is what the papers we reproduce used; pre-LN trains more
  stably without a warm-up, but a stack of pre-LN layers needs one final
  LayerNorm after its last layer (the models in :mod:`fusionlib.models` add it).

Layers:

:class:`TransformerLayer`
    one BERT layer: self-attention, then feed-forward. UNITER is a stack of
    these over ``[text; regions]``; ViLBERT's two streams are stacks of these.
:class:`CrossAttentionLayer`
    queries from one modality attend over keys/values from the other (chapter
    3): optional self-attention, cross-attention, feed-forward. With
    self-attention it is exactly :class:`torch.nn.TransformerDecoderLayer`
    without the causal mask (the tests check this).
:class:`CoAttentionLayer`
    ViLBERT's co-attentional layer, "co-TRM" (chapter 5): two streams of
    different widths exchange keys and values in a shared space, text queries
    over image regions and image queries over words, both at once.

Masks follow fusionlib's convention (see :mod:`fusionlib.attention`): a
boolean mask is True at real, attendable positions. Padded *queries* still
produce an output (it attends over the real keys like any other query); it is
garbage that the pooling in the models ignores. Only keys are masked.

Also here: :class:`FeedForward` and the masked poolings :func:`masked_mean`
and :func:`masked_max` that turn a padded sequence into one vector.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlib.attention import MultiHeadAttention, scaled_dot_product_attention

__all__ = [
    "FeedForward",
    "TransformerLayer",
    "CrossAttentionLayer",
    "CrossAttentionWeights",
    "CoAttentionLayer",
    "CoAttentionWeights",
    "masked_mean",
    "masked_max",
    "check_mask",
]

# BERT's LayerNorm epsilon; PyTorch's default (1e-5) works as well at our sizes.
LAYER_NORM_EPS = 1e-12

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu}


def _check_layer_args(
    hidden_size: int,
    num_heads: int,
    ffn_size: int | None,
    dropout: float,
    attention_dropout: float | None,
    activation: str,
) -> tuple[int, float]:
    if not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
    if not isinstance(num_heads, int) or num_heads <= 0 or hidden_size % num_heads:
        raise ValueError(
            f"num_heads must be a positive int dividing hidden_size={hidden_size}, got {num_heads!r}"
        )
    ffn_size = 4 * hidden_size if ffn_size is None else ffn_size
    if not isinstance(ffn_size, int) or ffn_size <= 0:
        raise ValueError(
            f"ffn_size must be a positive int or None (4 * hidden_size), got {ffn_size!r}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    attention_dropout = dropout if attention_dropout is None else attention_dropout
    if not 0.0 <= attention_dropout < 1.0:
        raise ValueError(f"attention_dropout must be in [0, 1), got {attention_dropout}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    return ffn_size, attention_dropout


def check_mask(name: str, mask: Tensor | None, batch: int, length: int) -> None:
    """Raise ``ValueError`` unless ``mask`` is None or bool of shape ``(batch, length)``."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"{name} must be bool of shape ({batch}, {length}) with True at real positions, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


def _check_sequence(name: str, x: Tensor, width: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != width:
        raise ValueError(f"{name} must have shape (batch, seq, {width}), got {tuple(x.shape)}")


class FeedForward(nn.Module):
    """The position-wise feed-forward block: ``Linear -> GELU -> Linear`` (chapter 3).

    ``(batch, seq, hidden) -> (batch, seq, hidden)``, applied to every position
    on its own. BERT calls the two halves "intermediate" and "output"; the
    inner width is ``4 * hidden`` by default. Dropout on the output is the
    layer's job (it comes before the residual), not this block's.
    """

    def __init__(self, hidden_size: int, ffn_size: int, activation: str = "gelu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        self.linear1 = nn.Linear(hidden_size, ffn_size)
        self.linear2 = nn.Linear(ffn_size, hidden_size)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(_ACTIVATIONS[self.activation](self.linear1(x)))


class _Residual(nn.Module):
    """Dropout, residual connection and LayerNorm around one sublayer, post-LN or pre-LN.

    post-LN (BERT): ``x = LayerNorm(x + dropout(sublayer(x)))``
    pre-LN:         ``x = x + dropout(sublayer(LayerNorm(x)))``
    """

    def __init__(self, hidden_size: int, dropout: float, norm_first: bool, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(
        self, x: Tensor, sublayer: Callable[[Tensor], tuple[Tensor, Tensor | None]]
    ) -> tuple[Tensor, Tensor | None]:
        if self.norm_first:
            out, weights = sublayer(self.norm(x))
            return x + self.dropout(out), weights
        out, weights = sublayer(x)
        return self.norm(x + self.dropout(out)), weights


class TransformerLayer(nn.Module):
    """One BERT-style encoder layer: self-attention, then feed-forward (chapters 3, 5, 6).

    ``forward(x (batch, seq, hidden), mask (batch, seq) bool)`` ->
    ``(x (batch, seq, hidden), weights (batch, heads, seq, seq) or None)``.

    ``mask`` is True at real tokens; padded positions are never attended to, so
    changing what sits at a padded position does not change the outputs at the
    real ones. ``attn_mask`` (bool/float, broadcastable to ``(B, H, L, L)``) adds
    any other pattern (causal, block-diagonal). ``need_weights=True`` returns
    the per-head attention weights for the book's attention-map plots (and
    uses the written-out attention, which is slower than the fused kernel).

    Post-LN by default, as in BERT; ``norm_first=True`` is pre-LN. With the
    same weights it computes exactly what ``torch.nn.TransformerEncoderLayer(
    batch_first=True, activation="gelu")`` computes (tested).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        ffn_size: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        norm_first: bool = False,
        activation: str = "gelu",
        layer_norm_eps: float = LAYER_NORM_EPS,
    ):
        super().__init__()
        ffn_size, attention_dropout = _check_layer_args(
            hidden_size, num_heads, ffn_size, dropout, attention_dropout, activation
        )
        self.hidden_size, self.num_heads, self.norm_first = hidden_size, num_heads, norm_first
        self.attention = MultiHeadAttention(hidden_size, num_heads, dropout=attention_dropout)
        self.attention_residual = _Residual(hidden_size, dropout, norm_first, layer_norm_eps)
        self.ffn = FeedForward(hidden_size, ffn_size, activation)
        self.ffn_residual = _Residual(hidden_size, dropout, norm_first, layer_norm_eps)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        _check_sequence("x", x, self.hidden_size)
        check_mask("mask", mask, x.shape[0], x.shape[1])
        x, weights = self.attention_residual(
            x,
            lambda h: self.attention(
                h, key_mask=mask, attn_mask=attn_mask, need_weights=need_weights
            ),
        )
        x, _ = self.ffn_residual(x, lambda h: (self.ffn(h), None))
        return x, weights


class CrossAttentionWeights(NamedTuple):
    """Attention weights of one :class:`CrossAttentionLayer`.

    ``cross``: ``(batch, heads, L, S)``, queries over the other modality.
    ``self_attn``: ``(batch, heads, L, L)``, or None when the layer has no self-attention.
    """

    cross: Tensor
    self_attn: Tensor | None


class CrossAttentionLayer(nn.Module):
    """Queries from one modality attend over the other's keys and values (chapter 3).

    ``forward(x (batch, L, hidden), context (batch, S, context_dim), x_mask (batch, L),
    context_mask (batch, S))`` -> ``(x (batch, L, hidden), CrossAttentionWeights or None)``.

    In chapter 3, ``x`` are the question's tokens and ``context`` the image's
    regions: every token builds a query, every region a key and a value, and
    each token's output is a weighted mix of region values. The steps are

    1. (optional, ``self_attention=True``) self-attention among the queries,
       so tokens can pass on what they found to each other between layers;
    2. cross-attention of the queries over the context;
    3. the feed-forward block;

    each wrapped in dropout + residual + LayerNorm as in :class:`TransformerLayer`.
    With ``self_attention=True`` this computes exactly what
    ``torch.nn.TransformerDecoderLayer(batch_first=True, activation="gelu")``
    computes without a causal mask (tested). The context is only read, never
    updated; ViLBERT's co-attention (chapter 5) updates both sides.

    ``context_dim`` lets the keys/values come straight from features of another
    width (``kdim = vdim = context_dim``). A sample whose context is all
    padding gets a zero cross-attention output (no NaN), so its queries pass
    through on their residual alone.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        ffn_size: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        context_dim: int | None = None,
        self_attention: bool = True,
        norm_first: bool = False,
        activation: str = "gelu",
        layer_norm_eps: float = LAYER_NORM_EPS,
    ):
        super().__init__()
        ffn_size, attention_dropout = _check_layer_args(
            hidden_size, num_heads, ffn_size, dropout, attention_dropout, activation
        )
        context_dim = hidden_size if context_dim is None else context_dim
        if not isinstance(context_dim, int) or context_dim <= 0:
            raise ValueError(
                f"context_dim must be a positive int or None (= hidden_size), got {context_dim!r}"
            )
        self.hidden_size, self.num_heads, self.context_dim = hidden_size, num_heads, context_dim
        self.norm_first = norm_first
        if self_attention:
            self.self_attention = MultiHeadAttention(
                hidden_size, num_heads, dropout=attention_dropout
            )
            self.self_residual = _Residual(hidden_size, dropout, norm_first, layer_norm_eps)
        else:
            self.self_attention = None
            self.self_residual = None
        self.cross_attention = MultiHeadAttention(
            hidden_size, num_heads, dropout=attention_dropout, kdim=context_dim, vdim=context_dim
        )
        self.cross_residual = _Residual(hidden_size, dropout, norm_first, layer_norm_eps)
        self.ffn = FeedForward(hidden_size, ffn_size, activation)
        self.ffn_residual = _Residual(hidden_size, dropout, norm_first, layer_norm_eps)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        x_mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        *,
        need_weights: bool = False,
    ) -> tuple[Tensor, CrossAttentionWeights | None]:
        _check_sequence("x", x, self.hidden_size)
        _check_sequence("context", context, self.context_dim)
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"context must have batch size {x.shape[0]} like x, got {tuple(context.shape)}"
            )
        check_mask("x_mask", x_mask, x.shape[0], x.shape[1])
        check_mask("context_mask", context_mask, context.shape[0], context.shape[1])

        self_weights = None
        if self.self_attention is not None:
            x, self_weights = self.self_residual(
                x, lambda h: self.self_attention(h, key_mask=x_mask, need_weights=need_weights)
            )
        x, cross_weights = self.cross_residual(
            x,
            lambda h: self.cross_attention(
                h, context, context, key_mask=context_mask, need_weights=need_weights
            ),
        )
        x, _ = self.ffn_residual(x, lambda h: (self.ffn(h), None))
        if not need_weights:
            return x, None
        return x, CrossAttentionWeights(cross=cross_weights, self_attn=self_weights)


# ---------------------------------------------------------------------------
# Pooling a padded sequence into one vector
# ---------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the real positions: ``(batch, seq, dim), (batch, seq) bool -> (batch, dim)``.

    A row with no real position gives zeros (not 0/0 = NaN).
    """
    if mask is None:
        return x.mean(dim=1)
    check_mask("mask", mask, x.shape[0], x.shape[1])
    weights = mask.to(x.dtype).unsqueeze(-1)  # (B, S, 1)
    # Zero the padded rows first: 0 * inf would be NaN if padding held inf.
    total = x.masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=1)  # (B, D)
    return total / weights.sum(dim=1).clamp(min=1.0)


def masked_max(x: Tensor, mask: Tensor | None) -> Tensor:
    """Max over the real positions: ``(batch, seq, dim), (batch, seq) bool -> (batch, dim)``.

    A row with no real position gives zeros (not -inf).
    """
    if mask is None:
        return x.amax(dim=1)
    check_mask("mask", mask, x.shape[0], x.shape[1])
    filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    return filled.masked_fill(~mask.any(dim=1, keepdim=True), 0.0)


# ---------------------------------------------------------------------------
# ViLBERT's co-attentional transformer layer (co-TRM)
# ---------------------------------------------------------------------------


class CoAttentionWeights(NamedTuple):
    """Attention weights of one :class:`CoAttentionLayer`, per head.

    ``text_to_visual``: ``(batch, heads, T, R)``, each word's distribution over the image positions.
    ``visual_to_text``: ``(batch, heads, R, T)``, each image position's distribution over the words.
    """

    text_to_visual: Tensor
    visual_to_text: Tensor


class CoAttentionLayer(nn.Module):
    r"""ViLBERT's co-attentional transformer layer, "co-TRM" (chapter 5).

    ``forward(text (batch, T, text_hidden), visual (batch, R, visual_hidden), text_mask (batch, T),
    visual_mask (batch, R))`` -> ``(text (batch, T, text_hidden), visual (batch, R, visual_hidden),
    CoAttentionWeights or None)``.

    The two streams have their own widths (BERT's 768 for words, 1024 for
    regions in the paper). Each projects its own queries, keys and values
    into one shared width ``bi_hidden_size`` split over ``bi_num_heads``
    heads, and then each stream's queries attend over the *other* stream:

    .. math::

        C_t = \mathrm{MHA}(Q_t W, K_v W, V_v W), \qquad C_v = \mathrm{MHA}(Q_v W, K_t W, V_t W)

    Each context goes back to its own stream, ViLBERT's ``BertBiOutput``:
    ``t = LayerNorm(t + dropout(Linear(C_t)))`` with ``Linear: bi_hidden -> text_hidden``
    (likewise for the image), then the stream's own feed-forward block with
    its residual and LayerNorm (post-LN, as BERT). Both directions read the
    layer's *inputs*, so neither stream sees the other's update within the
    layer. The layer has no self-attention of its own: ViLBERT interleaves it
    with ordinary per-stream :class:`TransformerLayer` s.

    Why not :class:`fusionlib.attention.MultiHeadAttention`? Its queries and
    its output live at one width (``embed_dim``); here the queries come from
    a stream of one width, are compared in ``bi_hidden_size`` and the context
    is mapped back to the stream's width. So the projections are written out
    (``text_in_proj (3 * bi, text_hidden)`` holds the text stream's Q, K, V
    stacked, like ``in_proj_weight``) and the attention itself is the same as
    in :class:`MultiHeadAttention`: PyTorch's fused
    :func:`torch.nn.functional.scaled_dot_product_attention`, or, with
    ``need_weights=True``, the written-out
    :func:`fusionlib.attention.scaled_dot_product_attention` that returns the
    maps the book plots. Both give zero output (no NaN) for a query whose keys
    are all padding, e.g. image queries of a sample with no real word.

    Masks are True at real positions; only keys are masked, so padded queries
    give finite garbage that nothing real reads.
    """

    def __init__(
        self,
        text_hidden_size: int,
        visual_hidden_size: int,
        bi_hidden_size: int,
        bi_num_heads: int,
        text_ffn_size: int | None = None,
        visual_ffn_size: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        activation: str = "gelu",
        layer_norm_eps: float = LAYER_NORM_EPS,
    ):
        super().__init__()
        for name, value in (
            ("text_hidden_size", text_hidden_size),
            ("visual_hidden_size", visual_hidden_size),
            ("bi_hidden_size", bi_hidden_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(bi_num_heads, int) or bi_num_heads <= 0 or bi_hidden_size % bi_num_heads:
            raise ValueError(
                f"bi_num_heads must be a positive int dividing bi_hidden_size={bi_hidden_size}, "
                f"got {bi_num_heads!r}"
            )
        text_ffn_size = 4 * text_hidden_size if text_ffn_size is None else text_ffn_size
        visual_ffn_size = 4 * visual_hidden_size if visual_ffn_size is None else visual_ffn_size
        for name, value in (("text_ffn_size", text_ffn_size), ("visual_ffn_size", visual_ffn_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"{name} must be a positive int or None (4 * the stream's width), got {value!r}"
                )
        _, attention_dropout = _check_layer_args(
            bi_hidden_size, bi_num_heads, None, dropout, attention_dropout, activation
        )
        self.text_hidden_size, self.visual_hidden_size = text_hidden_size, visual_hidden_size
        self.bi_hidden_size, self.num_heads = bi_hidden_size, bi_num_heads
        self.head_dim = bi_hidden_size // bi_num_heads
        self.attention_dropout = attention_dropout
        # Each stream's Q, K, V in the shared space, stacked as (3 * bi, width): [W_q; W_k; W_v].
        self.text_in_proj = nn.Linear(text_hidden_size, 3 * bi_hidden_size)
        self.visual_in_proj = nn.Linear(visual_hidden_size, 3 * bi_hidden_size)
        # From the shared space back to each stream's width (ViLBERT's BertBiOutput dense1/dense2).
        self.text_out_proj = nn.Linear(bi_hidden_size, text_hidden_size)
        self.visual_out_proj = nn.Linear(bi_hidden_size, visual_hidden_size)
        self.text_residual = _Residual(text_hidden_size, dropout, False, layer_norm_eps)
        self.visual_residual = _Residual(visual_hidden_size, dropout, False, layer_norm_eps)
        self.text_ffn = FeedForward(text_hidden_size, text_ffn_size, activation)
        self.text_ffn_residual = _Residual(text_hidden_size, dropout, False, layer_norm_eps)
        self.visual_ffn = FeedForward(visual_hidden_size, visual_ffn_size, activation)
        self.visual_ffn_residual = _Residual(visual_hidden_size, dropout, False, layer_norm_eps)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, N, 3 * bi)`` -> three ``(B, heads, N, head_dim)``: the queries, keys and values."""
        B, N, _ = x.shape
        q, k, v = x.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        p = self.attention_dropout if self.training else 0.0
        if need_weights:
            out, weights = scaled_dot_product_attention(q, k, v, mask, dropout_p=p)
        else:
            out, weights = (
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p),
                None,
            )
        B, H, L, Dh = out.shape
        return out.transpose(1, 2).reshape(B, L, H * Dh), weights  # merge heads: (B, L, bi)

    def forward(
        self,
        text: Tensor,
        visual: Tensor,
        text_mask: Tensor | None = None,
        visual_mask: Tensor | None = None,
        *,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor, CoAttentionWeights | None]:
        _check_sequence("text", text, self.text_hidden_size)
        _check_sequence("visual", visual, self.visual_hidden_size)
        if visual.shape[0] != text.shape[0]:
            raise ValueError(
                f"visual must have batch size {text.shape[0]} like text, got {tuple(visual.shape)}"
            )
        check_mask("text_mask", text_mask, text.shape[0], text.shape[1])
        check_mask("visual_mask", visual_mask, visual.shape[0], visual.shape[1])

        q_t, k_t, v_t = self._heads(self.text_in_proj(text))
        q_v, k_v, v_v = self._heads(self.visual_in_proj(visual))
        # Words ask the regions; regions ask the words. Both read the layer's inputs.
        context_t, w_tv = self._attend(q_t, k_v, v_v, visual_mask, need_weights)  # (B, T, bi)
        context_v, w_vt = self._attend(q_v, k_t, v_t, text_mask, need_weights)  # (B, R, bi)

        text, _ = self.text_residual(text, lambda _: (self.text_out_proj(context_t), None))
        visual, _ = self.visual_residual(visual, lambda _: (self.visual_out_proj(context_v), None))
        text, _ = self.text_ffn_residual(text, lambda h: (self.text_ffn(h), None))
        visual, _ = self.visual_ffn_residual(visual, lambda h: (self.visual_ffn(h), None))
        if not need_weights:
            return text, visual, None
        return text, visual, CoAttentionWeights(text_to_visual=w_tv, visual_to_text=w_vt)

    def extra_repr(self) -> str:
        return (
            f"text_hidden={self.text_hidden_size}, visual_hidden={self.visual_hidden_size}, "
            f"bi_hidden={self.bi_hidden_size}, heads={self.num_heads}"
        )
