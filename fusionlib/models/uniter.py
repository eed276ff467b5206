"""UNITER: one transformer over ``[text; regions]``, pretrained by sampling one task per step (chapter 6).

UNITER (Chen et al., ECCV 2020; code ``ChenRocks/UNITER``) is *single-stream*:
the words and the image regions are embedded to the same width, concatenated
into one sequence and read by one BERT encoder with full self-attention, so
every layer lets every word attend to every region and back. There is no
cross-attention module (compare ViLBERT's two streams, chapter 5).

==================================  =====================================================================
piece                               here
==================================  =====================================================================
text embedding                      :class:`~fusionlib.embeddings.TextEmbeddings` (BERT, token type 0)
region embedding                    :class:`~fusionlib.embeddings.UniterImageEmbeddings`
                                    ``LN(LN(W f) + LN(W_loc loc7) + type_1)``, masked regions zeroed
                                    + a learned ``[MASK]`` feature
encoder                             ``num_layers`` :class:`~fusionlib.layers.TransformerLayer` (post-LN)
                                    over ``[text (T); regions (R)]``, mask ``[attention_mask; region_mask]``
pooler                              ``tanh(Linear(h_[CLS]))`` (BERT)
MLM head                            BERT's: ``Linear -> GELU -> LN -> Linear`` tied to the word embeddings
MRFR head                           ``Linear -> GELU -> LN``, then ``F.linear(h, img_linear.weight.T, b)``:
                                    its output weight *is* the image projection's weight
MRC / MRC-kl head                   ``Linear -> GELU -> LN -> Linear(num_region_classes)`` (one head, two losses)
ITM head                            ``Linear(hidden, 2)`` on the pooled ``[CLS]``; WRA adds
                                    ``0.1 * wra_loss`` (optimal transport, IPOT) on ITM steps
VQA head (:class:`UniterForVQA`)    ``Linear(H, 2H) -> GELU -> LN -> Linear(num_answers)`` on the pooled ``[CLS]``
                                    (or, ``vqa_pooling="mean"``, on the mean of the words: chapter 3)
==================================  =====================================================================

Pretraining (:func:`pretraining_step`) follows UNITER's ``pretrain.py``: each
step :func:`fusionlib.train.train` samples **one** task from a mix
(:data:`UNITER_TASK_MIX`: itm 2, mlm 2, mrfr 1, mrc_kl 1) and that task's
batch is masked *conditionally*: MLM masks only words (the image stays
whole), MRFR / MRC / MRC-kl mask only regions (the sentence stays whole).
``masking="joint"`` masks both modalities at once, the alternative of the
paper's ablation. ITM swaps in another image with p = 0.5 (never the same
image: ``image_index`` marks duplicates): any other, as UNITER does, with
``itm_negatives="random"``; one the caption is false of by default; or keeps the
image and edits the caption (``hard_negative_share``, :mod:`fusionlib.itm`).
MLM and MRM see matched pairs only.

Layout note: UNITER's code packs each sample's regions right after its last
real word (``gather_index``) to save compute. Here the sequence is simply
``[text padded to T; regions padded to R]`` with padded positions masked out of
attention; the joint sequence has no position embedding, so the outputs at
real positions are the same (tested: padding never changes them).

Batch keys read: ``input_ids``, ``attention_mask`` (bool), ``region_feats``,
``region_loc7`` (``region_loc5`` when ``location_dim=5``), ``region_mask``;
``region_soft_labels`` for MRC / MRC-kl; ``image_index`` for ITM negatives, and
``text_facts``, ``image_objects`` (and ``edit_*`` for hard negatives) with
``itm_negatives="false"`` (:mod:`fusionlib.itm`);
``answer`` for VQA.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlib import itm, losses, masking, runtime
from fusionlib.attention import MultiHeadAttention
from fusionlib.embeddings import TextEmbeddings, UniterImageEmbeddings
from fusionlib.layers import LAYER_NORM_EPS, TransformerLayer, masked_mean
from fusionlib.models.batch import get_tensor, text_inputs
from fusionlib.models.io import ModelConfig, PretrainedModel, load_pretrained, register_model

__all__ = [
    "UniterConfig",
    "UniterOutput",
    "UniterModel",
    "UniterForPretraining",
    "UniterForVQA",
    "MLMHead",
    "RegionFeatureRegression",
    "RegionClassification",
    "UNITER_TASK_MIX",
    "PRETRAINING_TASKS",
    "prepare_pretraining_batch",
    "pretraining_step",
    "pretraining_loaders",
    "word_region_alignment",
    "vqa_step",
    "itm_similarity",
    "masked_word_accuracy",
]

# UNITER's default mix (config/pretrain-*.json: mix_ratio of itm, mlm, mrfr, mrckl); read-only, dict() it to edit.
UNITER_TASK_MIX: Mapping[str, float] = types.MappingProxyType({"itm": 2, "mlm": 2, "mrfr": 1, "mrc_kl": 1})
PRETRAINING_TASKS = ("mlm", "mrfr", "mrc", "mrc_kl", "itm")
MASKINGS = ("conditional", "joint")
VQA_POOLINGS = ("cls", "mean")
LOCATION_KEYS = {5: "region_loc5", 7: "region_loc7"}


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UniterConfig(ModelConfig):
    """Everything that defines a UNITER model and its pretraining tasks (chapter 6).

    The defaults are the book's small size (:meth:`small`: 128 wide, 4 layers,
    4 heads), which trains on a laptop; :meth:`paper_base` is UNITER-base
    (768 / 12 / 12, bert-base-cased vocabulary, 2048-d Faster R-CNN features,
    1601 Visual Genome classes), built in the tests only to count parameters.
    Special-token ids default to fusionlib's tokenizer (``[PAD]=0 [UNK]=1
    [CLS]=2 [SEP]=3 [MASK]=4``).
    """

    vocab_size: int                        # input_ids < vocab_size
    num_region_classes: int                # detector classes: the last dim of region_soft_labels
    region_dim: int = 64                   # D of region_feats (fusionlib.vision's default; UNITER: 2048)
    location_dim: int = 7                  # 7 reads region_loc7 (UNITER); 5 reads region_loc5
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ffn_size: int | None = None            # None: 4 * hidden_size
    dropout: float = 0.1
    attention_dropout: float | None = None  # None: same as dropout
    max_text_len: int = 40                 # learned text positions
    initializer_range: float | None = 0.02  # BERT/UNITER init: N(0, 0.02) matrices; None: PyTorch's defaults
    pad_token_id: int = 0
    mask_token_id: int = 4
    special_token_ids: tuple[int, ...] = (0, 1, 2, 3, 4)  # never masked, never a random replacement
    region_mask_embedding: bool = True     # add UNITER's learned [MASK] feature to masked regions
    # Pretraining (pretraining_step):
    masking: str = "conditional"           # "conditional" (UNITER: one modality per task) | "joint"
    mask_probability: float = 0.15         # of tokens (MLM) / regions (MRM), at least one always
    region_zero_fraction: float = 1.0      # of masked regions, the share zeroed (UNITER 1.0, ViLBERT 0.9)
    itm_negative_probability: float = 0.5  # chance an ITM pair becomes a negative
    itm_negatives: str = "false"           # "false": another image the caption is false of (fusionlib.itm, the
                                           # synthetic world) | "random": any other image (UNITER)
    hard_negative_share: float = 0.0       # of the negatives, the share that keep the image and get a minimal
                                           # edit of the caption (needs CaptionDataset(edits=E))
    hard_negative_kinds: tuple[str, ...] = itm.EDIT_KINDS  # which kinds of edit (fusionlib.data.truth.EDIT_KINDS)
    use_wra: bool = True                   # add word-region alignment to ITM steps
    wra_weight: float = losses.WRA_WEIGHT  # 0.1, UNITER's --itm_ot_lambda
    ot_beta: float = 0.5                   # IPOT step size
    ot_iterations: int = 50                # IPOT steps
    mrc_background_class: int | None = None  # MRC never targets this class (fusionlib's detector: the last)
    # Downstream:
    num_answers: int | None = None         # UniterForVQA: size of the answer vocabulary
    vqa_pooling: str = "cls"               # UniterForVQA reads "cls" (the pooled [CLS], UNITER) | "mean" (of the words)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_region_classes", "region_dim", "hidden_size", "num_layers", "num_heads",
                     "max_text_len", "ot_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.ffn_size is not None and (not isinstance(self.ffn_size, int) or self.ffn_size <= 0):
            raise ValueError(f"ffn_size must be a positive int or None (4 * hidden_size), got {self.ffn_size!r}")
        if self.location_dim not in LOCATION_KEYS:
            raise ValueError(f"location_dim must be 7 (region_loc7, UNITER) or 5 (region_loc5), "
                             f"got {self.location_dim!r}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.initializer_range is not None and not self.initializer_range > 0:
            raise ValueError(f"initializer_range must be positive or None, got {self.initializer_range!r}")
        # JSON gives lists back; keep the tuple (frozen dataclass, hence object.__setattr__).
        object.__setattr__(self, "special_token_ids", tuple(self.special_token_ids))
        for name in ("pad_token_id", "mask_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be an int in [0, vocab_size={self.vocab_size}), got {value!r}")
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in self.special_token_ids):
            raise ValueError(f"special_token_ids must be ints in [0, vocab_size={self.vocab_size}), "
                             f"got {self.special_token_ids!r}")
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")
        if not 0.0 < self.mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in (0, 1], got {self.mask_probability!r}")
        for name in ("region_zero_fraction", "itm_negative_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not (self.wra_weight >= 0 and math.isfinite(self.wra_weight)):
            raise ValueError(f"wra_weight must be a finite number >= 0, got {self.wra_weight!r}")
        if not self.ot_beta > 0:
            raise ValueError(f"ot_beta must be positive, got {self.ot_beta!r}")
        if self.mrc_background_class is not None and (
                not isinstance(self.mrc_background_class, int)
                or not 0 <= self.mrc_background_class < self.num_region_classes):
            raise ValueError(f"mrc_background_class must be None or an int in [0, num_region_classes="
                             f"{self.num_region_classes}), got {self.mrc_background_class!r}")
        if self.num_answers is not None and (not isinstance(self.num_answers, int) or self.num_answers <= 0):
            raise ValueError(f"num_answers must be None or a positive int, got {self.num_answers!r}")
        if self.vqa_pooling not in VQA_POOLINGS:
            raise ValueError(f"vqa_pooling must be one of {VQA_POOLINGS}, got {self.vqa_pooling!r}")
        # JSON gives a list back; keep the tuple (frozen dataclass, hence object.__setattr__).
        object.__setattr__(self, "hard_negative_kinds", itm.check_settings(
            self.itm_negatives, self.hard_negative_share, self.hard_negative_kinds, names=itm.CONFIG_NAMES))

    @property
    def location_key(self) -> str:
        """The batch key of the region locations: ``region_loc7`` (or ``region_loc5``)."""
        return LOCATION_KEYS[self.location_dim]

    @classmethod
    def small(cls, vocab_size: int, num_region_classes: int, **changes: Any) -> "UniterConfig":
        """The book's size: hidden 128, 4 layers, 4 heads, FFN 512 (about 0.85M encoder weights with the
        world's vocabulary).

        Measured on a toy set (``tests/test_uniter.py``): trained from scratch with
        UNITER's N(0, 0.02) initialisation, a model this narrow sits on an ITM
        plateau (loss ln 2) for hundreds of steps, because near-zero query/key
        weights make attention uniform; ``initializer_range=None`` (PyTorch's
        default initialisation) leaves it at once. UNITER never met this: it
        starts from BERT's pretrained weights.
        """
        return cls(vocab_size=vocab_size, num_region_classes=num_region_classes, **{
            "hidden_size": 128, "num_layers": 4, "num_heads": 4, "ffn_size": 512, **changes})

    @classmethod
    def paper_base(cls, **changes: Any) -> "UniterConfig":
        """UNITER-base as published: 768 hidden, 12 layers, 12 heads, FFN 3072, 512 text positions,
        bert-base-cased's 28,996-word vocabulary (``[PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103``),
        2048-d region features, 1601 detector classes."""
        return cls(**{
            "vocab_size": 28996, "num_region_classes": 1601, "region_dim": 2048, "hidden_size": 768,
            "num_layers": 12, "num_heads": 12, "ffn_size": 3072, "max_text_len": 512, "pad_token_id": 0,
            "mask_token_id": 103, "special_token_ids": (0, 100, 101, 102, 103), **changes})


# ---------------------------------------------------------------------------
# Reading the batch
# ---------------------------------------------------------------------------


def _region_inputs(batch: Mapping[str, Any], config: UniterConfig, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    feats, loc, mask = (get_tensor(batch, k) for k in ("region_feats", config.location_key, "region_mask"))
    if feats.dim() != 3 or feats.shape[0] != batch_size or feats.shape[-1] != config.region_dim:
        raise ValueError(f"batch['region_feats'] must be ({batch_size}, regions, {config.region_dim}) "
                         f"(batch size of input_ids, region_dim of the config), got {tuple(feats.shape)}")
    R = feats.shape[1]
    if tuple(loc.shape) != (batch_size, R, config.location_dim):
        raise ValueError(f"batch[{config.location_key!r}] must be ({batch_size}, {R}, {config.location_dim}), "
                         f"got {tuple(loc.shape)}")
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch_size, R):
        raise ValueError(f"batch['region_mask'] must be bool ({batch_size}, {R}) (True = real region), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return feats, loc, mask


def _optional_bool(batch: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> Tensor | None:
    if key not in batch or batch[key] is None:
        return None
    value = get_tensor(batch, key)
    if value.dtype != torch.bool or tuple(value.shape) != shape:
        raise ValueError(f"batch[{key!r}] must be bool {shape}, got {value.dtype} {tuple(value.shape)}")
    return value


# ---------------------------------------------------------------------------
# Initialisation (BERT / UNITER: N(0, initializer_range) matrices, zero biases, unit LayerNorms)
# ---------------------------------------------------------------------------


def _init_weights(module: nn.Module, std: float) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, MultiHeadAttention):
        # BERT's query/key/value are three nn.Linear; ours are stacked in one matrix.
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            weight = getattr(module, name, None)
            if weight is not None:
                nn.init.normal_(weight, mean=0.0, std=std)
        if module.in_proj_bias is not None:
            nn.init.zeros_(module.in_proj_bias)
    elif isinstance(module, UniterImageEmbeddings) and module.mask_embedding is not None:
        nn.init.normal_(module.mask_embedding, mean=0.0, std=std)


def _initialise(model: nn.Module, config: UniterConfig, encoder: "UniterModel") -> None:
    if config.initializer_range is not None:
        model.apply(functools.partial(_init_weights, std=config.initializer_range))
    with torch.no_grad():       # [PAD] starts at zero, as in TextEmbeddings and Hugging Face's BERT
        encoder.text_embeddings.word_embeddings.weight[config.pad_token_id].zero_()


# ---------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------


class UniterOutput(NamedTuple):
    """What :class:`UniterModel` returns.

    ``sequence``: ``(batch, T + R, hidden)``, the text positions first, then the regions.
    ``pooled``: ``(batch, hidden)``, ``tanh(Linear(h_[CLS]))``.
    ``mask``: ``(batch, T + R)`` bool, True at real positions.
    ``num_text``: ``T``, where the regions start.
    ``attentions``: one ``(batch, heads, T + R, T + R)`` map per layer (``need_weights=True``), else None.
    """

    sequence: Tensor
    pooled: Tensor
    mask: Tensor
    num_text: int
    attentions: list[Tensor] | None

    @property
    def text(self) -> Tensor:
        """``(batch, T, hidden)``: the words' outputs."""
        return self.sequence[:, : self.num_text]

    @property
    def regions(self) -> Tensor:
        """``(batch, R, hidden)``: the regions' outputs."""
        return self.sequence[:, self.num_text:]

    def text_to_region(self, layer: int = -1) -> Tensor:
        """``(batch, heads, T, R)``: how much each word attends to each region in ``layer``.

        The text-to-region block of the full map. Each word's row of the full
        map sums to 1 over words *and* regions, so a row of this block sums to
        the share of attention that word gave the image.
        """
        if self.attentions is None:
            raise ValueError("no attention maps: call the model with need_weights=True")
        return self.attentions[layer][:, :, : self.num_text, self.num_text:]

    def region_to_text(self, layer: int = -1) -> Tensor:
        """``(batch, heads, R, T)``: how much each region attends to each word in ``layer``."""
        if self.attentions is None:
            raise ValueError("no attention maps: call the model with need_weights=True")
        return self.attentions[layer][:, :, self.num_text:, : self.num_text]


