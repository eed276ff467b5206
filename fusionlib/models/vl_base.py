"""What every vision-language model of the book shares: ViLBERT (chapter 5) and UNITER (chapter 6).

The two models differ in how words meet regions (two streams joined by
co-attention, or one stream over ``[text; regions]``) and in nothing else
that this module holds: how their weights start, how a task model starts from
a pretrained encoder, the pretraining heads, the pretraining losses and
metrics, the VQA step and retrieval scores. Each is written once, here.

==================================  ==========================================================================
piece                               here
==================================  ==========================================================================
init hook                           :meth:`VisionLanguageModel.init_weights`: BERT's N(0, initializer_range)
                                    (:func:`init_bert_weights`), ``[PAD]`` row zero
start a task model from an encoder  :meth:`VisionLanguageModel.from_encoder`, :func:`load_encoder`
heads (chapter 4)                   :class:`PredictionTransform`, :class:`TiedMLMHead`,
                                    :class:`RegionClassificationHead` (MRC and MRC-kl),
                                    :class:`RegionFeatureRegressionHead` (MRFR), :class:`ITMHead`
pretraining output                  :class:`PretrainingOutput`
losses and metrics                  :func:`pretraining_losses`
downstream                          :func:`vqa_step`, :func:`pair_scores`, :func:`masked_word_accuracy`
==================================  ==========================================================================

The batch readers and the location keys (``region_loc5`` / ``region_loc7``)
live in :mod:`fusionlib.models.batch`, next to the readers chapter 3's
baselines use.

Names
-----

Tasks are named as the papers name them: ``mlm`` (masked language modelling),
``mrc`` (masked region classification against the detector's most likely
class, UNITER), ``mrc_kl`` (KL to the detector's class distribution: UNITER's
MRC-kl, which is ViLBERT's masked region modelling), ``mrfr`` (masked region
feature regression, UNITER), ``itm`` (image-text matching, ViLBERT's
"alignment prediction") and ``wra`` (word-region alignment by optimal
transport, UNITER; it rides on ITM steps). A pretraining step returns

* ``loss``: what the optimizer minimises, with its graph;
* ``<task>_loss`` for every task of the step, detached;
* ``<task>_accuracy`` for the tasks that classify words or pairs (``mlm``,
  ``itm``), detached.

Where losses are computed
-------------------------

Models never compute a loss. A pretraining model's ``forward(batch, task)``
returns a :class:`PretrainingOutput` (logits, predicted features, WRA's
optimal-transport distances); each model's ``pretraining_step`` prepares the
batch (masks, negatives, targets), runs the model and hands its output and
the prepared batch to :func:`pretraining_losses`, which computes every loss
with the functions of :mod:`fusionlib.losses` and every accuracy with
:func:`fusionlib.losses.accuracy`. ``loss`` is the weighted sum of the step's
task losses: all of ViLBERT's tasks at weight 1 (its paper sums them), or
UNITER's one sampled task, plus ``0.1 * wra_loss`` on its ITM steps.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlib import losses
from fusionlib.attention import MultiHeadAttention
from fusionlib.embeddings import UniterImageEmbeddings
from fusionlib.layers import LAYER_NORM_EPS
from fusionlib.models.batch import get_tensor, text_inputs
from fusionlib.models.io import PretrainedModel, load_pretrained

__all__ = [
    "TASKS",
    "ITMHead",
    "PredictionTransform",
    "PretrainingOutput",
    "RegionClassificationHead",
    "RegionFeatureRegressionHead",
    "TiedMLMHead",
    "VisionLanguageModel",
    "VisionLanguagePretraining",
    "encoder_of",
    "init_bert_weights",
    "load_encoder",
    "masked_word_accuracy",
    "pair_scores",
    "pretraining_losses",
    "vqa_step",
]

# Every task :func:`pretraining_losses` scores.
TASKS = ("mlm", "mrfr", "mrc", "mrc_kl", "itm", "wra")


# ---------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------


@torch.no_grad()
def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation of one module, as ViLBERT's and UNITER's ``init_weights``: N(0, std) matrices
    and embeddings (the padding row zero), zero biases, unit LayerNorms. For ``model.apply``."""
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, std)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()
    elif isinstance(module, MultiHeadAttention):
        # BERT's query/key/value are three nn.Linear; ours are raw Parameters (out_proj, a Linear, is done above).
        names = (
            ("in_proj_weight",)
            if module.packed
            else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        )
        for name in names:
            getattr(module, name).normal_(0.0, std)
        if module.in_proj_bias is not None:
            module.in_proj_bias.zero_()
    elif isinstance(module, UniterImageEmbeddings) and module.mask_embedding is not None:
        module.mask_embedding.normal_(0.0, std)


