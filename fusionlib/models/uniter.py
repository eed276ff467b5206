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
                                    (:class:`~fusionlib.models.vl_base.TiedMLMHead`)
MRFR head                           ``Linear -> GELU -> LN``, then ``F.linear(h, img_linear.weight.T, b)``:
                                    its output weight *is* the image projection's weight
                                    (:class:`~fusionlib.models.vl_base.RegionFeatureRegressionHead`)
MRC / MRC-kl head                   ``Linear -> GELU -> LN -> Linear(num_region_classes)`` (one head, two losses;
                                    :class:`~fusionlib.models.vl_base.RegionClassificationHead`)
ITM head                            ``Linear(hidden, 2)`` on the pooled ``[CLS]``; WRA adds
                                    ``0.1 * wra_loss`` (optimal transport, IPOT) on ITM steps
VQA head (:class:`UniterForVQA`)    ``Linear(H, 2H) -> GELU -> LN -> Linear(num_answers)`` on the pooled ``[CLS]``
                                    (or, ``vqa_pooling="mean"``, on the mean of the words: chapter 3)
==================================  =====================================================================

Pretraining (:func:`pretraining_step`) follows UNITER's ``pretrain.py``: each
step :func:`fusionlib.train.train` samples **one** task from a mix
(:data:`UNITER_TASK_MIX`: itm 2, mlm 2, mrfr 1, mrc_kl 1); the step returns that
task's ``loss``, its ``<task>_loss`` and, for ``mlm`` and ``itm``, its
``<task>_accuracy`` (plus ``wra_loss`` on ITM steps), by the rule of
:mod:`fusionlib.models.vl_base`. That task's batch is masked *conditionally*:
MLM masks only words (the image stays whole), MRFR / MRC / MRC-kl mask only
regions (the sentence stays whole).
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
import math
import types
from typing import Any, ClassVar, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from fusionlib import itm, losses, masking, runtime
from fusionlib.embeddings import TextEmbeddings, UniterImageEmbeddings
from fusionlib.layers import LAYER_NORM_EPS, TransformerLayer, masked_mean
from fusionlib.models.batch import (
    LOCATION_KEYS,
    get_tensor,
    optional_bool,
    region_inputs,
    text_inputs,
)
from fusionlib.models.io import ModelConfig, register_model
from fusionlib.models.vl_base import (
    ITMHead,
    PretrainingOutput,
    RegionClassificationHead,
    RegionFeatureRegressionHead,
    TiedMLMHead,
    VisionLanguageModel,
    VisionLanguagePretraining,
    masked_word_accuracy,
    pair_scores,
    pretraining_losses,
    vqa_step,
)

__all__ = [
    "UniterConfig",
    "UniterOutput",
    "UniterModel",
    "UniterForPretraining",
    "UniterForVQA",
    "PretrainingOutput",
    "UNITER_TASK_MIX",
    "PRETRAINING_TASKS",
    "prepare_pretraining_batch",
    "pretraining_step",
    "pretraining_loaders",
    "word_region_alignment",
    "vqa_step",
    "pair_scores",
    "masked_word_accuracy",
]