@register_model("uniter")
class UniterModel(PretrainedModel):
    """The UNITER encoder: embeddings, one transformer over ``[text; regions]``, the pooler (chapter 6).

    ``forward(batch, need_weights=False)`` -> :class:`UniterOutput`. The batch
    may carry ``region_zeroed (batch, regions) bool``: those regions' features
    are replaced by the learned ``[MASK]`` feature (masked region modelling).
    :meth:`encode` takes the tensors directly.
    """

    config_class = UniterConfig

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        H = config.hidden_size
        self.text_embeddings = TextEmbeddings(config.vocab_size, H, config.max_text_len, type_vocab_size=2,
                                              dropout=config.dropout, pad_token_id=config.pad_token_id)
        self.image_embeddings = UniterImageEmbeddings(config.region_dim, H, config.location_dim,
                                                      dropout=config.dropout,
                                                      mask_embedding=config.region_mask_embedding)
        self.layers = nn.ModuleList(
            TransformerLayer(H, config.num_heads, config.ffn_size, config.dropout, config.attention_dropout)
            for _ in range(config.num_layers))
        self.pooler = nn.Linear(H, H)
        _initialise(self, config, self)

    def encode(self, input_ids: Tensor, attention_mask: Tensor, region_feats: Tensor, region_loc: Tensor,
               region_mask: Tensor, region_zeroed: Tensor | None = None,
               need_weights: bool = False) -> UniterOutput:
        """``input_ids (B, T)``, ``attention_mask (B, T)`` bool, ``region_feats (B, R, D)``,
        ``region_loc (B, R, location_dim)``, ``region_mask (B, R)`` bool,
        ``region_zeroed (B, R)`` bool or None -> :class:`UniterOutput`."""
        text = self.text_embeddings(input_ids)                                   # type 0: (B, T, H)
        B, R = region_feats.shape[:2]
        # Regions are token type 1 of the *text* table, as in UNITER (one table for both modalities).
        image_type = torch.ones(B, R, dtype=torch.long, device=region_feats.device)
        regions = self.image_embeddings(region_feats, region_loc,
                                        self.text_embeddings.token_type_embeddings(image_type), region_zeroed)
        x = torch.cat([text, regions], dim=1)                                    # (B, T + R, H)
        mask = torch.cat([attention_mask, region_mask], dim=1)                   # (B, T + R)
        maps: list[Tensor] = []
        for layer in self.layers:
            x, weights = layer(x, mask, need_weights=need_weights)
            if weights is not None:
                maps.append(weights)
        pooled = torch.tanh(self.pooler(x[:, 0]))                                # [CLS] is text position 0
        return UniterOutput(x, pooled, mask, input_ids.shape[1], maps if need_weights else None)

    def forward(self, batch: Mapping[str, Any], need_weights: bool = False) -> UniterOutput:
        ids, text_mask = text_inputs(batch)
        feats, loc, region_mask = _region_inputs(batch, self.config, ids.shape[0])
        zeroed = _optional_bool(batch, "region_zeroed", tuple(region_mask.shape))
        return self.encode(ids, text_mask, feats, loc, region_mask, zeroed, need_weights=need_weights)


