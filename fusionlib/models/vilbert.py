"""ViLBERT: two streams, one for words and one for regions, joined by co-attention (chapter 5).

Lu et al., "ViLBERT: Pretraining Task-Agnostic Visiolinguistic Representations
for Vision-and-Language Tasks" (NeurIPS 2019); code: facebookresearch/vilbert-multi-task
and jiasenlu/vilbert_beta. Where the book's first source got ViLBERT wrong,
``book/errata.md`` says so.

The architecture
----------------

* **Text stream**: BERT. :class:`~fusionlib.embeddings.TextEmbeddings` and
  ``text_num_layers`` post-LN :class:`~fusionlib.layers.TransformerLayer` s
  (768 wide, 12 layers, 12 heads in the paper). Its weights can come from a
  real BERT checkpoint: :func:`load_text_stream_from_bert`.
* **Visual stream**: :class:`~fusionlib.embeddings.RegionEmbeddings`
  (``LayerNorm(Linear(feat) + Linear(loc5))``, dropout) over an ``[IMG]``
  token followed by the regions, then its own transformer layers (1024 wide,
  6 layers, 8 heads, FFN 1024 in the paper). ``[IMG]`` is the mean region
  feature at location ``[0, 0, 1, 1, 1]`` (the whole image), so visual
  position 0 summarises the image as ``[CLS]`` does the caption.
* **Co-attention** (:class:`~fusionlib.layers.CoAttentionLayer`, "co-TRM"):
  words attend over regions and regions over words, in a shared
  ``bi_hidden_size`` space. The schedule is the paper's pair of index lists
  ``text_layer_ids`` / ``visual_layer_ids`` (vilbert-multi-task's
  ``t_biattention_id`` / ``v_biattention_id``): co-TRM ``k`` runs once the
  first ``text_layer_ids[k]`` text layers and the first
  ``visual_layer_ids[k]`` visual layers have run; whatever layers are left
  run after the last co-TRM (visual first, then text, as in ``BertEncoder``).
  The base model, ``t = [6..11]``, ``v = [0..5]``, gives::

      T0 T1 T2 T3 T4 T5 C0 | T6 V0 C1 | T7 V1 C2 | T8 V2 C3 | T9 V3 C4 | T10 V4 C5 | V5 T11

  six text layers alone, then blocks of (text, visual, co-TRM): 12 text,
  6 visual and 6 co-TRM layers (:func:`layer_schedule`).
* **Pooling**: ``pooled_text = ReLU(W_t h_[CLS])``, ``pooled_visual = ReLU(W_v h_[IMG])``,
  both ``bi_hidden_size`` wide.

Heads and training
------------------

:class:`ViLBERTForPretraining` adds the three pretraining heads of
:mod:`fusionlib.models.vl_base`, named as UNITER names the same tasks:
masked language modelling tied to the word embeddings (``mlm``), masked
region modelling as KL to the detector's class distribution on the *visual*
stream (the paper's MRM; ``mrc_kl``), and image-text alignment by
``Linear(dropout(pooled_text * pooled_visual))`` (``itm``).
:func:`pretraining_step` masks, samples negatives and sums the three losses
(returning ``loss``, ``<task>_loss``, ``mlm_accuracy`` and ``itm_accuracy``,
the rule of :mod:`~fusionlib.models.vl_base`); :class:`ViLBERTForVQA`
answers questions from the same product;
:meth:`ViLBERTForPretraining.retrieval_score` and :func:`pair_scores` rank
image-caption pairs with the alignment head. :meth:`ViLBERTForVQA.from_encoder`
starts fine-tuning from a pretrained encoder.

Batch keys read (see :mod:`fusionlib.data.datasets`): ``input_ids``,
``attention_mask``, ``region_feats``, ``region_loc5``, ``region_mask``,
``image_feats`` (and ``token_type_ids`` if present); pretraining also reads
``region_soft_labels`` and ``image_index``, VQA training ``answer``.

ITM labels follow :mod:`fusionlib.losses`: 1 = the caption matches the image
(ViLBERT's code uses 0 for "is next", BERT's convention; only the naming
differs).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from fusionlib import itm, runtime
from fusionlib.embeddings import RegionEmbeddings, TextEmbeddings
from fusionlib.layers import LAYER_NORM_EPS, CoAttentionLayer, TransformerLayer, masked_mean
from fusionlib.losses import IGNORE_INDEX
from fusionlib.masking import (
    apply_region_mask,
    check_grounded_words,
    mask_regions,
    mask_tokens,
    maskable_tokens,
)
from fusionlib.models.batch import LOCATION_KEYS, get_tensor, region_inputs, text_inputs
from fusionlib.models.io import ModelConfig, register_model
from fusionlib.models.vl_base import (
    ITMHead,
    PretrainingOutput,
    RegionClassificationHead,
    TiedMLMHead,
    VisionLanguageModel,
    VisionLanguagePretraining,
    encoder_of,
    load_encoder,
    pair_scores,
    pretraining_losses,
    vqa_step,
)

__all__ = [
    "ViLBERTConfig",
    "ViLBERT",
    "ViLBERTOutput",
    "ViLBERTAttentions",
    "ViLBERTForPretraining",
    "PretrainingOutput",
    "ViLBERTForVQA",
    "PretrainingInputs",
    "layer_schedule",
    "prepare_pretraining_inputs",
    "pretraining_step",
    "vqa_step",
    "pair_scores",
    "load_encoder",
    "load_text_stream_from_bert",
    "IMG_LOCATION",
    "PRETRAINING_TASKS",
    "STANDARDISED_IMG_LOCATION",
]

IMG_LOCATION = (0.0, 0.0, 1.0, 1.0, 1.0)  # the [IMG] token's box: the whole image, area 1
# With z-scored region_loc5 (chapter 5) [IMG] sits at the origin, the mean region's box. The whole image's box
# cannot simply be z-scored with the regions' statistics: objects all have about the same size, so its area
# lands hundreds of standard deviations out (479 in chapter 5) and swamps the embedding. Left
# raw among z-scored boxes it is one more box near the middle, and a ViLBERT trained from scratch then never
# learned "is it on the left?" (left/top 0.49-0.52); at the origin it did (0.82 / 0.67 after 1,200 steps of 128).
STANDARDISED_IMG_LOCATION = (0.0, 0.0, 0.0, 0.0, 0.0)
PRETRAINING_TASKS = (
    "mlm",
    "mrc_kl",
    "itm",
)  # the paper's MLM, MRM (KL to the detector) and alignment
_ALL_TASKS = (None, "train", "all", "pretrain")  # task names meaning "all three losses, summed"
VQA_POOLINGS = ("product", "mean")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of ints, got {value!r}")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise ValueError(f"{name} must be a list of ints, got {value!r}")
    return out


@dataclasses.dataclass(frozen=True)
class ViLBERTConfig(ModelConfig):
    """Every size of a ViLBERT; the defaults are the book's small model (chapter 5).

    :meth:`paper_base` is the paper's base configuration
    (``bert_base_6layer_6conect.json`` in vilbert-multi-task); :meth:`small`
    the book's. ``text_layer_ids`` / ``visual_layer_ids`` are the paper's
    ``t_biattention_id`` / ``v_biattention_id`` (see :func:`layer_schedule`).
    """

    vocab_size: int  # tokenizer vocabulary (input_ids < vocab_size)
    num_region_classes: int  # detector classes C: the MRM target region_soft_labels (B, R, C)
    region_dim: int = 64  # D of region_feats (paper: 2048 Faster R-CNN features)
    location_dim: int = 5  # ViLBERT's [x1/W, y1/H, x2/W, y2/H, area] (batch key region_loc5)
    text_hidden_size: int = 128  # paper: 768 (BERT-base)
    text_num_layers: int = 4  # paper: 12
    text_num_heads: int = 4  # paper: 12
    text_ffn_size: int = 512  # paper: 3072
    visual_hidden_size: int = 128  # paper: 1024
    visual_num_layers: int = 2  # paper: 6
    visual_num_heads: int = 4  # paper: 8
    visual_ffn_size: int = 256  # paper: 1024
    bi_hidden_size: int = 128  # shared co-attention width; paper: 1024
    bi_num_heads: int = 4  # paper: 8
    text_layer_ids: tuple[int, ...] = (2, 3)  # t_biattention_id; paper: (6, 7, 8, 9, 10, 11)
    visual_layer_ids: tuple[int, ...] = (0, 1)  # v_biattention_id; paper: (0, 1, 2, 3, 4, 5)
    dropout: float = 0.1
    attention_dropout: float | None = None  # None: same as dropout
    max_text_len: int = 40  # learned positions; paper: 512 (BERT's table)
    type_vocab_size: int = 2
    pad_token_id: int = 0  # fusionlib's tokenizer: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
    mask_token_id: int = 4
    special_token_ids: tuple[int, ...] = (0, 1, 2, 3, 4)  # never masked, never a random replacement
    grounded_word_ids: tuple[int, ...] = ()  # words MLM chooses at a chance of their own
    grounded_word_probability: float | None = None  # (fusionlib.masking.mask_tokens; chapter 5)
    location_layers: int = 1  # 1: ViLBERT's Linear(loc5); 2: an MLP (fusionlib.embeddings)
    word_order: bool = True  # False: no position embeddings, the text a bag of words (chapter 5)
    img_location: tuple[float, ...] = (
        IMG_LOCATION  # the [IMG] token's loc5, in the units of region_loc5
    )
    # (standardised inputs: STANDARDISED_IMG_LOCATION)
    layer_norm_eps: float = LAYER_NORM_EPS  # BERT's 1e-12
    initializer_range: float = 0.02  # BERT's N(0, 0.02) initialisation
    num_answers: int = 0  # ViLBERTForVQA's answer vocabulary (0: no VQA head)
    classifier_dropout: float = 0.5  # inside the VQA classifier, as ViLBERT's SimpleClassifier
    vqa_pooling: str = "product"  # ViLBERTForVQA reads "product" (pooled [CLS] * pooled [IMG], the
    # paper) | "mean" (of the words' outputs, chapter 3's pooling)
    itm_negatives: str = "false"  # ITM negatives (fusionlib.itm): "false" (judged false, the
    # synthetic world) | "random" (any other caption, the paper)
    hard_negative_share: float = (
        0.0  # of the negatives, the share that are minimal edits of the caption
    )
    hard_negative_kinds: tuple[str, ...] = (
        itm.EDIT_KINDS
    )  # which kinds of edit (fusionlib.data.truth.EDIT_KINDS)

    # What a task model may set differently from the encoder it starts from (vl_base.load_encoder).
    task_fields: ClassVar[tuple[str, ...]] = (
        "dropout",
        "attention_dropout",
        "classifier_dropout",
        "num_answers",
        "vqa_pooling",
        "initializer_range",
        "pad_token_id",
        "mask_token_id",
        "special_token_ids",
        "grounded_word_ids",
        "grounded_word_probability",
    )

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "num_region_classes",
            "region_dim",
            "text_hidden_size",
            "text_num_layers",
            "text_num_heads",
            "text_ffn_size",
            "visual_hidden_size",
            "visual_num_layers",
            "visual_num_heads",
            "visual_ffn_size",
            "bi_hidden_size",
            "bi_num_heads",
            "max_text_len",
            "type_vocab_size",
        ):
            _positive_int(name, getattr(self, name))
        if self.location_dim != 5:
            raise ValueError(
                f"location_dim must be 5 (ViLBERT's [x1/W, y1/H, x2/W, y2/H, area], with [IMG] at "
                f"{list(IMG_LOCATION)}), got {self.location_dim!r}"
            )
        for width, heads in (
            ("text_hidden_size", "text_num_heads"),
            ("visual_hidden_size", "visual_num_heads"),
            ("bi_hidden_size", "bi_num_heads"),
        ):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(
                    f"{heads}={getattr(self, heads)} must divide {width}={getattr(self, width)}"
                )
        # Lists from JSON become tuples: the config stays hashable and immutable.
        for name in ("text_layer_ids", "visual_layer_ids", "special_token_ids"):
            object.__setattr__(self, name, _int_tuple(name, getattr(self, name)))
        if len(self.text_layer_ids) != len(self.visual_layer_ids):
            raise ValueError(
                f"text_layer_ids and visual_layer_ids must have one entry per co-attention layer, "
                f"got {len(self.text_layer_ids)} and {len(self.visual_layer_ids)}: "
                f"{list(self.text_layer_ids)}, {list(self.visual_layer_ids)}"
            )
        for name, ids, count, count_name in (
            ("text_layer_ids", self.text_layer_ids, self.text_num_layers, "text_num_layers"),
            (
                "visual_layer_ids",
                self.visual_layer_ids,
                self.visual_num_layers,
                "visual_num_layers",
            ),
        ):
            if any(not 0 <= i <= count for i in ids):
                raise ValueError(
                    f"{name} must hold layer counts in [0, {count_name}={count}], got {list(ids)}"
                )
            if any(b < a for a, b in zip(ids, ids[1:])):
                raise ValueError(
                    f"{name} must be non-decreasing (co-TRM k runs after the first ids[k] layers), "
                    f"got {list(ids)}"
                )
        for name in ("dropout", "classifier_dropout") + (
            ("attention_dropout",) if self.attention_dropout is not None else ()
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0.0 <= value < 1.0
            ):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        for name in ("pad_token_id", "mask_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name} must be an int in [0, vocab_size={self.vocab_size}), got {value!r}"
                )
        if not isinstance(self.word_order, bool):
            raise ValueError(f"word_order must be a bool, got {self.word_order!r}")
        object.__setattr__(
            self,
            "grounded_word_ids",
            check_grounded_words(
                self.grounded_word_ids, self.grounded_word_probability, self.vocab_size
            ),
        )
        if any(not 0 <= i < self.vocab_size for i in self.special_token_ids):
            raise ValueError(
                f"special_token_ids must lie in [0, vocab_size={self.vocab_size}), "
                f"got {list(self.special_token_ids)}"
            )
        box = self.img_location
        if (
            not isinstance(box, (tuple, list))
            or len(box) != 5
            or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in box
            )
        ):
            raise ValueError(f"img_location must be 5 finite floats (a loc5 box), got {box!r}")
        object.__setattr__(
            self, "img_location", tuple(float(v) for v in box)
        )  # a JSON list comes back a tuple
        if self.location_layers not in (1, 2):
            raise ValueError(
                f"location_layers must be 1 (ViLBERT's Linear) or 2 (an MLP), "
                f"got {self.location_layers!r}"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range must be positive, got {self.initializer_range!r}")
        if (
            not isinstance(self.num_answers, int)
            or isinstance(self.num_answers, bool)
            or self.num_answers < 0
        ):
            raise ValueError(
                f"num_answers must be an int >= 0 (0: no VQA head), got {self.num_answers!r}"
            )
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
        if self.vqa_pooling not in VQA_POOLINGS:
            raise ValueError(f"vqa_pooling must be one of {VQA_POOLINGS}, got {self.vqa_pooling!r}")

    @property
    def num_co_layers(self) -> int:
        return len(self.text_layer_ids)

    @property
    def location_key(self) -> str:
        """The batch key of the region locations: ``region_loc5``."""
        return LOCATION_KEYS[self.location_dim]

    @classmethod
    def paper_base(cls, **changes: Any) -> "ViLBERTConfig":
        """The paper's base model: BERT-base text stream, 6 visual layers of 1024, 6 co-TRM layers.

        vilbert-multi-task's ``config/bert_base_6layer_6conect.json``: 2048-d
        Faster R-CNN features, 1601 Visual Genome classes, BERT's uncased
        vocabulary (30522) and its 512 positions.
        """
        base = dict(
            vocab_size=30522,
            num_region_classes=1601,
            region_dim=2048,
            text_hidden_size=768,
            text_num_layers=12,
            text_num_heads=12,
            text_ffn_size=3072,
            visual_hidden_size=1024,
            visual_num_layers=6,
            visual_num_heads=8,
            visual_ffn_size=1024,
            bi_hidden_size=1024,
            bi_num_heads=8,
            text_layer_ids=(6, 7, 8, 9, 10, 11),
            visual_layer_ids=(0, 1, 2, 3, 4, 5),
            max_text_len=512,
            pad_token_id=0,
            mask_token_id=103,
            special_token_ids=(0, 100, 101, 102, 103),
        )
        return cls(**{**base, **changes})

    @classmethod
    def small(cls, vocab_size: int, num_region_classes: int, **changes: Any) -> "ViLBERTConfig":
        """A small model on the base model's pattern: text 128 x 4 layers x 4 heads, visual 128 x 2 layers,
        co-attention 128 x 4 heads, 2 co-TRM layers (two text layers alone, then (text, visual, co-TRM) blocks)::

            T0 T1 C0 | T2 V0 C1 | V1 T3
        """
        return cls(vocab_size=vocab_size, num_region_classes=num_region_classes, **changes)

    @classmethod
    def co_attention_first(
        cls, vocab_size: int, num_region_classes: int, **changes: Any
    ) -> "ViLBERTConfig":
        """The book's model (chapters 5 and 6): :meth:`small`'s widths with the streams meeting first,
        2 text layers, 1 visual layer and 2 co-TRMs::

            C0 | T0 V0 C1 | T1

        Trained from scratch, the paper's pattern at this size learned far more slowly (chapter 5, section 5.2).
        """
        schedule = dict(
            text_num_layers=2, text_layer_ids=(0, 1), visual_num_layers=1, visual_layer_ids=(0, 1)
        )
        return cls.small(vocab_size, num_region_classes, **{**schedule, **changes})


def layer_schedule(config: ViLBERTConfig) -> list[tuple[str, int]]:
    """The order in which the encoder runs its layers: ``[("text", i) | ("visual", i) | ("co", k), ...]``.

    As vilbert-multi-task's ``BertEncoder.forward``: for each co-TRM ``k``,
    text layers ``[t_start, text_layer_ids[k])``, then visual layers
    ``[v_start, visual_layer_ids[k])``, then co-TRM ``k``; after the last
    co-TRM, the remaining visual layers and then the remaining text layers.
    (Between two co-TRMs the streams do not interact, so the text/visual
    order there changes no number; it is kept for a faithful diagram.)
    """
    plan: list[tuple[str, int]] = []
    t = v = 0
    for k, (t_end, v_end) in enumerate(zip(config.text_layer_ids, config.visual_layer_ids)):
        plan += [("text", i) for i in range(t, t_end)]
        plan += [("visual", i) for i in range(v, v_end)]
        plan.append(("co", k))
        t, v = t_end, v_end
    plan += [("visual", i) for i in range(v, config.visual_num_layers)]
    plan += [("text", i) for i in range(t, config.text_num_layers)]
    return plan


# ---------------------------------------------------------------------------
# Reading the batch
# ---------------------------------------------------------------------------


def _shape_error(key: str, expected: str, got: Tensor) -> ValueError:
    return ValueError(f"batch[{key!r}] must be {expected}, got {got.dtype} {tuple(got.shape)}")


class _Inputs(NamedTuple):
    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor | None
    region_feats: Tensor
    region_loc: Tensor
    region_mask: Tensor
    image_feats: Tensor


def _read_batch(batch: dict[str, Tensor], config: ViLBERTConfig) -> _Inputs:
    ids, mask = text_inputs(batch)
    B, T = ids.shape
    types = batch.get("token_type_ids")
    if types is not None and (not isinstance(types, Tensor) or tuple(types.shape) != (B, T)):
        raise ValueError(f"batch['token_type_ids'] must have shape ({B}, {T}) like input_ids")
    feats, loc, rmask = region_inputs(batch, B, config.region_dim, config.location_dim)
    image = get_tensor(batch, "image_feats")
    if tuple(image.shape) != (B, config.region_dim) or not image.is_floating_point():
        raise _shape_error(
            "image_feats",
            f"float of shape ({B}, {config.region_dim}) = (batch, region_dim), the [IMG] feature",
            image,
        )
    return _Inputs(ids, mask, types, feats, loc, rmask, image)


# ---------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------


class ViLBERTAttentions(NamedTuple):
    """Attention maps of one forward pass, one tensor per layer in schedule order.

    ``text``: ``(batch, heads, T, T)`` per text layer; ``visual``:
    ``(batch, heads, 1+R, 1+R)`` per visual layer; ``text_to_visual``:
    ``(batch, bi_heads, T, 1+R)`` per co-TRM (words over ``[IMG]`` + regions);
    ``visual_to_text``: ``(batch, bi_heads, 1+R, T)`` per co-TRM.
    """

    text: list[Tensor]
    visual: list[Tensor]
    text_to_visual: list[Tensor]
    visual_to_text: list[Tensor]


class ViLBERTOutput(NamedTuple):
    """What :class:`ViLBERT` returns.

    ``text_hidden (batch, T, text_hidden)``; ``visual_hidden (batch, 1+R, visual_hidden)``
    with ``[IMG]`` at position 0; ``pooled_text`` and ``pooled_visual``
    ``(batch, bi_hidden)``; ``attentions`` (:class:`ViLBERTAttentions` or None);
    ``visual_mask (batch, 1+R)`` bool, True at ``[IMG]`` and the real regions.
    """

    text_hidden: Tensor
    visual_hidden: Tensor
    pooled_text: Tensor
    pooled_visual: Tensor
    attentions: ViLBERTAttentions | None
    visual_mask: Tensor


@register_model("vilbert")
class ViLBERT(VisionLanguageModel):
    """The two-stream encoder (chapter 5). ``forward(batch, need_weights=False) ->`` :class:`ViLBERTOutput`.

    ``self.schedule`` is :func:`layer_schedule` of the config, and ``forward``
    runs exactly that list. Padding never changes the outputs at real
    positions; a sample with no region still has ``[IMG]``, and a sample with
    no real token gets zero co-attention from the words (no NaN either way).
    """

    config_class = ViLBERTConfig
    encoder_attr = "vilbert"

    def __init__(self, config: ViLBERTConfig):
        super().__init__(config)
        c = config
        self.text_embeddings = TextEmbeddings(
            c.vocab_size,
            c.text_hidden_size,
            c.max_text_len,
            c.type_vocab_size,
            dropout=c.dropout,
            pad_token_id=c.pad_token_id,
            layer_norm_eps=c.layer_norm_eps,
            positions=c.word_order,
        )
        self.region_embeddings = RegionEmbeddings(
            c.region_dim,
            c.visual_hidden_size,
            c.location_dim,
            dropout=c.dropout,
            location_layers=c.location_layers,
            layer_norm_eps=c.layer_norm_eps,
        )
        self.text_layers = nn.ModuleList(
            TransformerLayer(
                c.text_hidden_size,
                c.text_num_heads,
                c.text_ffn_size,
                c.dropout,
                c.attention_dropout,
                layer_norm_eps=c.layer_norm_eps,
            )
            for _ in range(c.text_num_layers)
        )
        self.visual_layers = nn.ModuleList(
            TransformerLayer(
                c.visual_hidden_size,
                c.visual_num_heads,
                c.visual_ffn_size,
                c.dropout,
                c.attention_dropout,
                layer_norm_eps=c.layer_norm_eps,
            )
            for _ in range(c.visual_num_layers)
        )
        self.co_layers = nn.ModuleList(
            CoAttentionLayer(
                c.text_hidden_size,
                c.visual_hidden_size,
                c.bi_hidden_size,
                c.bi_num_heads,
                c.text_ffn_size,
                c.visual_ffn_size,
                c.dropout,
                c.attention_dropout,
                layer_norm_eps=c.layer_norm_eps,
            )
            for _ in range(c.num_co_layers)
        )
        self.text_pooler = nn.Sequential(nn.Linear(c.text_hidden_size, c.bi_hidden_size), nn.ReLU())
        self.visual_pooler = nn.Sequential(
            nn.Linear(c.visual_hidden_size, c.bi_hidden_size), nn.ReLU()
        )
        self.schedule = layer_schedule(c)
        self.register_buffer(
            "img_location", torch.tensor(c.img_location, dtype=torch.float32), persistent=False
        )
        self.init_weights()

    def forward(self, batch: dict[str, Tensor], *, need_weights: bool = False) -> ViLBERTOutput:
        x = _read_batch(batch, self.config)
        return self.encode(
            x.input_ids,
            x.attention_mask,
            x.region_feats,
            x.region_loc,
            x.region_mask,
            x.image_feats,
            token_type_ids=x.token_type_ids,
            need_weights=need_weights,
        )

    def embed_visual(
        self, region_feats: Tensor, region_loc: Tensor, region_mask: Tensor, image_feats: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``[IMG]`` + regions -> ``(embeddings (B, 1+R, visual_hidden), visual_mask (B, 1+R))``."""
        B = region_feats.shape[0]
        feats = torch.cat([image_feats[:, None, :], region_feats], dim=1)  # (B, 1+R, D)
        img_loc = self.img_location.to(region_loc.dtype).expand(B, 1, 5)
        loc = torch.cat([img_loc, region_loc], dim=1)  # (B, 1+R, 5)
        # [IMG] is always real: even an image with no region has a token to attend to.
        mask = torch.cat([region_mask.new_ones(B, 1), region_mask], dim=1)  # (B, 1+R)
        return self.region_embeddings(feats, loc), mask

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        region_feats: Tensor,
        region_loc: Tensor,
        region_mask: Tensor,
        image_feats: Tensor,
        *,
        token_type_ids: Tensor | None = None,
        need_weights: bool = False,
    ) -> ViLBERTOutput:
        """The encoder on explicit tensors (shapes as the batch keys, :func:`_read_batch` checks them)."""
        text = self.text_embeddings(input_ids, token_type_ids)
        visual, visual_mask = self.embed_visual(region_feats, region_loc, region_mask, image_feats)
        maps = ViLBERTAttentions([], [], [], []) if need_weights else None
        for kind, i in self.schedule:
            if kind == "text":
                text, w = self.text_layers[i](text, attention_mask, need_weights=need_weights)
                if maps is not None:
                    maps.text.append(w)
            elif kind == "visual":
                visual, w = self.visual_layers[i](visual, visual_mask, need_weights=need_weights)
                if maps is not None:
                    maps.visual.append(w)
            else:
                text, visual, w = self.co_layers[i](
                    text, visual, attention_mask, visual_mask, need_weights=need_weights
                )
                if maps is not None:
                    maps.text_to_visual.append(w.text_to_visual)
                    maps.visual_to_text.append(w.visual_to_text)
        pooled_text = self.text_pooler(text[:, 0])  # [CLS]
        pooled_visual = self.visual_pooler(visual[:, 0])  # [IMG]
        return ViLBERTOutput(text, visual, pooled_text, pooled_visual, maps, visual_mask)

    def encode_text(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """The text stream alone: embeddings and every text layer in order, no co-attention.

        ``(batch, seq) -> (batch, seq, text_hidden)``. After
        :func:`load_text_stream_from_bert` this is exactly that BERT's
        ``last_hidden_state`` (tested).
        """
        x = self.text_embeddings(input_ids, token_type_ids)
        for layer in self.text_layers:
            x, _ = layer(x, attention_mask)
        return x


# ---------------------------------------------------------------------------
# Pretraining heads
# ---------------------------------------------------------------------------


@register_model("vilbert_pretraining")
class ViLBERTForPretraining(VisionLanguagePretraining):
    """ViLBERT with its three pretraining heads (chapter 5): MLM, MRC-kl (the paper's MRM) and alignment (ITM).

    ``forward(batch, task=None, *, need_weights=False) ->``
    :class:`~fusionlib.models.vl_base.PretrainingOutput` with ``mlm_logits``,
    ``mrc_logits`` (at the regions, ``[IMG]`` left out) and ``itm_logits``,
    whatever ``task`` (the three heads are cheap, and every step of the paper
    uses all three). The alignment head is
    ``Linear(dropout(pooled_text * pooled_visual))``: the elementwise product
    of ``ReLU(W_t h_[CLS])`` and ``ReLU(W_v h_[IMG])``. Train it with
    :func:`pretraining_step`.
    """

    config_class = ViLBERTConfig
    encoder_class = ViLBERT

    def __init__(self, config: ViLBERTConfig):
        super().__init__(config)
        self.vilbert = ViLBERT(config)
        self.mlm_head = TiedMLMHead(
            self.vilbert.text_embeddings.word_embeddings, config.layer_norm_eps, own_bias=True
        )
        self.mrc_head = RegionClassificationHead(
            config.visual_hidden_size, config.num_region_classes, config.layer_norm_eps
        )
        self.itm_head = ITMHead(config.bi_hidden_size, dropout=config.dropout)
        # Only the new heads: the encoder initialised itself, and the MLM decoder's matrix is its word table.
        self.init_weights(self.mlm_head.transform, self.mrc_head, self.itm_head)

    @property
    def image_keys(self) -> tuple[str, ...]:
        return ("region_feats", self.config.location_key, "region_mask", "image_feats")

    def forward(
        self, batch: dict[str, Tensor], task: str | None = None, *, need_weights: bool = False
    ) -> PretrainingOutput:
        out = self.vilbert(batch, need_weights=need_weights)
        return PretrainingOutput(
            mlm_logits=self.mlm_head(out.text_hidden),
            mrc_logits=self.mrc_head(out.visual_hidden[:, 1:]),  # regions only, not [IMG]
            itm_logits=self.itm_head(out.pooled_text * out.pooled_visual),
            encoder=out,
        )

    def itm_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """``(B, 2)``: ``Linear(dropout(pooled_text * pooled_visual))``, class 1 = the pair matches."""
        out = self.vilbert(batch)  # no MLM/MRC logits needed
        return self.itm_head(out.pooled_text * out.pooled_visual)

    def word_region_attention(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """``(B, bi_heads, T, R)`` per co-TRM: each word's co-attention on the regions, ``[IMG]`` left out."""
        maps = self.vilbert(batch, need_weights=True).attentions.text_to_visual
        return [m[..., 1:] for m in maps]

    def retrieval_score(self, batch: dict[str, Tensor]) -> Tensor:
        """How well each caption matches its image: ``(batch,)``, higher = better (chapter 5).

        The alignment head's log-odds ``logit_match - logit_mismatch``, i.e.
        ``log p(match) - log p(mismatch)``: it ranks pairs exactly as ViLBERT's
        zero-shot retrieval ranks them by ``softmax(logits)[match]``, without
        saturating at 1.
        """
        itm_logits = self.itm_logits(batch)
        return itm_logits[:, 1] - itm_logits[:, 0]


# ---------------------------------------------------------------------------
# Pretraining: masking, negatives, losses
# ---------------------------------------------------------------------------


class PretrainingInputs(NamedTuple):
    """One batch made ready for the three losses by :func:`prepare_pretraining_inputs`.

    ``input_ids``, ``attention_mask``, ``token_type_ids`` ``(B, T')``: the caption
    each image is paired with (its own, another image's for a negative, or a
    minimal edit of its own for a hard negative, which can make ``T'`` wider
    than the batch's ``T``), token-masked. ``mlm_labels (B, T)``: original ids at masked tokens of
    *matched* pairs, -100 elsewhere. ``region_feats (B, R, D)``: masked
    features; ``image_feats (B, D)``: the ``[IMG]`` feature, the mean of the
    masked real features. ``region_masked (B, R)`` bool: scored regions
    (matched pairs only). ``itm_labels (B,)``: 1 match, 0 mismatch (-100 when
    ITM is off). ``caption_index (B,)``: the row whose caption was used (its
    own row for a hard negative, whose caption was then edited).
    """

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor | None
    mlm_labels: Tensor
    region_feats: Tensor
    image_feats: Tensor
    region_masked: Tensor
    itm_labels: Tensor
    caption_index: Tensor

    def batch(self, original: dict[str, Tensor]) -> dict[str, Tensor]:
        """``original`` with the model inputs replaced by these and the targets added: the prepared batch
        that the model and :func:`~fusionlib.models.vl_base.pretraining_losses` read."""
        out = dict(
            original,
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            region_feats=self.region_feats,
            image_feats=self.image_feats,
            mlm_labels=self.mlm_labels,
            region_masked=self.region_masked,
            itm_labels=self.itm_labels,
        )
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out


def _tasks(task: str | None) -> tuple[str, ...]:
    if task in _ALL_TASKS:
        return PRETRAINING_TASKS
    if task in PRETRAINING_TASKS:
        return (task,)
    raise ValueError(
        f"task must be one of {PRETRAINING_TASKS} (that loss alone) or one of {list(_ALL_TASKS)} "
        f"(all three, summed), got {task!r}"
    )


def prepare_pretraining_inputs(
    batch: dict[str, Tensor],
    config: ViLBERTConfig,
    generator: torch.Generator,
    tasks: Sequence[str] = PRETRAINING_TASKS,
    itm_probability: float = 0.5,
    token_probability: float = 0.15,
    region_probability: float = 0.15,
    region_zero_fraction: float = 0.9,
) -> PretrainingInputs:
    """ViLBERT's pretraining inputs (chapters 4, 5), every draw from ``generator``.

    1. **Negatives** (``"itm"`` in ``tasks``): each caption is replaced with
       probability ``itm_probability`` by the caption of another sample whose
       ``image_index`` differs, so a "negative" is never the image's own
       caption nor a caption of a duplicate of it. (ViLBERT draws the random
       caption from the whole corpus; a batch is a uniform sample of it.)
       ``config.itm_negatives="false"`` takes only captions the truth judge
       calls false of the image; ``config.hard_negative_share`` of the
       negatives get a minimal edit of their own caption instead
       (:func:`fusionlib.itm.draw_pairs`).
    2. **Tokens** (``"mlm"``): BERT masking of the paired caption, 15% of
       the non-special tokens, 80/10/10 (:func:`fusionlib.masking.mask_tokens`);
       ``config.grounded_word_ids`` at ``config.grounded_word_probability``.
    3. **Regions** (``"mrc_kl"``): each real region with p = 0.15; 90% of those
       zeroed, 10% kept (:func:`fusionlib.masking.mask_regions`). ``[IMG]``
       is never masked; its feature is recomputed as the mean of the masked
       real features, as ViLBERT's loader computes it after masking (the
       batch's ``image_feats`` would leak the masked regions).
    4. **Mismatched pairs get no MLM/MRM targets**: their labels are -100 and
       their regions unscored. Their inputs are masked all the same: if only
       matched pairs carried ``[MASK]`` tokens and zeroed regions, the
       alignment head could read the label off the masking.

    Raises ``ValueError`` naming a missing or misshapen batch key.
    """
    for task in tasks:
        if task not in PRETRAINING_TASKS:
            raise ValueError(f"tasks must be drawn from {PRETRAINING_TASKS}, got {list(tasks)}")
    x = _read_batch(batch, config)
    B, T = x.input_ids.shape
    device = x.input_ids.device
    if "mrc_kl" in tasks:
        soft = get_tensor(batch, "region_soft_labels")
        expected = (B, x.region_feats.shape[1], config.num_region_classes)
        if tuple(soft.shape) != expected:
            raise _shape_error(
                "region_soft_labels",
                f"of shape {expected} = (batch, regions, num_region_classes)",
                soft,
            )

    # 1. ITM negatives: swap in the caption of a sample showing another image.
    if "itm" in tasks:
        image_index = get_tensor(batch, "image_index")
        if tuple(image_index.shape) != (B,) or image_index.is_floating_point():
            raise _shape_error("image_index", f"integer of shape ({B},)", image_index)
        pairs = itm.draw_pairs(
            batch,
            generator,
            itm_probability,
            config.itm_negatives,
            config.hard_negative_share,
            swap="text",
            hard_kinds=config.hard_negative_kinds,
        )
        caption_index = pairs.partner.to(device)
        itm_labels = pairs.labels.to(device)
    else:
        pairs = None
        caption_index = torch.arange(B, device=device)
        itm_labels = torch.full((B,), IGNORE_INDEX, dtype=torch.long, device=device)
    matched = itm_labels != 0  # a hard negative keeps its own row but is no match
    input_ids, attention_mask = x.input_ids[caption_index], x.attention_mask[caption_index]
    token_type_ids = None if x.token_type_ids is None else x.token_type_ids[caption_index]
    if pairs is not None and bool((pairs.edit >= 0).any()):
        input_ids, attention_mask = itm.edit_texts(
            input_ids, attention_mask, batch, pairs.edit, config.pad_token_id
        )
        if token_type_ids is not None:  # one segment: an edited caption is all type 0
            width = input_ids.shape[1]
            token_type_ids = torch.nn.functional.pad(token_type_ids, (0, max(0, width - T)))[
                :, :width
            ]
            token_type_ids = token_type_ids.masked_fill((pairs.edit >= 0).to(device)[:, None], 0)

    # 2. Tokens.
    if "mlm" in tasks:
        maskable = maskable_tokens(input_ids, attention_mask, config.special_token_ids)
        input_ids, mlm_labels = mask_tokens(
            input_ids,
            maskable,
            mask_token_id=config.mask_token_id,
            vocab_size=config.vocab_size,
            generator=generator,
            special_ids=config.special_token_ids,
            probability=token_probability,
            grounded_ids=config.grounded_word_ids,
            grounded_probability=config.grounded_word_probability,
        )
        mlm_labels = mlm_labels.masked_fill(~matched[:, None], IGNORE_INDEX)
    else:
        mlm_labels = torch.full_like(input_ids, IGNORE_INDEX)

    # 3. Regions.
    if "mrc_kl" in tasks:
        regions = mask_regions(
            x.region_mask,
            generator,
            probability=region_probability,
            zero_fraction=region_zero_fraction,
        )
        region_feats = apply_region_mask(x.region_feats, regions.zeroed)
        image_feats = masked_mean(region_feats, x.region_mask)
        region_masked = regions.masked & matched[:, None]
    else:
        region_feats, image_feats = x.region_feats, x.image_feats
        region_masked = torch.zeros_like(x.region_mask)
    return PretrainingInputs(
        input_ids,
        attention_mask,
        token_type_ids,
        mlm_labels,
        region_feats,
        image_feats,
        region_masked,
        itm_labels,
        caption_index,
    )


def pretraining_step(
    model: nn.Module,
    batch: dict[str, Tensor],
    task: str | None = None,
    *,
    generator: torch.Generator | None = None,
    itm_probability: float = 0.5,
    token_probability: float = 0.15,
    region_probability: float = 0.15,
    region_zero_fraction: float = 0.9,
) -> dict[str, Tensor]:
    """One ViLBERT pretraining step, a ``step_fn`` for :func:`fusionlib.train.train` (chapter 5).

    ``task``: ``None`` / ``"train"`` (train's default task name) / ``"all"``
    -> ``loss = mlm_loss + mrc_kl_loss + itm_loss``, equal weights, as ViLBERT;
    ``"mlm"``, ``"mrc_kl"`` or ``"itm"`` -> that loss alone, with only its own
    corruption (``"itm"`` alone sees unmasked inputs: retrieval fine-tuning).
    ``generator``: the CPU ``torch.Generator`` for every draw; by default one
    is seeded from the global generator (see :func:`fusionlib.runtime.step_generator`), so
    runs under :func:`fusionlib.train.train` are reproducible and resumable.

    Returns ``{"loss", "<task>_loss", "mlm_accuracy", "itm_accuracy"}`` for the
    tasks of the step, computed by :func:`~fusionlib.models.vl_base.pretraining_losses`
    (every entry but ``loss`` detached).
    """
    tasks = _tasks(task)
    config = encoder_of(model, ViLBERT).config
    inputs = prepare_pretraining_inputs(
        batch,
        config,
        runtime.step_generator(generator),
        tasks,
        itm_probability,
        token_probability,
        region_probability,
        region_zero_fraction,
    )
    prepared = inputs.batch(batch)
    return pretraining_losses(model(prepared), prepared, tasks)


# ---------------------------------------------------------------------------
# Downstream: VQA (retrieval: vl_base.pair_scores)
# ---------------------------------------------------------------------------


@register_model("vilbert_vqa")
class ViLBERTForVQA(VisionLanguageModel):
    """ViLBERT answering questions (chapter 5): ``forward(batch, need_weights=False) -> logits (B, num_answers)``.

    As vilbert-multi-task's ``VILBertForVLTasks``: the product of the pooled
    outputs, dropout, then ``SimpleClassifier``:
    ``Linear(bi, 2 bi) -> ReLU -> Dropout(classifier_dropout) -> Linear(2 bi, num_answers)``
    (the original wraps both linears in weight normalisation; left out here).
    With ``config.vqa_pooling="mean"`` the classifier reads the mean of the
    real words' final states ``(B, text_hidden)`` instead of the product
    (chapter 3's pooling; chapter 6 compares the models with it).
    With ``need_weights=True`` returns ``(logits, ViLBERTAttentions)``.
    Start from pretraining with :meth:`from_encoder` (``num_answers=...``);
    train with :func:`~fusionlib.models.vl_base.vqa_step`.
    """

    config_class = ViLBERTConfig
    encoder_class = ViLBERT

    def __init__(self, config: ViLBERTConfig):
        super().__init__(config)
        if config.num_answers < 1:
            raise ValueError(
                "ViLBERTForVQA needs config.num_answers >= 1 (the answer vocabulary size), got "
                f"{config.num_answers}"
            )
        self.vilbert = ViLBERT(config)
        self.dropout = nn.Dropout(config.dropout)
        B = config.bi_hidden_size
        width = config.text_hidden_size if config.vqa_pooling == "mean" else B
        self.classifier = nn.Sequential(
            nn.Linear(width, 2 * B),
            nn.ReLU(),
            nn.Dropout(config.classifier_dropout),
            nn.Linear(2 * B, config.num_answers),
        )
        self.init_weights(self.classifier)

    def forward(
        self, batch: dict[str, Tensor], *, need_weights: bool = False
    ) -> Tensor | tuple[Tensor, ViLBERTAttentions]:
        out = self.vilbert(batch, need_weights=need_weights)
        if self.config.vqa_pooling == "mean":
            pooled = masked_mean(out.text_hidden, batch["attention_mask"])  # (B, text_hidden)
        else:
            pooled = out.pooled_text * out.pooled_visual  # (B, bi_hidden)
        logits = self.classifier(self.dropout(pooled))
        return (logits, out.attentions) if need_weights else logits


# ---------------------------------------------------------------------------
# Moving weights: BERT -> text stream
# ---------------------------------------------------------------------------


def _bert_name_map(num_layers: int) -> dict[str, str | tuple[str, str, str]]:
    """Our text-stream parameter names -> the BertModel names (a triple: q, k, v stacked)."""
    names: dict[str, str | tuple[str, str, str]] = {
        "text_embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "text_embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
        "text_embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
        "text_embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "text_embeddings.norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(num_layers):
        ours, theirs = f"text_layers.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            names[
                ours
                + ("attention.in_proj_weight" if kind == "weight" else "attention.in_proj_bias")
            ] = tuple(f"{theirs}attention.self.{p}.{kind}" for p in ("query", "key", "value"))
            names[f"{ours}attention.out_proj.{kind}"] = f"{theirs}attention.output.dense.{kind}"
            names[f"{ours}attention_residual.norm.{kind}"] = (
                f"{theirs}attention.output.LayerNorm.{kind}"
            )
            names[f"{ours}ffn.linear1.{kind}"] = f"{theirs}intermediate.dense.{kind}"
            names[f"{ours}ffn.linear2.{kind}"] = f"{theirs}output.dense.{kind}"
            names[f"{ours}ffn_residual.norm.{kind}"] = f"{theirs}output.LayerNorm.{kind}"
    return names


def load_text_stream_from_bert(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a transformers ``BertModel`` checkpoint from a local folder into the text stream (chapter 5).

    ViLBERT starts its text stream from BERT. ``path`` is a folder written by
    ``save_pretrained`` (``BertModel``, or ``BertForPreTraining`` whose ``bert.``
    prefix transformers strips); nothing is downloaded. Loaded: the word,
    position and token-type embeddings and their LayerNorm, and every layer:
    BERT's separate ``query``/``key``/``value`` weights are stacked into our
    ``in_proj_weight (3H, H)`` (q, k, v order, like
    :class:`torch.nn.MultiheadAttention`), ``attention.output.dense`` ->
    ``out_proj``, ``attention.output.LayerNorm`` -> the attention residual's
    norm, ``intermediate.dense`` -> ``ffn.linear1``, ``output.dense`` ->
    ``ffn.linear2``, ``output.LayerNorm`` -> the FFN residual's norm. BERT's
    pooler (tanh) is not ViLBERT's (ReLU into the co-attention width) and is
    not loaded. Only the first ``max_text_len`` positions are kept.

    Both are post-LN with exact (erf) GELU, so afterwards
    :meth:`ViLBERT.encode_text` equals ``BertModel(...).last_hidden_state``
    (tested to 1e-5). Raises ``ValueError`` naming the config field that does
    not match the checkpoint. Returns the names of the loaded parameters.
    """
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    encoder = encoder_of(model, ViLBERT)
    c = encoder.config
    # Quiet: the pooler we do not load would be reported as "unexpected" at every call.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        bert, info = BertModel.from_pretrained(
            os.fspath(path),
            local_files_only=True,
            add_pooling_layer=False,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    # transformers fills weights missing from the checkpoint with random ones; never load those.
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise ValueError(f"the BERT checkpoint at {os.fspath(path)} lacks {missing}")
    bc = bert.config
    checks = [
        ("text_hidden_size", c.text_hidden_size, "hidden_size", bc.hidden_size),
        ("text_num_layers", c.text_num_layers, "num_hidden_layers", bc.num_hidden_layers),
        ("text_num_heads", c.text_num_heads, "num_attention_heads", bc.num_attention_heads),
        ("text_ffn_size", c.text_ffn_size, "intermediate_size", bc.intermediate_size),
        ("vocab_size", c.vocab_size, "vocab_size", bc.vocab_size),
        ("type_vocab_size", c.type_vocab_size, "type_vocab_size", bc.type_vocab_size),
        ("layer_norm_eps", c.layer_norm_eps, "layer_norm_eps", bc.layer_norm_eps),
    ]
    for ours, ours_value, theirs, their_value in checks:
        if ours_value != their_value:
            raise ValueError(
                f"config.{ours}={ours_value!r} does not match the BERT checkpoint's "
                f"{theirs}={their_value!r} at {os.fspath(path)}"
            )
    if not c.word_order:
        raise ValueError(
            "config.word_order=False has no position embeddings to take BERT's into; "
            "load BERT into a model with word_order=True"
        )
    if bc.max_position_embeddings < c.max_text_len:
        raise ValueError(
            f"config.max_text_len={c.max_text_len} exceeds the BERT checkpoint's "
            f"max_position_embeddings={bc.max_position_embeddings}"
        )
    if bc.hidden_act != "gelu":
        raise ValueError(
            f"the BERT checkpoint uses hidden_act={bc.hidden_act!r}; the text stream's layers use "
            "exact GELU ('gelu')"
        )
    if getattr(bc, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"the BERT checkpoint uses position_embedding_type={bc.position_embedding_type!r}; "
            "the text stream has absolute learned positions"
        )
    theirs = bert.state_dict()
    ours = encoder.state_dict()
    loaded = []
    with torch.no_grad():
        for name, source in _bert_name_map(c.text_num_layers).items():
            value = (
                torch.cat([theirs[s] for s in source])
                if isinstance(source, tuple)
                else theirs[source]
            )
            if name == "text_embeddings.position_embeddings.weight":
                value = value[: c.max_text_len]
            if tuple(value.shape) != tuple(ours[name].shape):
                raise ValueError(
                    f"{name}: the checkpoint gives shape {tuple(value.shape)}, the text stream has "
                    f"{tuple(ours[name].shape)}"
                )
            ours[name].copy_(value.to(ours[name].dtype))
            loaded.append(name)
    return loaded