# UNITER's default mix (config/pretrain-*.json: mix_ratio of itm, mlm, mrfr, mrckl); read-only, dict() it to edit.
UNITER_TASK_MIX: Mapping[str, float] = types.MappingProxyType(
    {"itm": 2, "mlm": 2, "mrfr": 1, "mrc_kl": 1}
)
PRETRAINING_TASKS = ("mlm", "mrfr", "mrc", "mrc_kl", "itm")
MASKINGS = ("conditional", "joint")
VQA_POOLINGS = ("cls", "mean")


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

    vocab_size: int  # input_ids < vocab_size
    num_region_classes: int  # detector classes: the last dim of region_soft_labels
    region_dim: int = 64  # D of region_feats (fusionlib.vision's default; UNITER: 2048)
    location_dim: int = 7  # 7 reads region_loc7 (UNITER); 5 reads region_loc5
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ffn_size: int | None = None  # None: 4 * hidden_size
    dropout: float = 0.1
    attention_dropout: float | None = None  # None: same as dropout
    max_text_len: int = 40  # learned text positions
    word_order: bool = True  # False: no position embeddings, the text a bag of words (chapter 5)
    initializer_range: float | None = (
        0.02  # BERT/UNITER init: N(0, 0.02) matrices; None: PyTorch's defaults
    )
    pad_token_id: int = 0
    mask_token_id: int = 4
    special_token_ids: tuple[int, ...] = (0, 1, 2, 3, 4)  # never masked, never a random replacement
    region_mask_embedding: bool = True  # add UNITER's learned [MASK] feature to masked regions
    # Pretraining (pretraining_step):
    masking: str = "conditional"  # "conditional" (UNITER: one modality per task) | "joint"
    mask_probability: float = 0.15  # of tokens (MLM) / regions (MRM), at least one always
    grounded_word_ids: tuple[int, ...] = ()  # words MLM chooses at a chance of their own
    grounded_word_probability: float | None = None  # (fusionlib.masking.mask_tokens; chapter 5)
    region_zero_fraction: float = (
        1.0  # of masked regions, the share zeroed (UNITER 1.0, ViLBERT 0.9)
    )
    itm_negative_probability: float = 0.5  # chance an ITM pair becomes a negative
    itm_negatives: str = (
        "false"  # "false": another image the caption is false of (fusionlib.itm, the
    )
    # synthetic world) | "random": any other image (UNITER)
    hard_negative_share: float = (
        0.0  # of the negatives, the share that keep the image and get a minimal
    )
    # edit of the caption (needs CaptionDataset(edits=E))
    hard_negative_kinds: tuple[str, ...] = (
        itm.EDIT_KINDS
    )  # which kinds of edit (fusionlib.data.truth.EDIT_KINDS)
    use_wra: bool = True  # add word-region alignment to ITM steps
    wra_weight: float = losses.WRA_WEIGHT  # 0.1, UNITER's --itm_ot_lambda
    ot_beta: float = 0.5  # IPOT step size
    ot_iterations: int = 50  # IPOT steps
    mrc_background_class: int | None = (
        None  # MRC never targets this class (fusionlib's detector: the last)
    )
    # Downstream:
    num_answers: int | None = None  # UniterForVQA: size of the answer vocabulary
    vqa_pooling: str = (
        "cls"  # UniterForVQA reads "cls" (the pooled [CLS], UNITER) | "mean" (of the words)
    )

    # What a task model may set differently from the encoder it starts from (vl_base.load_encoder): the heads,
    # the pretraining tasks and the dropouts, nothing that shapes or moves the encoder's weights.
    task_fields: ClassVar[tuple[str, ...]] = (
        "dropout",
        "attention_dropout",
        "initializer_range",
        "pad_token_id",
        "mask_token_id",
        "special_token_ids",
        "masking",
        "mask_probability",
        "grounded_word_ids",
        "grounded_word_probability",
        "region_zero_fraction",
        "itm_negative_probability",
        "itm_negatives",
        "hard_negative_share",
        "hard_negative_kinds",
        "use_wra",
        "wra_weight",
        "ot_beta",
        "ot_iterations",
        "mrc_background_class",
        "num_answers",
        "vqa_pooling",
    )

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "num_region_classes",
            "region_dim",
            "hidden_size",
            "num_layers",
            "num_heads",
            "max_text_len",
            "ot_iterations",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.ffn_size is not None and (not isinstance(self.ffn_size, int) or self.ffn_size <= 0):
            raise ValueError(
                f"ffn_size must be a positive int or None (4 * hidden_size), got {self.ffn_size!r}"
            )
        if self.location_dim not in LOCATION_KEYS:
            raise ValueError(
                f"location_dim must be 7 (region_loc7, UNITER) or 5 (region_loc5), "
                f"got {self.location_dim!r}"
            )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.initializer_range is not None and not self.initializer_range > 0:
            raise ValueError(
                f"initializer_range must be positive or None, got {self.initializer_range!r}"
            )
        # JSON gives lists back; keep the tuple (frozen dataclass, hence object.__setattr__).
        object.__setattr__(self, "special_token_ids", tuple(self.special_token_ids))
        for name in ("pad_token_id", "mask_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name} must be an int in [0, vocab_size={self.vocab_size}), got {value!r}"
                )
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in self.special_token_ids):
            raise ValueError(
                f"special_token_ids must be ints in [0, vocab_size={self.vocab_size}), "
                f"got {self.special_token_ids!r}"
            )
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")
        if not 0.0 < self.mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in (0, 1], got {self.mask_probability!r}")
        if not isinstance(self.word_order, bool):
            raise ValueError(f"word_order must be a bool, got {self.word_order!r}")
        object.__setattr__(
            self,
            "grounded_word_ids",
            masking.check_grounded_words(
                self.grounded_word_ids,
                self.grounded_word_probability,
                self.vocab_size,
            ),
        )
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
            or not 0 <= self.mrc_background_class < self.num_region_classes
        ):
            raise ValueError(
                f"mrc_background_class must be None or an int in [0, num_region_classes="
                f"{self.num_region_classes}), got {self.mrc_background_class!r}"
            )
        if self.num_answers is not None and (
            not isinstance(self.num_answers, int) or self.num_answers <= 0
        ):
            raise ValueError(
                f"num_answers must be None or a positive int, got {self.num_answers!r}"
            )
        if self.vqa_pooling not in VQA_POOLINGS:
            raise ValueError(f"vqa_pooling must be one of {VQA_POOLINGS}, got {self.vqa_pooling!r}")
        # JSON gives a list back; keep the tuple (frozen dataclass, hence object.__setattr__).
        object.__setattr__(
            self,
            "hard_negative_kinds",
            itm.check_settings(
                self.itm_negatives,
                self.hard_negative_share,
                self.hard_negative_kinds,
                names=itm.CONFIG_NAMES,
            ),
        )

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
        return cls(
            vocab_size=vocab_size,
            num_region_classes=num_region_classes,
            **{"hidden_size": 128, "num_layers": 4, "num_heads": 4, "ffn_size": 512, **changes},
        )

    @classmethod
    def paper_base(cls, **changes: Any) -> "UniterConfig":
        """UNITER-base as published: 768 hidden, 12 layers, 12 heads, FFN 3072, 512 text positions,
        bert-base-cased's 28,996-word vocabulary (``[PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103``),
        2048-d region features, 1601 detector classes."""
        return cls(
            **{
                "vocab_size": 28996,
                "num_region_classes": 1601,
                "region_dim": 2048,
                "hidden_size": 768,
                "num_layers": 12,
                "num_heads": 12,
                "ffn_size": 3072,
                "max_text_len": 512,
                "pad_token_id": 0,
                "mask_token_id": 103,
                "special_token_ids": (0, 100, 101, 102, 103),
                **changes,
            }
        )