def _encoder_of(source: PretrainedModel | str | os.PathLike) -> UniterModel:
    """The :class:`UniterModel` inside a model, a checkpoint directory, or the encoder itself."""
    if isinstance(source, (str, os.PathLike)):
        source = load_pretrained(source)
    if isinstance(source, UniterModel):
        return source
    encoder = getattr(source, "uniter", None)
    if not isinstance(encoder, UniterModel):
        raise TypeError(f"expected a UniterModel, a model with a .uniter encoder, or a directory holding one; "
                        f"got {type(source).__name__}")
    return encoder


# ---------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------


def _transform(hidden_size: int) -> nn.Sequential:
    """``Linear -> GELU -> LayerNorm``, the hidden part of every UNITER/BERT prediction head."""
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                         nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS))


class MLMHead(nn.Module):
    """BERT's masked-LM head: ``transform`` then a decoder whose weight *is* the word embedding
    matrix, plus a bias of its own: ``(batch, seq, hidden) -> (batch, seq, vocab)`` (chapter 4)."""

    def __init__(self, hidden_size: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = _transform(hidden_size)
        vocab_size = word_embeddings.weight.shape[0]
        self.decoder = nn.Linear(hidden_size, vocab_size)
        self.decoder.weight = word_embeddings.weight      # tied: one matrix reads and writes words

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden))