class VisionLanguageModel(PretrainedModel):
    """Base of ViLBERT's and UNITER's encoders and task models (chapters 5, 6).

    An encoder (:class:`~fusionlib.models.vilbert.ViLBERT`,
    :class:`~fusionlib.models.uniter.UniterModel`) sets ``encoder_attr``, the
    attribute its task models keep it in (``"vilbert"``, ``"uniter"``); a task
    model sets ``encoder_class``. Its config has ``initializer_range`` (None:
    PyTorch's defaults), ``pad_token_id`` and ``task_fields``, the fields that
    configure heads and training rather than the encoder's weights.
    """

    encoder_attr: ClassVar[str] = ""
    # None: this model is an encoder.
    encoder_class: ClassVar[type[VisionLanguageModel] | None] = None

    @property
    def encoder(self) -> VisionLanguageModel:
        """The encoder: the model itself, or the one its task model holds."""
        return (
            self if self.encoder_class is None else getattr(self, self.encoder_class.encoder_attr)
        )

    @torch.no_grad()
    def init_weights(self, *modules: nn.Module) -> None:
        """The init hook: :func:`init_bert_weights` over ``modules`` (default: the whole model), in order.

        Each model calls it once, at the end of ``__init__``: an encoder on
        itself; a ViLBERT task model on its new heads only; a UNITER task
        model on everything again, encoder included, as UNITER's code does.
        (Which modules, and in which order, decides what a seeded model draws:
        the chapters' committed runs depend on it.) With
        ``initializer_range=None`` the modules keep PyTorch's defaults. The
        ``[PAD]`` row of the word table ends at zero either way (an MLM
        decoder tied to that table draws the whole table again).
        """
        std = self.config.initializer_range
        if std is not None:
            for module in modules or (self,):
                module.apply(functools.partial(init_bert_weights, std=std))
        self.encoder.text_embeddings.word_embeddings.weight[self.config.pad_token_id].zero_()

    @classmethod
    def from_encoder(
        cls, source: nn.Module | str | os.PathLike, **config_changes: Any
    ) -> VisionLanguageModel:
        """A ``cls`` whose encoder is a copy of ``source``'s and whose heads start fresh (chapters 5, 6).

        ``source``: a pretrained model, its encoder, or a folder either was
        saved to with ``save_pretrained``. ``config_changes`` may set what does
        not shape the encoder (``config.task_fields``: ``num_answers``,
        ``vqa_pooling``, dropouts...), e.g.
        ``UniterForVQA.from_encoder(pretrained, num_answers=len(answers))``.
        The model comes back on the encoder's device.
        """
        encoder = encoder_of(source, cls.encoder_class or cls)
        model = cls(encoder.config.replace(**config_changes))
        load_encoder(model, encoder)
        return model.to(next(encoder.parameters()).device)


def encoder_of(
    source: nn.Module | str | os.PathLike, encoder_class: type[VisionLanguageModel]
) -> VisionLanguageModel:
    """The ``encoder_class`` inside ``source``: the encoder itself, a model holding it (also
    ``torch.compile``'d), or a folder written by ``save_pretrained``. Raises ``TypeError`` otherwise."""
    if isinstance(source, (str, os.PathLike)):
        source = load_pretrained(source)
    source = getattr(source, "_orig_mod", source)  # a torch.compile'd module
    if isinstance(source, encoder_class):
        return source
    encoder = getattr(source, encoder_class.encoder_attr, None)
    if not isinstance(encoder, encoder_class):
        raise TypeError(
            f"expected a {encoder_class.__name__}, a model with a .{encoder_class.encoder_attr} "
            f"encoder, or a folder holding one; got {type(source).__name__}"
        )
    return encoder


