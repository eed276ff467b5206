"""Embeddings: turning token ids and regions into vectors of one width (chapters 3, 5, 6).

A transformer only sees a set of vectors. The embeddings decide what each
vector carries:

:class:`TextEmbeddings` (BERT)
    ``LayerNorm(word + position + token type)``, then dropout. Without the
    learned position embedding, "left of red" and "red left of" would look the
    same to self-attention, which is order-blind.
:class:`RegionEmbeddings` (ViLBERT)
    ``LayerNorm(Linear(feature) + Linear(location))``, then dropout. A region
    feature says *what* is in a box; the 5-d location ``[x1/W, y1/H, x2/W,
    y2/H, area]`` says *where*. Regions have no order, so location is their
    only "position embedding".

Why location gets its own projection: appended raw to 64 standardised CNN
features, four numbers in [0, 1] are drowned out and "is it on the left?"
stays at chance for a long time (chapter 3 standardises them for this reason). Projected on
their own to the full width and summed before the LayerNorm, they can weigh
as much as the feature does, provided both inputs are on one scale
(chapter 3 standardises features and locations with training statistics;
raw detector features have a mean and spread of about 6). ``location_layers=2``
replaces the linear location projection by a small MLP. A linear embedding
makes attention scores linear in position, which favours extreme objects over
*nearby* ones ("closest to X"), but in chapter 3's runs the MLP made even
"is it on the left?" stall far longer; relations between boxes are handed to
the attention directly by :mod:`fusionlib.geometry`.

:class:`UniterImageEmbeddings` (UNITER, chapter 6)
    ``LayerNorm(LN(Linear(feat)) + LN(Linear(loc7)) + type)``, then dropout:
    each part is normalised *before* the sum, so neither the 2048-d feature
    nor the 7-d location ``(x1, y1, x2, y2, w, h, w*h)`` can drown the other,
    and a token-type embedding (type 1, shared with the text's table) tells
    regions from words in UNITER's single sequence. Masked regions
    (masked region modelling) have their feature zeroed and a learned
    ``[MASK]`` feature added, as UNITER's code does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fusionlib.layers import LAYER_NORM_EPS

__all__ = ["TextEmbeddings", "RegionEmbeddings", "UniterImageEmbeddings", "location_scale"]


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_dropout(dropout: float) -> float:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return dropout


def _checking() -> bool:
    """Value checks (min/max of ids) read tensors back to the host; skip them inside torch.compile."""
    return not torch.compiler.is_compiling()


class TextEmbeddings(nn.Module):
    """BERT's input embeddings: word + learned position + token type, LayerNorm, dropout (chapter 3).

    ``forward(input_ids (batch, seq) long, token_type_ids (batch, seq) long or None,
    position_ids (batch, seq) or (seq,) long or None)`` -> ``(batch, seq, hidden)``.

    Positions default to ``0 .. seq-1``; token types default to 0 (BERT uses 1
    for a second sentence; UNITER uses a type embedding to tell text from
    regions). ``seq`` may not exceed ``max_position``. The ``[PAD]`` row of
    the word table starts at zero and gets no gradient (``padding_idx``), as
    in BERT; pads are kept out of attention by the mask anyway.
    ``word_embeddings.weight`` is what an MLM head ties its output to (chapter 4).
    ``positions=False`` leaves the position embedding out: every layer above
    is then blind to word order, so the text is a bag of words ("red left of
    blue" and "blue left of red" look the same; chapter 5's baseline).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        max_position: int = 64,
        type_vocab_size: int = 2,
        dropout: float = 0.1,
        pad_token_id: int | None = 0,
        layer_norm_eps: float = LAYER_NORM_EPS,
        positions: bool = True,
    ):
        super().__init__()
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.max_position = _positive_int("max_position", max_position)
        self.type_vocab_size = _positive_int("type_vocab_size", type_vocab_size)
        if pad_token_id is not None and not 0 <= pad_token_id < vocab_size:
            raise ValueError(
                f"pad_token_id must be None or in [0, {vocab_size}), got {pad_token_id}"
            )
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        if not isinstance(positions, bool):
            raise ValueError(f"positions must be a bool, got {positions!r}")
        self.position_embeddings = nn.Embedding(max_position, hidden_size) if positions else None
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(_check_dropout(dropout))

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        if (
            not isinstance(input_ids, Tensor)
            or input_ids.dim() != 2
            or input_ids.dtype != torch.long
        ):
            got = (
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
                if isinstance(input_ids, Tensor)
                else type(input_ids)
            )
            raise ValueError(f"input_ids must be long of shape (batch, seq), got {got}")
        B, T = input_ids.shape
        if T > self.max_position:
            raise ValueError(
                f"input_ids has {T} tokens, more than max_position={self.max_position}; "
                "build the model with a larger max_position"
            )
        if position_ids is not None and self.position_embeddings is None:
            raise ValueError("position_ids given, but these embeddings have no positions")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)
        elif tuple(position_ids.shape) not in ((T,), (B, T)):
            raise ValueError(
                f"position_ids must have shape ({T},) or ({B}, {T}), got {tuple(position_ids.shape)}"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif tuple(token_type_ids.shape) != (B, T):
            raise ValueError(
                f"token_type_ids must have shape ({B}, {T}), got {tuple(token_type_ids.shape)}"
            )
        if _checking() and input_ids.numel():
            # An out-of-range id is a clear error here but a device-side assert on CUDA.
            # One read-back for all three checks: each read-back stalls the GPU queue.
            bad = torch.stack(
                [
                    ((input_ids < 0) | (input_ids >= self.vocab_size)).any(),
                    ((token_type_ids < 0) | (token_type_ids >= self.type_vocab_size)).any(),
                    ((position_ids < 0) | (position_ids >= self.max_position)).any(),
                ]
            ).tolist()
            if bad[0]:
                raise ValueError(
                    f"input_ids must be in [0, vocab_size={self.vocab_size}), got values in "
                    f"[{int(input_ids.min())}, {int(input_ids.max())}]"
                )
            if bad[1]:
                raise ValueError(f"token_type_ids must be in [0, {self.type_vocab_size})")
            if bad[2]:
                raise ValueError(f"position_ids must be in [0, max_position={self.max_position})")
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        return self.dropout(self.norm(x))


class RegionEmbeddings(nn.Module):
    """ViLBERT's region embedding: ``LayerNorm(Linear(feat) + Linear(loc))``, dropout (chapters 3, 5).

    ``forward(region_feats (batch, regions, feature_dim), region_loc (batch, regions, location_dim))``
    -> ``(batch, regions, hidden)``.

    ``location_dim`` is 5 for ViLBERT's ``[x1/W, y1/H, x2/W, y2/H, area]``
    (the batch key ``region_loc5``). ``location_layers=1`` is ViLBERT's linear
    projection; ``2`` is ``Linear -> GELU -> Linear``, which can express
    distances and "near", not only "far left" (see the module docstring).
    Padded regions are embedded like any other (their outputs are finite);
    attention masks keep them out.
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_size: int,
        location_dim: int = 5,
        dropout: float = 0.1,
        location_layers: int = 1,
        layer_norm_eps: float = LAYER_NORM_EPS,
    ):
        super().__init__()
        self.feature_dim = _positive_int("feature_dim", feature_dim)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.location_dim = _positive_int("location_dim", location_dim)
        if location_layers not in (1, 2):
            raise ValueError(
                f"location_layers must be 1 (ViLBERT's Linear) or 2 (an MLP), got {location_layers!r}"
            )
        self.location_layers = location_layers
        self.feature_proj = nn.Linear(feature_dim, hidden_size)
        if location_layers == 1:
            self.location_proj = nn.Linear(location_dim, hidden_size)
        else:
            self.location_proj = nn.Sequential(
                nn.Linear(location_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(_check_dropout(dropout))

    def forward(self, region_feats: Tensor, region_loc: Tensor) -> Tensor:
        if (
            not isinstance(region_feats, Tensor)
            or region_feats.dim() != 3
            or region_feats.shape[-1] != self.feature_dim
        ):
            got = (
                tuple(region_feats.shape)
                if isinstance(region_feats, Tensor)
                else type(region_feats).__name__
            )
            raise ValueError(
                f"region_feats must have shape (batch, regions, {self.feature_dim}), got {got}"
            )
        B, R, _ = region_feats.shape
        if not isinstance(region_loc, Tensor) or tuple(region_loc.shape) != (
            B,
            R,
            self.location_dim,
        ):
            got = (
                tuple(region_loc.shape)
                if isinstance(region_loc, Tensor)
                else type(region_loc).__name__
            )
            raise ValueError(
                f"region_loc must have shape ({B}, {R}, {self.location_dim}), got {got}"
            )
        x = self.feature_proj(region_feats) + self.location_proj(region_loc.to(region_feats.dtype))
        return self.dropout(self.norm(x))


class UniterImageEmbeddings(nn.Module):
    """UNITER's region embedding (chapter 6), as ``model/model.py: UniterImageEmbeddings`` computes it::

        f' = f * (1 - z) + z * m                         # z = 1 at masked ("zeroed") regions
        e  = LN_img(img_linear(f')) + LN_pos(pos_linear(loc)) + type
        out = dropout(LayerNorm(e))

    ``forward(region_feats (batch, regions, feature_dim), region_loc (batch, regions, location_dim),
    type_embeddings (batch, regions, hidden) or (hidden,), region_zeroed (batch, regions) bool or None)``
    -> ``(batch, regions, hidden)``.

    ``type_embeddings`` is passed in rather than owned: UNITER looks the image
    type (id 1) up in the *text* embeddings' token-type table, so words and
    regions share one table (:class:`fusionlib.models.uniter.UniterModel` does
    that lookup).

    Masked regions: UNITER's data pipeline zeroes a masked region's feature
    (``data/mrm.py: _mask_img_feat``) and the model then adds
    ``mask_embedding(img_masks)``, an ``nn.Embedding(2, feature_dim,
    padding_idx=0)`` whose row 0 it re-zeroes on every call: unmasked regions
    get nothing, masked ones get a learned ``[MASK]`` *feature* (in feature
    space, before ``img_linear``). Here both steps happen in this module:
    ``region_zeroed`` regions are zeroed and :attr:`mask_embedding` (that
    learned row 1; row 0 is always zero, so it is not stored) is added.
    ``mask_embedding=False`` only zeroes. The MRFR head of chapter 6 ties its
    output weight to :attr:`img_linear` (``img_linear.weight`` transposed).
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_size: int,
        location_dim: int = 7,
        dropout: float = 0.1,
        mask_embedding: bool = True,
        layer_norm_eps: float = LAYER_NORM_EPS,
    ):
        super().__init__()
        self.feature_dim = _positive_int("feature_dim", feature_dim)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.location_dim = _positive_int("location_dim", location_dim)
        self.img_linear = nn.Linear(feature_dim, hidden_size)
        self.img_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.pos_linear = nn.Linear(location_dim, hidden_size)
        self.pos_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        # UNITER's mask_embedding.weight[1]; BERT-style N(0, 0.02) start.
        self.mask_embedding = (
            nn.Parameter(torch.randn(feature_dim) * 0.02) if mask_embedding else None
        )
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(_check_dropout(dropout))

    def forward(
        self,
        region_feats: Tensor,
        region_loc: Tensor,
        type_embeddings: Tensor,
        region_zeroed: Tensor | None = None,
    ) -> Tensor:
        if (
            not isinstance(region_feats, Tensor)
            or region_feats.dim() != 3
            or region_feats.shape[-1] != self.feature_dim
            or not region_feats.is_floating_point()
        ):
            got = (
                f"{region_feats.dtype} {tuple(region_feats.shape)}"
                if isinstance(region_feats, Tensor)
                else type(region_feats).__name__
            )
            raise ValueError(
                f"region_feats must be float of shape (batch, regions, {self.feature_dim}), got {got}"
            )
        B, R, _ = region_feats.shape
        if not isinstance(region_loc, Tensor) or tuple(region_loc.shape) != (
            B,
            R,
            self.location_dim,
        ):
            got = (
                tuple(region_loc.shape)
                if isinstance(region_loc, Tensor)
                else type(region_loc).__name__
            )
            raise ValueError(
                f"region_loc must have shape ({B}, {R}, {self.location_dim}), got {got}"
            )
        if not isinstance(type_embeddings, Tensor) or tuple(type_embeddings.shape) not in (
            (B, R, self.hidden_size),
            (self.hidden_size,),
        ):
            got = (
                tuple(type_embeddings.shape)
                if isinstance(type_embeddings, Tensor)
                else type(type_embeddings).__name__
            )
            raise ValueError(
                f"type_embeddings must have shape ({B}, {R}, {self.hidden_size}) or "
                f"({self.hidden_size},), got {got}"
            )
        if region_zeroed is not None:
            if (
                not isinstance(region_zeroed, Tensor)
                or region_zeroed.dtype != torch.bool
                or tuple(region_zeroed.shape) != (B, R)
            ):
                got = (
                    f"{region_zeroed.dtype} {tuple(region_zeroed.shape)}"
                    if isinstance(region_zeroed, Tensor)
                    else type(region_zeroed).__name__
                )
                raise ValueError(
                    f"region_zeroed must be bool of shape ({B}, {R}) (True = masked region), got {got}"
                )
            zeroed = region_zeroed.unsqueeze(-1)  # (B, R, 1)
            # masked_fill, not a product: a masked region's old feature must not leak (0 * inf = NaN).
            region_feats = region_feats.masked_fill(zeroed, 0.0)
            if self.mask_embedding is not None:
                region_feats = region_feats + zeroed.to(region_feats.dtype) * self.mask_embedding
        image = self.img_layer_norm(self.img_linear(region_feats))
        location = self.pos_layer_norm(self.pos_linear(region_loc.to(region_feats.dtype)))
        return self.dropout(self.norm(image + location + type_embeddings))


def location_scale(
    build: Callable[[], RegionEmbeddings], seed: int = 0, samples: int = 4096
) -> tuple[float, float, float]:
    """``(feature part, location part, scale)``: how far unit-variance inputs move a fresh region embedding.

    At initialisation a region's 64 feature dimensions move its embedding far
    more than its 5 location numbers do, so the locations are standardised to
    a larger spread, ``scale`` = feature part / location part rounded to 0.1
    (chapter 3, section 3.3; chapter 5 for ViLBERT). ``build`` returns the
    :class:`RegionEmbeddings` of a model built right after
    ``torch.manual_seed(seed)``; the unit inputs are drawn right after it. The
    global random state is restored.
    """
    generator_state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        embeddings = build()
        with torch.no_grad():
            unit = (
                torch.randn(samples, 1, embeddings.feature_dim),
                torch.randn(samples, 1, embeddings.location_dim),
            )
            feature_part = embeddings.feature_proj(unit[0]).std(dim=0).mean().item()
            location_part = embeddings.location_proj(unit[1]).std(dim=0).mean().item()
    finally:
        torch.set_rng_state(generator_state)
    return feature_part, location_part, round(feature_part / location_part, 1)