def _region_inputs(
    batch: Mapping[str, Any], config: UniterConfig, batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    return region_inputs(batch, batch_size, config.region_dim, config.location_dim)


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
        return self.sequence[:, self.num_text :]

    def text_to_region(self, layer: int = -1) -> Tensor:
        """``(batch, heads, T, R)``: how much each word attends to each region in ``layer``.

        The text-to-region block of the full map. Each word's row of the full
        map sums to 1 over words *and* regions, so a row of this block sums to
        the share of attention that word gave the image.
        """
        if self.attentions is None:
            raise ValueError("no attention maps: call the model with need_weights=True")
        return self.attentions[layer][:, :, : self.num_text, self.num_text :]

    def region_to_text(self, layer: int = -1) -> Tensor:
        """``(batch, heads, R, T)``: how much each region attends to each word in ``layer``."""
        if self.attentions is None:
            raise ValueError("no attention maps: call the model with need_weights=True")
        return self.attentions[layer][:, :, self.num_text :, : self.num_text]


@register_model("uniter")
class UniterModel(VisionLanguageModel):
    """The UNITER encoder: embeddings, one transformer over ``[text; regions]``, the pooler (chapter 6).

    ``forward(batch, need_weights=False)`` -> :class:`UniterOutput`. The batch
    may carry ``region_zeroed (batch, regions) bool``: those regions' features
    are replaced by the learned ``[MASK]`` feature (masked region modelling).
    :meth:`encode` takes the tensors directly.
    """

    config_class = UniterConfig
    encoder_attr = "uniter"

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        H = config.hidden_size
        self.text_embeddings = TextEmbeddings(
            config.vocab_size,
            H,
            config.max_text_len,
            type_vocab_size=2,
            dropout=config.dropout,
            pad_token_id=config.pad_token_id,
            positions=config.word_order,
        )
        self.image_embeddings = UniterImageEmbeddings(
            config.region_dim,
            H,
            config.location_dim,
            dropout=config.dropout,
            mask_embedding=config.region_mask_embedding,
        )
        self.layers = nn.ModuleList(
            TransformerLayer(
                H, config.num_heads, config.ffn_size, config.dropout, config.attention_dropout
            )
            for _ in range(config.num_layers)
        )
        self.pooler = nn.Linear(H, H)
        self.init_weights()

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        region_feats: Tensor,
        region_loc: Tensor,
        region_mask: Tensor,
        region_zeroed: Tensor | None = None,
        need_weights: bool = False,
    ) -> UniterOutput:
        """``input_ids (B, T)``, ``attention_mask (B, T)`` bool, ``region_feats (B, R, D)``,
        ``region_loc (B, R, location_dim)``, ``region_mask (B, R)`` bool,
        ``region_zeroed (B, R)`` bool or None -> :class:`UniterOutput`."""
        text = self.text_embeddings(input_ids)  # type 0: (B, T, H)
        B, R = region_feats.shape[:2]
        # Regions are token type 1 of the *text* table, as in UNITER (one table for both modalities).
        image_type = torch.ones(B, R, dtype=torch.long, device=region_feats.device)
        regions = self.image_embeddings(
            region_feats,
            region_loc,
            self.text_embeddings.token_type_embeddings(image_type),
            region_zeroed,
        )
        x = torch.cat([text, regions], dim=1)  # (B, T + R, H)
        mask = torch.cat([attention_mask, region_mask], dim=1)  # (B, T + R)
        maps: list[Tensor] = []
        for layer in self.layers:
            x, weights = layer(x, mask, need_weights=need_weights)
            if weights is not None:
                maps.append(weights)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # [CLS] is text position 0
        return UniterOutput(x, pooled, mask, input_ids.shape[1], maps if need_weights else None)

    def forward(self, batch: Mapping[str, Any], need_weights: bool = False) -> UniterOutput:
        ids, text_mask = text_inputs(batch)
        feats, loc, region_mask = _region_inputs(batch, self.config, ids.shape[0])
        zeroed = optional_bool(batch, "region_zeroed", tuple(region_mask.shape))
        return self.encode(
            ids, text_mask, feats, loc, region_mask, zeroed, need_weights=need_weights
        )