def load_encoder(
    model: VisionLanguageModel, source: nn.Module | str | os.PathLike
) -> VisionLanguageModel:
    """Copy the encoder of ``source`` (a model, its encoder, or a saved folder) into ``model``'s encoder;
    heads are left alone. Returns ``model``.

    Raises ``ValueError`` naming the config fields that differ, beyond the
    config's ``task_fields``, when the two encoders are not the same model.
    """
    target = getattr(model, "_orig_mod", model).encoder
    src = encoder_of(source, type(target))
    free = set(type(target.config).task_fields)
    differ = {
        f.name: (getattr(src.config, f.name), getattr(target.config, f.name))
        for f in dataclasses.fields(target.config)
        if f.name not in free and getattr(src.config, f.name) != getattr(target.config, f.name)
    }
    if differ:
        raise ValueError(
            f"the source encoder's config differs from the model's in {sorted(differ)}: "
            + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in sorted(differ.items()))
        )
    target.load_state_dict(src.state_dict(), strict=True)
    return model


# ---------------------------------------------------------------------------
# Heads (chapter 4)
# ---------------------------------------------------------------------------


class PredictionTransform(nn.Sequential):
    """BERT's prediction-head transform ``LayerNorm(GELU(Linear(h)))``: ``(..., H) -> (..., H)``,
    the hidden part of every pretraining head (chapter 4)."""

    def __init__(self, hidden_size: int, eps: float = LAYER_NORM_EPS):
        super().__init__(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size, eps=eps)
        )


class TiedMLMHead(nn.Module):
    """BERT's masked-LM head: ``decoder(transform(h))``, the decoder's weight *being* the word table
    (chapter 4): ``(batch, seq, hidden) -> (batch, seq, vocab)``.

    One matrix reads words in and writes them out; the head owns only the
    transform and a bias. ``parameters()`` and safetensors count and save the
    shared matrix once, and loading keeps the tie (tested for both models).

    ``own_bias=True`` keeps the bias as the head's own ``bias``, listed before
    the transform, as BERT's code lays it out (ViLBERT here); ``False`` leaves
    it in the decoder, ``decoder.bias``, listed after (UNITER here). The math is
    the same; the layouts differ in parameter names and order, and the order
    is the one in which the global gradient norm sums (its last bit, and so a
    seeded run's trajectory).
    """

    def __init__(
        self, word_embeddings: nn.Embedding, eps: float = LAYER_NORM_EPS, *, own_bias: bool = False
    ):
        super().__init__()
        vocab_size, hidden_size = word_embeddings.weight.shape
        if own_bias:
            self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.transform = PredictionTransform(hidden_size, eps)
        # No initialisation of its own: the weight is the word table's and the bias starts at zero.
        self.decoder = nn.utils.skip_init(nn.Linear, hidden_size, vocab_size)
        self.decoder.weight = word_embeddings.weight
        if own_bias:
            self.decoder.bias = self.bias
        else:
            nn.init.zeros_(self.decoder.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden))


class RegionClassificationHead(nn.Module):
    """Detector-class logits of each region: ``decoder(transform(h))``,
    ``(batch, regions, hidden) -> (batch, regions, num_classes)`` (chapter 4).

    The head of MRC and MRC-kl (ViLBERT's ``BertImagePredictionHead``; UNITER
    uses one head for both losses).
    """

    def __init__(self, hidden_size: int, num_classes: int, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.transform = PredictionTransform(hidden_size, eps)
        self.decoder = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden))