class RegionFeatureRegression(nn.Module):
    """UNITER's MRFR head: ``transform`` then ``F.linear(h, img_linear.weight.T, bias)``:
    ``(batch, regions, hidden) -> (batch, regions, region_dim)``.

    The output layer has no matrix of its own: it uses the image projection's
    weight ``(hidden, region_dim)`` transposed, so regressing a feature runs the
    embedding's projection backwards, and MRFR's gradient trains that projection
    directly. ``weight`` is the very ``nn.Parameter`` of ``img_linear`` (one
    storage, counted once by ``parameters()``, saved once by safetensors).
    """

    def __init__(self, hidden_size: int, img_linear: nn.Linear):
        super().__init__()
        self.transform = _transform(hidden_size)
        self.weight = img_linear.weight                   # tied: (hidden, region_dim)
        self.bias = nn.Parameter(torch.zeros(img_linear.in_features))

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(self.transform(hidden), self.weight.t(), self.bias)


class RegionClassification(nn.Module):
    """UNITER's MRC head, shared by MRC and MRC-kl: ``transform -> Linear(num_classes)``:
    ``(batch, regions, hidden) -> (batch, regions, num_classes)`` logits."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(_transform(hidden_size), nn.Linear(hidden_size, num_classes))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden)


def word_region_alignment(output: UniterOutput, attention_mask: Tensor, region_mask: Tensor,
                          beta: float = 0.5, iterations: int = 50) -> tuple[Tensor, Tensor]:
    """WRA's optimal transport between a pair's words and regions (chapter 6).

    Returns ``(distance (batch,), plan (batch, T, R))``: the transport plan from
    :func:`fusionlib.losses.ipot` over the cosine-distance cost of the
    contextual word and region states, and the distance ``trace(C Tᵀ)``
    (:func:`fusionlib.losses.ot_distance`, gradient through the cost only).
    Real words include ``[CLS]`` and ``[SEP]``, as in UNITER (its ``txt_lens``
    count them); padded words and regions get no mass. Computed in float32, as
    UNITER does ("run in fp32 for stability"), also under bf16 autocast.
    """
    text, regions = output.text.float(), output.regions.float()
    if text.shape[1] == 0 or regions.shape[1] == 0:
        # Nothing to transport (IPOT cannot reduce over an empty axis); keep the graph for backward.
        plan = text.new_zeros(text.shape[0], text.shape[1], regions.shape[1])
        return (text.sum(dim=(1, 2)) + regions.sum(dim=(1, 2))) * 0.0, plan
    cost = losses.cosine_cost(text, regions).masked_fill(
        ~(attention_mask[:, :, None] & region_mask[:, None, :]), 0.0)
    plan = losses.ipot(cost, attention_mask, region_mask, beta=beta, iterations=iterations)
    distance = losses.ot_distance(text, regions, attention_mask, region_mask, plan=plan)
    return distance, plan


@register_model("uniter_pretraining")
class UniterForPretraining(PretrainedModel):
    """UNITER with its pretraining heads: MLM, MRFR, MRC / MRC-kl, ITM (+ WRA) (chapter 6).

    ``forward(batch, task)`` -> ``{"loss": scalar, **detached metrics}`` for a
    batch already prepared by :func:`prepare_pretraining_batch` (masked inputs
    and targets); :func:`pretraining_step` does both. ``task`` is one of
    :data:`PRETRAINING_TASKS`:

    * ``"mlm"``: :func:`~fusionlib.losses.mlm_loss` at ``mlm_labels != -100``;
    * ``"mrfr"``: :func:`~fusionlib.losses.mrfr_loss`, predicted vs the *original*
      ``region_feats`` at ``region_masked``;
    * ``"mrc"``: :func:`~fusionlib.losses.mrc_loss` (detector's argmax class);
    * ``"mrc_kl"``: :func:`~fusionlib.losses.mrc_kl_loss` (KL to the detector's distribution);
    * ``"itm"``: :func:`~fusionlib.losses.itm_loss` on the pooled ``[CLS]``, plus
      ``wra_weight * wra_loss`` when ``config.use_wra``.

    :meth:`itm_logits` ``(batch) -> (batch, 2)`` scores pairs (class 1 = match);
    its match logit is the retrieval score (:func:`itm_similarity`).
    """

    config_class = UniterConfig

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        self.uniter = UniterModel(config)
        H = config.hidden_size
        self.mlm_head = MLMHead(H, self.uniter.text_embeddings.word_embeddings)
        self.mrfr_head = RegionFeatureRegression(H, self.uniter.image_embeddings.img_linear)
        self.region_classifier = RegionClassification(H, config.num_region_classes)
        self.itm_head = nn.Linear(H, 2)
        _initialise(self, config, self.uniter)

    def itm_logits(self, batch: Mapping[str, Any]) -> Tensor:
        """``(batch, 2)`` image-text matching logits (class 1 = the pair matches)."""
        return self.itm_head(self.uniter(batch).pooled)

    def forward(self, batch: Mapping[str, Any], task: str) -> dict[str, Tensor]:
        if task not in PRETRAINING_TASKS:
            raise ValueError(f"task must be one of {PRETRAINING_TASKS}, got {task!r}")
        out = self.uniter(batch)
        if task == "mlm":
            labels = get_tensor(batch, "mlm_labels", " (prepare the batch with prepare_pretraining_batch)")
            if labels.shape != out.text.shape[:2]:
                raise ValueError(f"batch['mlm_labels'] must have shape {tuple(out.text.shape[:2])}, "
                                 f"got {tuple(labels.shape)}")
            # Logits at every position, not only the masked ones as UNITER gathers: the vocabulary is
            # small here, and fixed shapes keep torch.compile from recompiling for every mask count.
            logits = self.mlm_head(out.text)
            loss = losses.mlm_loss(logits, labels)
            scored = labels != masking.IGNORE_INDEX
            hits = (logits.detach().argmax(-1) == labels) & scored
            return {"loss": loss, "mlm_accuracy": hits.sum() / scored.sum().clamp(min=1)}
        if task == "itm":
            labels = get_tensor(batch, "itm_labels", " (prepare the batch with prepare_pretraining_batch)")
            logits = self.itm_head(out.pooled)
            itm = losses.itm_loss(logits, labels)
            result = {"itm_loss": itm.detach(),
                      "itm_accuracy": (logits.detach().argmax(-1) == labels).float().mean()}
            loss = itm
            if self.config.use_wra:
                distance, _ = word_region_alignment(out, get_tensor(batch, "attention_mask"), get_tensor(batch, "region_mask"),
                                                    self.config.ot_beta, self.config.ot_iterations)
                wra = losses.wra_loss(distance, labels)
                loss = itm + self.config.wra_weight * wra.to(itm.dtype)
                result["wra_loss"] = wra.detach()
            return {"loss": loss, **result}
        # Masked region modelling: scored at region_masked, compared with the original features / labels.
        masked = _optional_bool(batch, "region_masked", tuple(out.regions.shape[:2]))
        if masked is None:
            raise ValueError(f"batch has no 'region_masked' for task {task!r} (prepare the batch with "
                             f"prepare_pretraining_batch); it has {sorted(batch)}")
        if task == "mrfr":
            target = get_tensor(batch, "region_feats")
            return {"loss": losses.mrfr_loss(self.mrfr_head(out.regions), target, masked)}
        soft_labels = get_tensor(batch, "region_soft_labels", f" (task {task!r} needs the detector's class distribution)")
        expected = (*out.regions.shape[:2], self.config.num_region_classes)
        if tuple(soft_labels.shape) != expected:
            raise ValueError(f"batch['region_soft_labels'] must have shape {expected} (num_region_classes of the "
                             f"config), got {tuple(soft_labels.shape)}")
        logits = self.region_classifier(out.regions)
        if task == "mrc":
            return {"loss": losses.mrc_loss(logits, soft_labels, masked, self.config.mrc_background_class)}
        return {"loss": losses.mrc_kl_loss(logits, soft_labels, masked)}


@register_model("uniter_vqa")
class UniterForVQA(PretrainedModel):
    """UNITER fine-tuned for VQA: ``Linear(H, 2H) -> GELU -> LN -> Linear(num_answers)`` on the pooled
    ``[CLS]`` (UNITER's ``vqa_output``; chapter 6), or, with ``config.vqa_pooling="mean"``, on the mean
    of the real words' outputs.

    The mean is chapter 3's pooling: a word that found its region carries it straight to the answer
    instead of first handing it to ``[CLS]``; chapter 6 says what that changed on our world.

    ``forward(batch, need_weights=False)`` -> ``logits (batch, num_answers)``, or
    ``(logits, UniterOutput)`` with ``need_weights=True`` (attention maps in it).
    Build it from a pretrained encoder with :meth:`from_pretrained_encoder`.
    UNITER scores VQA with a binary cross-entropy against soft answer scores
    (several annotators per question); our world has one answer, so
    :func:`vqa_step` uses cross-entropy.
    """

    config_class = UniterConfig

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        if config.num_answers is None:
            raise ValueError("UniterForVQA needs config.num_answers (the answer vocabulary size), got None")
        self.uniter = UniterModel(config)
        H = config.hidden_size
        self.vqa_head = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.LayerNorm(2 * H, eps=LAYER_NORM_EPS),
                                      nn.Linear(2 * H, config.num_answers))
        _initialise(self, config, self.uniter)

    @classmethod
    def from_pretrained_encoder(cls, source: PretrainedModel | str | os.PathLike,
                                num_answers: int, **config_changes: Any) -> "UniterForVQA":
        """A VQA model whose encoder is a copy of ``source``'s (a :class:`UniterForPretraining`, a
        :class:`UniterModel`, or a directory either was saved to); the VQA head starts fresh.
        ``config_changes`` may change what does not shape the encoder (``vqa_pooling``, ``dropout``...)."""
        encoder = _encoder_of(source)
        model = cls(encoder.config.replace(num_answers=num_answers, **config_changes))
        model.uniter.load_state_dict(encoder.state_dict())
        return model.to(next(encoder.parameters()).device)

    def forward(self, batch: Mapping[str, Any], need_weights: bool = False) -> Tensor | tuple[Tensor, UniterOutput]:
        out = self.uniter(batch, need_weights=need_weights)
        if self.config.vqa_pooling == "mean":
            pooled = masked_mean(out.text, out.mask[:, : out.num_text])              # (batch, H)
        else:
            pooled = out.pooled                                                      # (batch, H)
        logits = self.vqa_head(pooled)
        return (logits, out) if need_weights else logits


# ---------------------------------------------------------------------------
# Pretraining by task sampling
# ---------------------------------------------------------------------------


def prepare_pretraining_batch(batch: Mapping[str, Any], task: str, config: UniterConfig,
                              generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The inputs and targets of one pretraining task for one batch (chapter 6).

    Returns a new dict (``batch`` is not modified) with the batch's keys plus:

    * ``mlm_labels (B, T)``: the original ids at masked words, -100 elsewhere;
      ``input_ids`` become the masked ids (80% ``[MASK]``, 10% random, 10% kept);
    * ``region_masked (B, R)`` bool: the regions MRM is scored at;
      ``region_zeroed (B, R)`` bool: the regions whose feature the model
      replaces by ``[MASK]`` (``region_feats`` itself stays the original: the MRFR target);
    * ``text_masked``, ``image_masked`` ``(B,)`` bool: which modality each sample had masked;
    * ``itm_labels (B,)`` long, for ``"itm"``: 1 = matched, 0 = a negative: another image
      swapped in (its ``region_*``, ``image_feats``, ``image_index`` and ``image_objects``
      move with it), or, for a hard negative, the same image with a minimal edit of the
      caption in ``input_ids``/``attention_mask`` (which may then be wider than T).

    ``config.masking="conditional"`` (UNITER): ``"mlm"`` masks only words, the
    MRM tasks only regions, at least one of each per sample that has any.
    ``"joint"``: every masking task masks words *and* regions. ``"itm"`` masks
    nothing; MLM and MRM never see swapped (unmatched) pairs.
    """
    if task not in PRETRAINING_TASKS:
        raise ValueError(f"task must be one of {PRETRAINING_TASKS}, got {task!r}")
    if not isinstance(config, UniterConfig):
        raise TypeError(f"config must be a UniterConfig, got {type(config).__name__}")
    generator = runtime.step_generator(generator)
    ids, text_mask = text_inputs(batch)
    feats, _, region_mask = _region_inputs(batch, config, ids.shape[0])
    out = dict(batch)
    B, R = region_mask.shape
    no_text = torch.full_like(ids, masking.IGNORE_INDEX)
    no_regions = torch.zeros(B, R, dtype=torch.bool, device=region_mask.device)
    nobody = torch.zeros(B, dtype=torch.bool, device=ids.device)

    if task == "itm":
        get_tensor(batch, "image_index", " (ITM negatives must never be the same image)")
        pairs = itm.draw_pairs(batch, generator, config.itm_negative_probability, config.itm_negatives,
                               config.hard_negative_share, swap="image", hard_kinds=config.hard_negative_kinds)
        partner = pairs.partner.to(feats.device)
        for key in ("region_feats", "region_boxes", "region_loc5", "region_loc7", "region_mask",
                    "region_soft_labels", "image_feats", "image_index", "image_objects"):
            if key in batch and isinstance(batch[key], Tensor):
                out[key] = batch[key].index_select(0, partner.to(batch[key].device))
        if bool((pairs.edit >= 0).any()):          # hard negatives: same image, one thing of the caption changed
            out["input_ids"], out["attention_mask"] = itm.edit_texts(ids, text_mask, batch, pairs.edit,
                                                                     config.pad_token_id)
            no_text = torch.full_like(out["input_ids"], masking.IGNORE_INDEX)
        out.update(itm_labels=pairs.labels.to(ids.device), mlm_labels=no_text, region_masked=no_regions,
                   region_zeroed=no_regions, text_masked=nobody, image_masked=nobody)
        return out

    maskable = masking.maskable_tokens(ids, text_mask, config.special_token_ids)
    settings = dict(mask_token_id=config.mask_token_id, vocab_size=config.vocab_size, generator=generator,
                    special_ids=config.special_token_ids, probability=config.mask_probability)
    if config.masking == "joint" and R > 0:
        m = masking.joint_masking(ids, maskable, region_mask, zero_fraction=config.region_zero_fraction,
                                  **settings)
        out.update(input_ids=m.input_ids, mlm_labels=m.labels, region_masked=m.region_masked,
                   region_zeroed=m.region_zeroed, text_masked=m.text_masked, image_masked=m.image_masked)
    elif task == "mlm" or config.masking == "joint":      # words only, the image intact (or has no slots)
        tokens = masking.mask_tokens(ids, maskable, **settings)
        out.update(input_ids=tokens.inputs, mlm_labels=tokens.labels, region_masked=no_regions,
                   region_zeroed=no_regions, text_masked=maskable.any(dim=1), image_masked=nobody)
    else:                                                 # conditional: regions only, the sentence intact
        if R == 0:                                        # no region slots at all: nothing to mask
            regions = masking.RegionMasking(masked=no_regions, zeroed=no_regions)
        else:
            regions = masking.mask_regions(region_mask, generator, probability=config.mask_probability,
                                           zero_fraction=config.region_zero_fraction)
        out.update(mlm_labels=no_text, region_masked=regions.masked, region_zeroed=regions.zeroed,
                   text_masked=nobody, image_masked=region_mask.any(dim=1))
    out["itm_labels"] = torch.ones(B, dtype=torch.long, device=ids.device)   # MLM / MRM: matched pairs only
    return out


def pretraining_step(model: nn.Module, batch: Mapping[str, Any], task: str,
                     generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """One UNITER pretraining step: mask / pair the batch for ``task``, return the task's loss.

    The ``step_fn`` of :func:`fusionlib.train.train`, which samples the task::

        train(model, pretraining_loaders(dataset, 64), config, pretraining_step, task_mix=UNITER_TASK_MIX)

    ``model`` is a :class:`UniterForPretraining` (or its ``torch.compile``d
    wrapper). With ``generator=None`` the masks and negatives are drawn from a
    generator seeded by the global RNG, which :func:`~fusionlib.train.train`
    seeds and checkpoints (exact resumption); pass a generator to replay a step
    on its own. Returns ``{"loss", **metrics}`` (see :class:`UniterForPretraining`).
    """
    config = getattr(model, "config", None)
    if not isinstance(config, UniterConfig):
        raise TypeError(f"model must be a UniterForPretraining, got {type(model).__name__}")
    return model(prepare_pretraining_batch(batch, task, config, generator), task)


def pretraining_loaders(dataset: Any, batch_size: int, tasks: Mapping[str, float] | tuple[str, ...] = UNITER_TASK_MIX,
                        seed: int = 0, **loader_kwargs: Any) -> dict[str, Any]:
    """One ``DataLoader`` per task over the same dataset (``{task: loader}`` for :func:`fusionlib.train.train`).

    Each task needs a loader *object* of its own: :func:`~fusionlib.train.train`
    takes over each loader's shuffling generator, so two tasks sharing one
    loader would reseed each other's epochs. Arguments as
    :func:`fusionlib.data.datasets.make_loader` (``drop_last=True`` is worth
    passing: ITM needs at least two images per batch to draw negatives).
    """
    from fusionlib.data.datasets import make_loader

    names = list(tasks)
    unknown = [t for t in names if t not in PRETRAINING_TASKS]
    if unknown or not names:
        raise ValueError(f"tasks must be a non-empty subset of {PRETRAINING_TASKS}, got {names}")
    return {t: make_loader(dataset, batch_size, seed=seed + i, **loader_kwargs) for i, t in enumerate(names)}


# ---------------------------------------------------------------------------
# Downstream: VQA steps, retrieval scores
# ---------------------------------------------------------------------------


def vqa_step(model: nn.Module, batch: Mapping[str, Any], task: str = "vqa") -> dict[str, Tensor]:
    """A ``step_fn`` for :func:`fusionlib.train.train`: cross-entropy of ``model(batch)`` against
    ``batch["answer"]``; returns ``{"loss", "accuracy"}``."""
    logits = model(batch)
    answer = get_tensor(batch, "answer")
    if answer.dtype != torch.long or tuple(answer.shape) != (logits.shape[0],):
        raise ValueError(f"batch['answer'] must be long ({logits.shape[0]},), got {answer.dtype} {tuple(answer.shape)}")
    loss = F.cross_entropy(logits.float(), answer)
    return {"loss": loss, "accuracy": (logits.detach().argmax(-1) == answer).float().mean()}


@torch.no_grad()
def itm_similarity(model: UniterForPretraining, images: Mapping[str, Tensor], captions: Mapping[str, Tensor],
                   batch_size: int = 256) -> Tensor:
    """Retrieval scores of every (image, caption) pair: the ITM match logit, ``(N_images, N_captions)``.

    A single-stream model has no separate image and text embeddings to compare
    with a dot product: every pair is a forward pass (``N_images x N_captions``
    of them, ``batch_size`` at a time), UNITER's cost for retrieval. Score =
    logit of class 1 ("match"), the row UNITER copies into its retrieval head
    (``model/itm.py: init_output``). Feed it to
    :func:`fusionlib.metrics.image_text_recall`.

    Args:
        model: a :class:`UniterForPretraining` (evaluated in eval mode, restored after).
        images: ``region_feats (NI, R, D)``, the location key, ``region_mask (NI, R)``.
        captions: ``input_ids (NC, T)``, ``attention_mask (NC, T)``.
    """
    if not isinstance(model, UniterForPretraining):
        raise TypeError(f"model must be a UniterForPretraining (it has the ITM head), got {type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    config = model.config
    ids, text_mask = text_inputs(captions)
    num_images = get_tensor(images, "region_feats").shape[0]
    feats, loc, region_mask = _region_inputs(images, config, num_images)
    device = next(model.parameters()).device
    num_captions = ids.shape[0]
    pairs = torch.cartesian_prod(torch.arange(num_images), torch.arange(num_captions))   # (NI * NC, 2)
    scores = torch.empty(num_images * num_captions)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            i, c = pairs[start:start + batch_size].unbind(1)
            batch = {"input_ids": ids[c], "attention_mask": text_mask[c], "region_feats": feats[i],
                     config.location_key: loc[i], "region_mask": region_mask[i]}
            batch = {k: v.to(device) for k, v in batch.items()}
            scores[start:start + len(i)] = model.itm_logits(batch)[:, 1].float().cpu()
    finally:
        model.train(was_training)
    return scores.view(num_images, num_captions)


@torch.no_grad()
def masked_word_accuracy(model: UniterForPretraining, batch: Mapping[str, Any],
                         word_ids: Sequence[int] | Tensor) -> float:
    """MLM accuracy with *every* occurrence of ``word_ids`` masked at once: chapter 6's grounding probe.

    Masking all the shape words of a caption ("the red [MASK] is left of the
    blue [MASK]") leaves the image as the only place the answers are: a model
    completes them only once its words have found their regions. The regions
    stay intact and nothing else is masked (unlike :func:`prepare_pretraining_batch`,
    which masks 15% at random), so the same batch gives the same probe at
    every call and across models.

    Args:
        model: a :class:`UniterForPretraining` (evaluated in eval mode, restored after).
        batch: ``input_ids (B, T)``, ``attention_mask (B, T)`` and the region keys, matched pairs.
        word_ids: the token ids to mask (not special tokens), e.g. the ids of "square" and "circle".

    Returns the share of masked positions whose most likely word is the original one.
    """
    if not isinstance(model, UniterForPretraining):
        raise TypeError(f"model must be a UniterForPretraining (it has the MLM head), got {type(model).__name__}")
    config = model.config
    words = torch.as_tensor(word_ids).flatten()
    if words.numel() == 0 or words.is_floating_point() or words.dtype == torch.bool:
        raise ValueError(f"word_ids must be a non-empty sequence of int token ids, got {word_ids!r}")
    bad = [int(w) for w in words if not 0 <= int(w) < config.vocab_size or int(w) in config.special_token_ids]
    if bad:
        raise ValueError(f"word_ids must be ids in [0, vocab_size={config.vocab_size}) that are not special tokens "
                         f"{config.special_token_ids}, got {bad}")
    ids, text_mask = text_inputs(batch)
    where = torch.isin(ids, words.to(ids.device)) & text_mask                # (B, T)
    if not where.any():
        raise ValueError(f"no word of word_ids={words.tolist()} occurs at a real position of batch['input_ids']")
    # The MLM task's own forward scores it: labels are the original ids at the masked words only.
    masked = dict(batch, input_ids=ids.masked_fill(where, config.mask_token_id),
                  mlm_labels=ids.masked_fill(~where, masking.IGNORE_INDEX))
    device = next(model.parameters()).device
    masked = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in masked.items()}
    was_training = model.training
    model.eval()
    try:
        return float(model(masked, "mlm")["mlm_accuracy"])
    finally:
        model.train(was_training)
