"""Five ways to answer a question about an image: the fusion baselines of chapter 3.

All five read the same batch dict (:mod:`fusionlib.data.datasets`) and return
answer logits ``(batch, num_answers)``; they differ only in *where* the
question meets the image:

=============================  ===================================================  ========================
model                          how question and image meet                          paper analogue
=============================  ===================================================  ========================
:class:`QuestionOnly`          never (answer priors from the question alone)        "blind" VQA baselines
:class:`ImageOnly`             never (image priors alone)                           -
:class:`LateFusion`            once, at the end: ``MLP([pool(regions); q])``        Santoro et al.'s CNN+MLP
:class:`RelationNetwork`       on every pair of regions: ``f(sum g(o_i, o_j, q))``  Santoro et al.'s CNN+RN
:class:`CrossAttentionFusion`  in every layer: question tokens attend over          chapter 3's model, the
                               the regions                                          core of ViLBERT/LXMERT
=============================  ===================================================  ========================

Late fusion pools the regions *before* it knows the question, so "the
object closest to red" must already be in a question-independent summary. A
relation network compares every pair of objects, conditioned on the question.
Cross-attention lets the question pick the regions it needs, layer after
layer.

Every model embeds regions the same way (:class:`RegionEncoder`: ViLBERT's
``LayerNorm(Linear(feat) + Linear(loc5))``), so the comparison is about
fusion, not about features. All are built from one :class:`VQAConfig`, so
``build_model(name, config)`` gives them the same width and budget.

Keys read: ``input_ids``, ``attention_mask`` (questions); ``region_feats``,
``region_loc5`` (or ``region_loc7`` when ``location_dim=7``), ``region_mask``
(images). Padding never changes the outputs of real positions (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from fusionlib.embeddings import RegionEmbeddings, TextEmbeddings
from fusionlib.geometry import GEOMETRY_INITS, GeometryBias
from fusionlib.layers import CrossAttentionLayer, TransformerLayer, masked_max, masked_mean
from fusionlib.models.batch import get_tensor, text_inputs
from fusionlib.models.io import ModelConfig, PretrainedModel, register_model

__all__ = [
    "VQAConfig",
    "QuestionEncoder",
    "RegionEncoder",
    "QuestionOnly",
    "ImageOnly",
    "LateFusion",
    "RelationNetwork",
    "CrossAttentionFusion",
]

LOCATION_KEYS = {5: "region_loc5", 7: "region_loc7"}
QUESTION_ENCODERS = ("gru", "transformer")
TEXT_POOLINGS = ("cls", "mean")
IMAGE_POOLINGS = ("mean", "max", "mean_max")


@dataclasses.dataclass(frozen=True)
class VQAConfig(ModelConfig):
    """One config for every chapter-3 model; each model reads the fields it needs.

    ``hidden_size=128, num_layers=2, num_heads=4`` is the size chapter 3 trains,
    small enough to learn the world's questions on a laptop CPU.
    """

    vocab_size: int  # tokenizer vocabulary (input_ids < vocab_size)
    num_answers: int  # size of the answer vocabulary
    region_dim: int = 64  # D of region_feats (fusionlib.vision's default)
    location_dim: int = 5  # 5 reads region_loc5 (ViLBERT), 7 reads region_loc7 (UNITER)
    hidden_size: int = 128
    num_layers: int = 2  # cross-attention layers; transformer question-encoder layers
    num_heads: int = 4
    ffn_size: int | None = None  # None: 4 * hidden_size
    dropout: float = 0.1
    attention_dropout: float | None = None  # None: same as dropout
    max_text_len: int = 32  # learned positions
    pad_token_id: int = 0
    norm_first: bool = False  # pre-LN instead of BERT's post-LN
    location_layers: int = 1  # 1: ViLBERT's Linear(loc); 2: an MLP (see fusionlib.embeddings)
    text_layers: int = 1  # text self-attention layers before the cross-attention layers
    region_layers: int = 0  # region self-attention layers before fusion (any model)
    geometry_bias: bool = (
        False  # region self-attention gets a pairwise-geometry bias (fusionlib.geometry)
    )
    geometry_hidden: int = 32  # width of that bias's MLP
    geometry_self_logit: float = (
        4.0  # initial extra logit of a region for itself (start near the identity)
    )
    geometry_init: str = (
        "identity"  # "zero" | "identity" | "prior" (fusionlib.geometry.GeometryBias)
    )
    question_encoder: str = (
        "gru"  # QuestionOnly / LateFusion / RelationNetwork: "gru" | "transformer"
    )
    text_pooling: str = "cls"  # transformer text encoders: "cls" ([CLS] output) | "mean"
    image_pooling: str = "mean_max"  # ImageOnly / LateFusion: "mean" | "max" | "mean_max"
    classifier_hidden: int = 256  # width of the answer MLP
    rn_hidden: int = 256  # RelationNetwork: width of g_theta and f_phi (paper: 256)
    rn_g_layers: int = 4  # RelationNetwork: layers of g_theta (paper: 4)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "num_answers",
            "region_dim",
            "hidden_size",
            "num_layers",
            "num_heads",
            "max_text_len",
            "classifier_hidden",
            "rn_hidden",
            "rn_g_layers",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("text_layers", "region_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.geometry_bias, bool):
            raise ValueError(f"geometry_bias must be a bool, got {self.geometry_bias!r}")
        if self.geometry_bias and self.region_layers == 0:
            raise ValueError(
                "geometry_bias=True biases the region self-attention layers: set region_layers >= 1"
            )
        if not isinstance(self.geometry_hidden, int) or self.geometry_hidden <= 0:
            raise ValueError(
                f"geometry_hidden must be a positive int, got {self.geometry_hidden!r}"
            )
        if self.geometry_init not in GEOMETRY_INITS:
            raise ValueError(
                f"geometry_init must be one of {GEOMETRY_INITS}, got {self.geometry_init!r}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.location_dim not in LOCATION_KEYS:
            raise ValueError(
                f"location_dim must be 5 (region_loc5) or 7 (region_loc7), got {self.location_dim!r}"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, value, allowed in (
            ("question_encoder", self.question_encoder, QUESTION_ENCODERS),
            ("text_pooling", self.text_pooling, TEXT_POOLINGS),
            ("image_pooling", self.image_pooling, IMAGE_POOLINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    @property
    def location_key(self) -> str:
        return LOCATION_KEYS[self.location_dim]


# ---------------------------------------------------------------------------
# Reading the batch
# ---------------------------------------------------------------------------


def _region_inputs(
    batch: dict[str, Any], config: VQAConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``region_feats, region_loc, region_mask`` and, with ``geometry_bias``, ``region_boxes`` (else None)."""
    feats, loc, mask = (
        get_tensor(batch, k) for k in ("region_feats", config.location_key, "region_mask")
    )
    if feats.dim() != 3 or feats.shape[-1] != config.region_dim:
        raise ValueError(
            f"batch['region_feats'] must be (batch, regions, {config.region_dim}), "
            f"got {tuple(feats.shape)}"
        )
    B, R, _ = feats.shape
    if tuple(loc.shape) != (B, R, config.location_dim):
        raise ValueError(
            f"batch[{config.location_key!r}] must be ({B}, {R}, {config.location_dim}), "
            f"got {tuple(loc.shape)}"
        )
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, R):
        raise ValueError(
            f"batch['region_mask'] must be bool ({B}, {R}) (True = real region), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    boxes = None
    if config.geometry_bias:
        boxes = get_tensor(batch, "region_boxes")
        if tuple(boxes.shape) != (B, R, 4):
            raise ValueError(
                f"batch['region_boxes'] must be ({B}, {R}, 4) xyxy (geometry_bias=True reads it), "
                f"got {tuple(boxes.shape)}"
            )
    return feats, loc, mask, boxes


def _same_batch(question: Tensor, regions: Tensor) -> None:
    if question.shape[0] != regions.shape[0]:
        raise ValueError(
            f"input_ids has batch size {question.shape[0]} but region_feats has {regions.shape[0]}"
        )


def _mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    """``Linear -> ReLU -> Dropout`` between every pair of ``sizes``, no activation after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def _pool_text(tokens: Tensor, mask: Tensor, how: str) -> Tensor:
    # [CLS] sits at position 0 and, through self-attention, has seen every real token.
    return tokens[:, 0] if how == "cls" else masked_mean(tokens, mask)


def _pool_regions(regions: Tensor, mask: Tensor, how: str) -> Tensor:
    if how == "mean":
        return masked_mean(regions, mask)
    if how == "max":
        return masked_max(regions, mask)
    return torch.cat([masked_mean(regions, mask), masked_max(regions, mask)], dim=-1)


def _image_pool_width(config: VQAConfig) -> int:
    return 2 * config.hidden_size if config.image_pooling == "mean_max" else config.hidden_size


def _transformer_layers(config: VQAConfig, count: int) -> nn.ModuleList:
    return nn.ModuleList(
        TransformerLayer(
            config.hidden_size,
            config.num_heads,
            config.ffn_size,
            config.dropout,
            config.attention_dropout,
            norm_first=config.norm_first,
        )
        for _ in range(count)
    )


def _final_norm(config: VQAConfig, count: int) -> nn.Module:
    # A pre-LN stack leaves its output un-normalised; add the LayerNorm it is missing.
    return nn.LayerNorm(config.hidden_size) if config.norm_first and count > 0 else nn.Identity()


# ---------------------------------------------------------------------------
# Shared encoders
# ---------------------------------------------------------------------------


class QuestionEncoder(nn.Module):
    """A question on its own: ``(input_ids, attention_mask) -> (tokens (B, T, H), pooled (B, H))``.

    ``question_encoder="gru"``: word embeddings and a one-layer GRU; the pooled
    vector is the GRU state at the last real token. The GRU reads left to
    right, so right-padding after the last token cannot change it.
    ``"transformer"``: :class:`TextEmbeddings` and ``num_layers``
    :class:`TransformerLayer` s, pooled by ``text_pooling``.
    """

    def __init__(self, config: VQAConfig):
        super().__init__()
        self.kind, self.pooling = config.question_encoder, config.text_pooling
        H = config.hidden_size
        if self.kind == "gru":
            self.embeddings = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
            self.gru = nn.GRU(H, H, batch_first=True)
        else:
            self.embeddings = TextEmbeddings(
                config.vocab_size,
                H,
                config.max_text_len,
                dropout=config.dropout,
                pad_token_id=config.pad_token_id,
            )
            self.layers = _transformer_layers(config, config.num_layers)
            self.final_norm = _final_norm(config, config.num_layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        if self.kind == "transformer":
            x = self.embeddings(input_ids)
            for layer in self.layers:
                x, _ = layer(x, attention_mask)
            x = self.final_norm(x)
            return x, _pool_text(x, attention_mask, self.pooling)
        if not torch.compiler.is_compiling() and bool(
            (attention_mask[:, 1:] & ~attention_mask[:, :-1]).any()
        ):
            raise ValueError(
                "attention_mask must be right-padded (real tokens first) for the GRU encoder"
            )
        tokens, _ = self.gru(self.embeddings(input_ids))  # (B, T, H)
        lengths = attention_mask.sum(dim=1)  # (B,)
        last = (lengths - 1).clamp(min=0)
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), last]  # (B, H)
        return tokens, pooled * (lengths > 0).unsqueeze(-1).to(
            pooled.dtype
        )  # an empty question -> zeros


class RegionEncoder(nn.Module):
    """Regions on their own: :class:`RegionEmbeddings` (+ ``region_layers`` self-attention layers).

    ``(region_feats (B, R, D), region_loc (B, R, 5), region_mask (B, R)[, region_boxes (B, R, 4)])
    -> (B, R, H)``. With ``geometry_bias=True`` every region self-attention layer adds
    :class:`fusionlib.geometry.GeometryBias` (computed once from the raw boxes) to
    its logits, so a region can gather its nearest or furthest neighbours.
    """

    def __init__(self, config: VQAConfig):
        super().__init__()
        self.embeddings = RegionEmbeddings(
            config.region_dim,
            config.hidden_size,
            config.location_dim,
            dropout=config.dropout,
            location_layers=config.location_layers,
        )
        self.layers = _transformer_layers(config, config.region_layers)
        self.geometry = (
            GeometryBias(
                config.num_heads,
                config.geometry_hidden,
                config.geometry_self_logit,
                config.geometry_init,
            )
            if config.geometry_bias
            else None
        )
        self.final_norm = _final_norm(config, config.region_layers)

    def forward(
        self,
        region_feats: Tensor,
        region_loc: Tensor,
        region_mask: Tensor,
        region_boxes: Tensor | None = None,
    ) -> Tensor:
        x = self.embeddings(region_feats, region_loc)
        bias = None
        if self.geometry is not None:
            if region_boxes is None:
                raise ValueError(
                    "geometry_bias=True needs region_boxes (B, R, 4), the raw xyxy boxes"
                )
            bias = self.geometry(region_boxes.to(x.dtype))  # (B, heads, R, R)
        for layer in self.layers:
            x, _ = layer(x, region_mask, attn_mask=bias)
        return self.final_norm(x)


# ---------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------


@register_model("question_only")
class QuestionOnly(PretrainedModel):
    """The question alone, no image: how far answer priors go (chapter 3).

    ``forward(batch) -> logits (batch, num_answers)``:
    ``MLP(QuestionEncoder(question))``. On Sort-of-CLEVR it can learn that
    "what shape" answers are shapes and "how many" answers are numbers, no more.
    """

    config_class = VQAConfig

    def __init__(self, config: VQAConfig):
        super().__init__(config)
        self.question = QuestionEncoder(config)
        self.classifier = _mlp(
            [config.hidden_size, config.classifier_hidden, config.num_answers], config.dropout
        )

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        _, q = self.question(*text_inputs(batch))
        return self.classifier(q)


@register_model("image_only")
class ImageOnly(PretrainedModel):
    """The image alone, no question: ``MLP(pool(regions))`` (chapter 3)."""

    config_class = VQAConfig

    def __init__(self, config: VQAConfig):
        super().__init__(config)
        self.regions = RegionEncoder(config)
        self.classifier = _mlp(
            [_image_pool_width(config), config.classifier_hidden, config.num_answers],
            config.dropout,
        )

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        feats, loc, mask, boxes = _region_inputs(batch, self.config)
        return self.classifier(
            _pool_regions(self.regions(feats, loc, mask, boxes), mask, self.config.image_pooling)
        )


@register_model("late_fusion")
class LateFusion(PretrainedModel):
    """Late fusion, the paper's CNN+MLP in spirit: ``MLP([pool(regions); q])`` (chapter 3).

    The image is summarised (masked mean and max over region embeddings)
    *before* the question is known, and the two vectors meet only in the
    final MLP. Relations between particular objects are mostly lost in the
    pooled summary, which is what the chapter's table shows.
    """

    config_class = VQAConfig

    def __init__(self, config: VQAConfig):
        super().__init__(config)
        self.question = QuestionEncoder(config)
        self.regions = RegionEncoder(config)
        width = _image_pool_width(config) + config.hidden_size
        self.classifier = _mlp(
            [width, config.classifier_hidden, config.classifier_hidden, config.num_answers],
            config.dropout,
        )

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        ids, text_mask = text_inputs(batch)
        feats, loc, region_mask, boxes = _region_inputs(batch, self.config)
        _same_batch(ids, feats)
        _, q = self.question(ids, text_mask)
        image = _pool_regions(
            self.regions(feats, loc, region_mask, boxes), region_mask, self.config.image_pooling
        )
        return self.classifier(torch.cat([image, q], dim=-1))


@register_model("relation_network")
class RelationNetwork(PretrainedModel):
    r"""Santoro et al. (2017)'s Relation Network over regions (chapter 3).

    .. math:: \mathrm{RN}(O, q) = f_\phi\Big(\sum_{i,j} g_\theta(o_i, o_j, q)\Big)

    Every ordered pair of regions (including a region with itself), joined
    with the question encoding, goes through :math:`g_\theta` (``rn_g_layers``
    layers of ``rn_hidden`` ReLU units; the paper: 4 x 256); the sum over the
    pairs whose two regions are both real goes through :math:`f_\phi`
    (``rn_hidden``, ``rn_hidden``, dropout, answers; the paper: 256, 256, 29).
    Cost grows with the square of the number of regions.
    """

    config_class = VQAConfig

    def __init__(self, config: VQAConfig):
        super().__init__(config)
        self.question = QuestionEncoder(config)
        self.regions = RegionEncoder(config)
        H, G = config.hidden_size, config.rn_hidden
        g: list[nn.Module] = []
        for i in range(config.rn_g_layers):
            g += [nn.Linear(3 * H if i == 0 else G, G), nn.ReLU()]
        self.g = nn.Sequential(*g)
        self.f = nn.Sequential(
            nn.Linear(G, G), nn.ReLU(), _mlp([G, G, config.num_answers], config.dropout)
        )

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        ids, text_mask = text_inputs(batch)
        feats, loc, region_mask, boxes = _region_inputs(batch, self.config)
        _same_batch(ids, feats)
        _, q = self.question(ids, text_mask)  # (B, H)
        o = self.regions(feats, loc, region_mask, boxes)  # (B, R, H)
        B, R, H = o.shape
        pairs = torch.cat(
            [
                o.unsqueeze(2).expand(B, R, R, H),  # o_i
                o.unsqueeze(1).expand(B, R, R, H),  # o_j
                q[:, None, None, :].expand(B, R, R, H),
            ],
            dim=-1,
        )  # (B, R, R, 3H)
        relations = self.g(pairs)  # (B, R, R, G)
        real_pair = (region_mask.unsqueeze(2) & region_mask.unsqueeze(1)).unsqueeze(
            -1
        )  # (B, R, R, 1)
        summed = relations.masked_fill(~real_pair, 0.0).sum(dim=(1, 2))  # (B, G)
        return self.f(summed)


@register_model("cross_attention")
class CrossAttentionFusion(PretrainedModel):
    """Question tokens attend over regions, layer after layer (chapter 3).

    ``forward(batch, need_weights=False)`` -> ``logits (batch, num_answers)``,
    or ``(logits, weights)`` with ``need_weights=True``, where ``weights`` is a
    list (one per cross-attention layer) of ``(batch, heads, tokens, regions)``
    attention maps: which regions each question word looked at.

    1. tokens: :class:`TextEmbeddings`, then ``text_layers`` self-attention layers;
    2. regions: :class:`RegionEncoder` (ViLBERT's feature + location embedding);
    3. ``num_layers`` :class:`CrossAttentionLayer` s (token self-attention,
       tokens -> regions cross-attention, feed-forward);
    4. pool (``[CLS]`` or masked mean), then an MLP over the answers.
    """

    config_class = VQAConfig

    def __init__(self, config: VQAConfig):
        super().__init__(config)
        H = config.hidden_size
        self.text_embeddings = TextEmbeddings(
            config.vocab_size,
            H,
            config.max_text_len,
            dropout=config.dropout,
            pad_token_id=config.pad_token_id,
        )
        self.text_layers = _transformer_layers(config, config.text_layers)
        self.regions = RegionEncoder(config)
        self.cross_layers = nn.ModuleList(
            CrossAttentionLayer(
                H,
                config.num_heads,
                config.ffn_size,
                config.dropout,
                config.attention_dropout,
                self_attention=True,
                norm_first=config.norm_first,
            )
            for _ in range(config.num_layers)
        )
        self.final_norm = _final_norm(config, config.num_layers)
        self.classifier = _mlp([H, config.classifier_hidden, config.num_answers], config.dropout)

    def forward(
        self, batch: dict[str, Tensor], need_weights: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        ids, text_mask = text_inputs(batch)
        feats, loc, region_mask, boxes = _region_inputs(batch, self.config)
        _same_batch(ids, feats)
        x = self.text_embeddings(ids)
        for layer in self.text_layers:
            x, _ = layer(x, text_mask)
        regions = self.regions(feats, loc, region_mask, boxes)
        maps: list[Tensor] = []
        for layer in self.cross_layers:
            x, weights = layer(x, regions, text_mask, region_mask, need_weights=need_weights)
            if weights is not None:
                maps.append(weights.cross)
        x = self.final_norm(x)
        logits = self.classifier(_pool_text(x, text_mask, self.config.text_pooling))
        return (logits, maps) if need_weights else logits