class RegionFeatureRegressionHead(nn.Module):
    """UNITER's MRFR head: ``transform`` then ``F.linear(h, img_linear.weight.T, bias)``:
    ``(batch, regions, hidden) -> (batch, regions, region_dim)`` (chapters 4, 6).

    The output layer has no matrix of its own: it uses the image projection's
    weight ``(hidden, region_dim)`` transposed, so regressing a feature runs the
    embedding's projection backwards, and MRFR's gradient trains that projection
    directly. ``weight`` is the very ``nn.Parameter`` of ``img_linear`` (one
    storage, counted once by ``parameters()``, saved once by safetensors).
    """

    def __init__(self, hidden_size: int, img_linear: nn.Linear, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.transform = PredictionTransform(hidden_size, eps)
        self.weight = img_linear.weight  # tied: (hidden, region_dim)
        self.bias = nn.Parameter(torch.zeros(img_linear.in_features))

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(self.transform(hidden), self.weight.t(), self.bias)


class ITMHead(nn.Linear):
    """Image-text matching: ``Linear(dropout(pooled)) -> (batch, 2)``, class 1 = the pair matches (chapter 4).

    ``pooled`` is what the model makes of the pair: ViLBERT's product of its
    pooled ``[CLS]`` and ``[IMG]`` (with dropout, as its code), UNITER's pooled
    ``[CLS]`` (no dropout).
    """

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__(width, 2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pooled: Tensor) -> Tensor:
        return super().forward(self.dropout(pooled))


# ---------------------------------------------------------------------------
# Pretraining: the output, and the one place losses are computed
# ---------------------------------------------------------------------------


class PretrainingOutput(NamedTuple):
    """What a pretraining model's ``forward(batch, task)`` returns; a head the task does not need may be None.

    ``mlm_logits (B, T, vocab)``; ``mrc_logits (B, R, num_region_classes)`` at
    the regions (ViLBERT's ``[IMG]`` left out); ``mrfr_features (B, R,
    region_dim)``; ``itm_logits (B, 2)`` (class 1 = match); ``wra_distance
    (B,)``, the optimal-transport distance between each pair's words and
    regions; ``encoder``, the encoder's own output.
    """

    mlm_logits: Tensor | None = None
    mrc_logits: Tensor | None = None
    mrfr_features: Tensor | None = None
    itm_logits: Tensor | None = None
    wra_distance: Tensor | None = None
    encoder: Any = None


class VisionLanguagePretraining(VisionLanguageModel):
    """Base of ViLBERT's and UNITER's pretraining models: ``forward(batch, task=None, *, need_weights=False)``
    -> :class:`PretrainingOutput`; :meth:`itm_logits` and :meth:`retrieval_score` rank pairs."""

    def itm_logits(self, batch: Mapping[str, Any]) -> Tensor:
        """``(batch, 2)`` image-text matching logits (class 1 = the pair matches)."""
        raise NotImplementedError

    def retrieval_score(self, batch: Mapping[str, Any]) -> Tensor:
        """``(batch,)``: how well each caption matches its image, higher = better (what :func:`pair_scores`
        ranks)."""
        raise NotImplementedError

    def word_region_attention(self, batch: Mapping[str, Any]) -> list[Tensor]:
        """How the words attend to the regions: one ``(batch, heads, T, R)`` map per fusion layer.

        ViLBERT's co-attention maps without ``[IMG]`` (chapter 5), UNITER's
        text-to-region blocks of its joint maps (chapter 6). A row sums to the
        share of that word's attention that went to the regions, not to 1.
        """
        raise NotImplementedError

    @property
    def image_keys(self) -> tuple[str, ...]:
        """The batch keys that describe an image (the rest describe the caption)."""
        raise NotImplementedError


def _targets(
    targets: Mapping[str, Any], key: str, shape: tuple[int, ...], dtype: torch.dtype, task: str
) -> Tensor:
    value = get_tensor(
        targets, key, f" (task {task!r}: prepare the batch with the model's pretraining step)"
    )
    if value.dtype != dtype or tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"batch[{key!r}] must be {dtype} of shape {tuple(shape)} for task {task!r}, "
            f"got {value.dtype} {tuple(value.shape)}"
        )
    return value


def _head(output: PretrainingOutput, name: str, task: str) -> Tensor:
    value = getattr(output, name)
    if value is None:
        raise ValueError(
            f"output.{name} is None: run the model with task={task!r} (or None) to score {task!r}"
        )
    return value