# ---------------------------------------------------------------------------
# Pretraining heads
# ---------------------------------------------------------------------------


def word_region_alignment(
    output: UniterOutput,
    attention_mask: Tensor,
    region_mask: Tensor,
    beta: float = 0.5,
    iterations: int = 50,
) -> tuple[Tensor, Tensor]:
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
        ~(attention_mask[:, :, None] & region_mask[:, None, :]), 0.0
    )
    plan = losses.ipot(cost, attention_mask, region_mask, beta=beta, iterations=iterations)
    distance = losses.ot_distance(text, regions, attention_mask, region_mask, plan=plan)
    return distance, plan


@register_model("uniter_pretraining")
class UniterForPretraining(VisionLanguagePretraining):
    """UNITER with its pretraining heads: MLM, MRFR, MRC / MRC-kl, ITM (+ WRA) (chapter 6).

    ``forward(batch, task=None, *, need_weights=False)`` ->
    :class:`~fusionlib.models.vl_base.PretrainingOutput` with the heads
    ``task`` needs (``None``: all of them): ``"mlm"`` -> ``mlm_logits`` at
    every text position; ``"mrfr"`` -> ``mrfr_features``; ``"mrc"`` /
    ``"mrc_kl"`` -> ``mrc_logits`` (one head, two losses); ``"itm"`` ->
    ``itm_logits`` on the pooled ``[CLS]``, and with ``config.use_wra`` the
    ``wra_distance`` of :func:`word_region_alignment`. Losses are
    :func:`pretraining_step`'s (UNITER's own code also computes them outside
    the model, in ``pretrain.py``).

    :meth:`itm_logits` ``(batch) -> (batch, 2)`` scores pairs (class 1 = match);
    its match logit is the retrieval score (:func:`pair_scores`).
    """

    config_class = UniterConfig
    encoder_class = UniterModel

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        self.uniter = UniterModel(config)
        H = config.hidden_size
        self.mlm_head = TiedMLMHead(self.uniter.text_embeddings.word_embeddings)
        # UNITER's decoder starts as PyTorch's nn.Linear(H, vocab) does, its weight then replaced by the word
        # table: its bias is what initializer_range=None keeps, and drawing that layer keeps every seeded UNITER
        # the model of the runs committed with chapters 6 and 6b.
        with torch.no_grad():
            self.mlm_head.decoder.bias.copy_(nn.Linear(H, config.vocab_size).bias)
        self.mrfr_head = RegionFeatureRegressionHead(H, self.uniter.image_embeddings.img_linear)
        self.mrc_head = RegionClassificationHead(H, config.num_region_classes)
        self.itm_head = ITMHead(H)
        self.init_weights()  # the whole model again, encoder included, as UNITER's UniterForPretraining

    @property
    def image_keys(self) -> tuple[str, ...]:
        return ("region_feats", self.config.location_key, "region_mask")

    def itm_logits(self, batch: Mapping[str, Any]) -> Tensor:
        """``(batch, 2)`` image-text matching logits (class 1 = the pair matches)."""
        return self.itm_head(self.uniter(batch).pooled)

    def word_region_attention(self, batch: Mapping[str, Any]) -> list[Tensor]:
        """``(B, heads, T, R)`` per layer: the text-to-region block of each joint attention map."""
        out = self.uniter(batch, need_weights=True)
        return [out.text_to_region(layer) for layer in range(len(out.attentions))]

    def retrieval_score(self, batch: Mapping[str, Any]) -> Tensor:
        """``(batch,)``: the match logit, the row UNITER copies into its retrieval head
        (``model/itm.py: init_output``)."""
        return self.itm_logits(batch)[:, 1]

    def forward(
        self, batch: Mapping[str, Any], task: str | None = None, *, need_weights: bool = False
    ) -> PretrainingOutput:
        if task is not None and task not in PRETRAINING_TASKS:
            raise ValueError(
                f"task must be one of {PRETRAINING_TASKS} or None (every head), got {task!r}"
            )
        out = self.uniter(batch, need_weights=need_weights)
        heads: dict[str, Tensor] = {}
        if task in ("mlm", None):
            # Logits at every position, not only the masked ones as UNITER gathers: the vocabulary is
            # small here, and fixed shapes keep torch.compile from recompiling for every mask count.
            heads["mlm_logits"] = self.mlm_head(out.text)
        if task in ("mrfr", None):
            heads["mrfr_features"] = self.mrfr_head(out.regions)
        if task in ("mrc", "mrc_kl", None):
            heads["mrc_logits"] = self.mrc_head(out.regions)
        if task in ("itm", None):
            heads["itm_logits"] = self.itm_head(out.pooled)
            if self.config.use_wra:
                heads["wra_distance"], _ = word_region_alignment(
                    out,
                    get_tensor(batch, "attention_mask"),
                    get_tensor(batch, "region_mask"),
                    self.config.ot_beta,
                    self.config.ot_iterations,
                )
        return PretrainingOutput(**heads, encoder=out)