def pretraining_losses(
    output: PretrainingOutput,
    targets: Mapping[str, Any],
    tasks: Sequence[str],
    *,
    weights: Mapping[str, float] | None = None,
    mrc_background_class: int | None = None,
) -> dict[str, Tensor]:
    """Every loss and metric of a pretraining step, from the model's output and the prepared batch (chapter 4).

    ``tasks`` (from :data:`TASKS`) and the ``targets`` keys they read:

    * ``"mlm"``: ``mlm_labels (B, T)`` long, -100 where no word is scored;
    * ``"mrc"``, ``"mrc_kl"``: ``region_soft_labels (B, R, C)`` and ``region_masked (B, R)`` bool;
    * ``"mrfr"``: ``region_feats (B, R, D)`` (the features before masking) and ``region_masked``;
    * ``"itm"``: ``itm_labels (B,)`` long, 1 match, 0 not, -100 not scored;
    * ``"wra"``: ``itm_labels`` and ``output.wra_distance``.

    Returns ``{"loss": sum of weights[t] * <t>_loss (weight 1 by default), "<t>_loss": ...,
    "mlm_accuracy", "itm_accuracy"}``, every entry but ``loss`` detached.
    ``mrc_background_class``: a class the MRC target never is (see
    :func:`fusionlib.losses.mrc_loss`). Raises ``ValueError`` naming a missing
    or misshapen target.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty list drawn from {TASKS}, got {list(tasks)}")
    weights = dict(weights or {})
    result: dict[str, Tensor] = {}
    total: Tensor | None = None
    for task in tasks:
        if task == "mlm":
            logits = _head(output, "mlm_logits", task)
            labels = _targets(targets, "mlm_labels", logits.shape[:2], torch.long, task)
            loss = losses.mlm_loss(logits, labels)
            result["mlm_accuracy"] = losses.accuracy(logits.detach(), labels)
        elif task in ("mrc", "mrc_kl", "mrfr"):
            pred = _head(output, "mrfr_features" if task == "mrfr" else "mrc_logits", task)
            masked = _targets(targets, "region_masked", pred.shape[:2], torch.bool, task)
            if task == "mrfr":
                loss = losses.mrfr_loss(pred, get_tensor(targets, "region_feats"), masked)
            else:
                soft = get_tensor(
                    targets, "region_soft_labels", f" (task {task!r} needs the detector's classes)"
                )
                if tuple(soft.shape) != tuple(pred.shape):
                    raise ValueError(
                        f"batch['region_soft_labels'] must have shape {tuple(pred.shape)} = (batch, "
                        f"regions, num_region_classes of the config), got {tuple(soft.shape)}"
                    )
                loss = (
                    losses.mrc_loss(pred, soft, masked, mrc_background_class)
                    if task == "mrc"
                    else losses.mrc_kl_loss(pred, soft, masked)
                )
        else:  # itm, wra: one label per pair
            scores = _head(output, "itm_logits" if task == "itm" else "wra_distance", task)
            labels = _targets(targets, "itm_labels", scores.shape[:1], torch.long, task)
            if task == "itm":
                loss = losses.itm_loss(scores, labels)
                result["itm_accuracy"] = losses.accuracy(scores.detach(), labels)
            else:
                loss = losses.wra_loss(scores, labels)
        result[f"{task}_loss"] = loss.detach()
        weight = weights.get(task, 1.0)
        if weight != 1.0:
            # WRA runs in float32 (UNITER's "fp32 for stability"); its term takes the sum's dtype.
            loss = weight * loss.to(loss.dtype if total is None else total.dtype)
        total = loss if total is None else total + loss
    return {"loss": total, **result}


# ---------------------------------------------------------------------------
# Downstream: VQA steps, retrieval scores, the grounding probe
# ---------------------------------------------------------------------------


def vqa_step(
    model: nn.Module, batch: Mapping[str, Any], task: str | None = None
) -> dict[str, Tensor]:
    """A ``step_fn`` for :func:`fusionlib.train.train` (chapters 5, 6): cross-entropy of ``model(batch)``
    ``(B, num_answers)`` against ``batch["answer"] (B,)``; returns ``{"loss", "accuracy"}``.

    ViLBERT and UNITER score VQA with a binary cross-entropy against soft
    answer scores (several annotators per question); our world has one answer.
    """
    logits = model(batch)
    answer = get_tensor(batch, "answer")
    if answer.dtype != torch.long or tuple(answer.shape) != (logits.shape[0],):
        raise ValueError(
            f"batch['answer'] must be long of shape ({logits.shape[0]},), "
            f"got {answer.dtype} {tuple(answer.shape)}"
        )
    loss = F.cross_entropy(logits.float(), answer)
    return {"loss": loss, "accuracy": (logits.detach().argmax(dim=-1) == answer).float().mean()}


def pretraining_model(model: nn.Module, what: str) -> VisionLanguagePretraining:
    scorer = getattr(model, "_orig_mod", model)
    if not isinstance(scorer, VisionLanguagePretraining):
        raise TypeError(
            f"model must be a pretraining model ({what}: ViLBERTForPretraining, UniterForPretraining), "
            f"got {type(scorer).__name__}"
        )
    return scorer


@torch.no_grad()
def pair_scores(
    model: VisionLanguagePretraining,
    images: Mapping[str, Tensor],
    texts: Mapping[str, Tensor],
    batch_size: int = 256,
) -> Tensor:
    """Retrieval scores of every (image, caption) pair: ``(N_images, N_texts)`` on the CPU (chapters 5, 6).

    ``images``: the model's ``image_keys`` (``region_feats (Ni, R, D)``, the
    locations, ``region_mask``, and ViLBERT's ``image_feats``); ``texts``:
    ``input_ids (Nt, T)``, ``attention_mask``. Neither model has separate image
    and text embeddings to compare with a dot product (co-attention or one
    joint stream make each pair's encoding its own), so every pair is a
    forward pass, ``batch_size`` pairs at a time, in eval mode (restored
    after). The score is the model's ``retrieval_score``: ViLBERT's ITM
    log-odds, UNITER's match logit. Feed the matrix to
    :func:`fusionlib.metrics.image_text_recall`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    scorer = pretraining_model(model, "its ITM head scores pairs")
    image_keys, text_keys = scorer.image_keys, ("input_ids", "attention_mask")
    for name, d, keys in (("images", images, image_keys), ("texts", texts, text_keys)):
        for key in keys:
            get_tensor(d, key, what=name)
    ni, nt = images["region_feats"].shape[0], texts["input_ids"].shape[0]
    device = next(scorer.parameters()).device
    was_training = scorer.training
    scorer.eval()
    scores = torch.empty(ni * nt)
    try:
        for start in range(0, ni * nt, batch_size):
            pairs = torch.arange(start, min(start + batch_size, ni * nt))
            i, j = pairs // nt, pairs % nt
            batch = {k: images[k][i].to(device) for k in image_keys}
            batch.update({k: texts[k][j].to(device) for k in text_keys})
            scores[start : start + len(pairs)] = scorer.retrieval_score(batch).float().cpu()
    finally:
        scorer.train(was_training)
    return scores.view(ni, nt)


@torch.no_grad()
def masked_word_accuracy(
    model: VisionLanguagePretraining, batch: Mapping[str, Any], word_ids: Sequence[int] | Tensor
) -> float:
    """MLM accuracy with *every* occurrence of ``word_ids`` masked at once: chapter 6's grounding probe.

    Masking all the shape words of a caption ("the red [MASK] is left of the
    blue [MASK]") leaves the image as the only place the answers are: a model
    completes them only once its words have found their regions. The regions
    stay intact and nothing else is masked (unlike a pretraining step, which
    masks 15% at random), so the same batch gives the same probe at every call
    and across models.

    Args:
        model: a pretraining model (evaluated in eval mode, restored after).
        batch: ``input_ids (B, T)``, ``attention_mask (B, T)`` and the image keys, matched pairs.
        word_ids: the token ids to mask (not special tokens), e.g. the ids of "square" and "circle".

    Returns the share of masked positions whose most likely word is the original one.
    """
    model = pretraining_model(model, "it has the MLM head")
    config = model.config
    words = torch.as_tensor(word_ids).flatten()
    if words.numel() == 0 or words.is_floating_point() or words.dtype == torch.bool:
        raise ValueError(
            f"word_ids must be a non-empty sequence of int token ids, got {word_ids!r}"
        )
    bad = [
        int(w)
        for w in words
        if not 0 <= int(w) < config.vocab_size or int(w) in config.special_token_ids
    ]
    if bad:
        raise ValueError(
            f"word_ids must be ids in [0, vocab_size={config.vocab_size}) that are not special tokens "
            f"{tuple(config.special_token_ids)}, got {bad}"
        )
    ids, text_mask = text_inputs(batch)
    where = torch.isin(ids, words.to(ids.device)) & text_mask  # (B, T)
    if not where.any():
        raise ValueError(
            f"no word of word_ids={words.tolist()} occurs at a real position of batch['input_ids']"
        )
    device = next(model.parameters()).device
    masked = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    masked["input_ids"] = ids.masked_fill(where, config.mask_token_id).to(device)
    labels = ids.masked_fill(~where, losses.IGNORE_INDEX).to(device)
    was_training = model.training
    model.eval()
    try:
        return float(losses.accuracy(model(masked, "mlm").mlm_logits, labels))
    finally:
        model.train(was_training)