@register_model("uniter_vqa")
class UniterForVQA(VisionLanguageModel):
    """UNITER fine-tuned for VQA: ``Linear(H, 2H) -> GELU -> LN -> Linear(num_answers)`` on the pooled
    ``[CLS]`` (UNITER's ``vqa_output``; chapter 6), or, with ``config.vqa_pooling="mean"``, on the mean
    of the real words' outputs.

    The mean is chapter 3's pooling: a word that found its region carries it straight to the answer
    instead of first handing it to ``[CLS]``; chapter 6 says what that changed on our world.

    ``forward(batch, need_weights=False)`` -> ``logits (batch, num_answers)``, or
    ``(logits, UniterOutput)`` with ``need_weights=True`` (attention maps in it).
    Build it from a pretrained encoder with :meth:`from_encoder` (``num_answers=...``);
    train it with :func:`~fusionlib.models.vl_base.vqa_step`.
    """

    config_class = UniterConfig
    encoder_class = UniterModel

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        if config.num_answers is None:
            raise ValueError(
                "UniterForVQA needs config.num_answers (the answer vocabulary size), got None"
            )
        self.uniter = UniterModel(config)
        H = config.hidden_size
        self.vqa_head = nn.Sequential(
            nn.Linear(H, 2 * H),
            nn.GELU(),
            nn.LayerNorm(2 * H, eps=LAYER_NORM_EPS),
            nn.Linear(2 * H, config.num_answers),
        )
        self.init_weights()

    def forward(
        self, batch: Mapping[str, Any], need_weights: bool = False
    ) -> Tensor | tuple[Tensor, UniterOutput]:
        out = self.uniter(batch, need_weights=need_weights)
        if self.config.vqa_pooling == "mean":
            pooled = masked_mean(out.text, out.mask[:, : out.num_text])  # (batch, H)
        else:
            pooled = out.pooled  # (batch, H)
        logits = self.vqa_head(pooled)
        return (logits, out) if need_weights else logits


# ---------------------------------------------------------------------------
# Pretraining by task sampling
# ---------------------------------------------------------------------------


def prepare_pretraining_batch(
    batch: Mapping[str, Any],
    task: str,
    config: UniterConfig,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
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
        pairs = itm.draw_pairs(
            batch,
            generator,
            config.itm_negative_probability,
            config.itm_negatives,
            config.hard_negative_share,
            swap="image",
            hard_kinds=config.hard_negative_kinds,
        )
        partner = pairs.partner.to(feats.device)
        for key in (
            "region_feats",
            "region_boxes",
            "region_loc5",
            "region_loc7",
            "region_mask",
            "region_soft_labels",
            "image_feats",
            "image_index",
            "image_objects",
        ):
            if key in batch and isinstance(batch[key], Tensor):
                out[key] = batch[key].index_select(0, partner.to(batch[key].device))
        if bool(
            (pairs.edit >= 0).any()
        ):  # hard negatives: same image, one thing of the caption changed
            out["input_ids"], out["attention_mask"] = itm.edit_texts(
                ids, text_mask, batch, pairs.edit, config.pad_token_id
            )
            no_text = torch.full_like(out["input_ids"], masking.IGNORE_INDEX)
        out.update(
            itm_labels=pairs.labels.to(ids.device),
            mlm_labels=no_text,
            region_masked=no_regions,
            region_zeroed=no_regions,
            text_masked=nobody,
            image_masked=nobody,
        )
        return out

    maskable = masking.maskable_tokens(ids, text_mask, config.special_token_ids)
    settings = dict(
        mask_token_id=config.mask_token_id,
        vocab_size=config.vocab_size,
        generator=generator,
        special_ids=config.special_token_ids,
        probability=config.mask_probability,
        grounded_ids=config.grounded_word_ids,
        grounded_probability=config.grounded_word_probability,
    )
    if config.masking == "joint" and R > 0:
        m = masking.joint_masking(
            ids, maskable, region_mask, zero_fraction=config.region_zero_fraction, **settings
        )
        out.update(
            input_ids=m.input_ids,
            mlm_labels=m.labels,
            region_masked=m.region_masked,
            region_zeroed=m.region_zeroed,
            text_masked=m.text_masked,
            image_masked=m.image_masked,
        )
    elif (
        task == "mlm" or config.masking == "joint"
    ):  # words only, the image intact (or has no slots)
        tokens = masking.mask_tokens(ids, maskable, **settings)
        out.update(
            input_ids=tokens.inputs,
            mlm_labels=tokens.labels,
            region_masked=no_regions,
            region_zeroed=no_regions,
            text_masked=maskable.any(dim=1),
            image_masked=nobody,
        )
    else:  # conditional: regions only, the sentence intact
        if R == 0:  # no region slots at all: nothing to mask
            regions = masking.RegionMasking(masked=no_regions, zeroed=no_regions)
        else:
            regions = masking.mask_regions(
                region_mask,
                generator,
                probability=config.mask_probability,
                zero_fraction=config.region_zero_fraction,
            )
        out.update(
            mlm_labels=no_text,
            region_masked=regions.masked,
            region_zeroed=regions.zeroed,
            text_masked=nobody,
            image_masked=region_mask.any(dim=1),
        )
    out["itm_labels"] = torch.ones(
        B, dtype=torch.long, device=ids.device
    )  # MLM / MRM: matched pairs only
    return out


def pretraining_step(
    model: nn.Module, batch: Mapping[str, Any], task: str, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """One UNITER pretraining step: mask / pair the batch for ``task``, return the task's loss.

    The ``step_fn`` of :func:`fusionlib.train.train`, which samples the task::

        train(model, pretraining_loaders(dataset, 64), config, pretraining_step, task_mix=UNITER_TASK_MIX)

    ``model`` is a :class:`UniterForPretraining` (or its ``torch.compile``d
    wrapper). With ``generator=None`` the masks and negatives are drawn from a
    generator seeded by the global RNG, which :func:`~fusionlib.train.train`
    seeds and checkpoints (exact resumption); pass a generator to replay a step
    on its own.

    Returns :func:`~fusionlib.models.vl_base.pretraining_losses` of the task:
    ``{"loss", "<task>_loss"}``, with ``mlm_accuracy`` on MLM steps and
    ``itm_accuracy`` on ITM steps, whose ``loss`` is
    ``itm_loss + wra_weight * wra_loss`` when ``config.use_wra``.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, UniterConfig):
        raise TypeError(f"model must be a UniterForPretraining, got {type(model).__name__}")
    prepared = prepare_pretraining_batch(batch, task, config, generator)
    tasks = (task, "wra") if task == "itm" and config.use_wra else (task,)
    return pretraining_losses(
        model(prepared, task),
        prepared,
        tasks,
        weights={"wra": config.wra_weight},
        mrc_background_class=config.mrc_background_class,
    )


def pretraining_loaders(
    dataset: Any,
    batch_size: int,
    tasks: Mapping[str, float] | tuple[str, ...] = UNITER_TASK_MIX,
    seed: int = 0,
    **loader_kwargs: Any,
) -> dict[str, Any]:
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
    return {
        t: make_loader(dataset, batch_size, seed=seed + i, **loader_kwargs)
        for i, t in enumerate(names)
    }
