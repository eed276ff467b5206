"""The pretraining losses of vision-language models (chapter 4).

One function per loss, each faithful to the paper and public code it names:

====================  ==========================================  ==============================
loss                  what it teaches                             from
====================  ==========================================  ==============================
``mlm_loss``          recover masked words from words + regions   BERT, ViLBERT, UNITER
``mrfr_loss``         regress a masked region's feature           UNITER (MRFR)
``mrc_loss``          classify a masked region (detector argmax)  UNITER (MRC)
``mrc_kl_loss``       match the detector's class distribution     ViLBERT (MRM), UNITER (MRC-kl)
``itm_loss``          does this caption match this image?         ViLBERT, UNITER, ALBEF
``accuracy``          a metric: the share of argmax hits          logged with MLM, ITM
``contrastive_loss``  symmetric InfoNCE between two encoders      CLIP, ALBEF (not UNITER)
``wra_loss``          word-region alignment by optimal transport  UNITER (WRA, IPOT)
====================  ==========================================  ==============================

Conventions shared by every loss here:

* Boolean masks are True where a position is real / scored.
* Targets that do not count are ``-100`` (``IGNORE_INDEX``), as in PyTorch.
* A batch with nothing to score returns a **0 that still has a gradient**
  (connected to the predictions), never NaN: reference code divides by the
  number of masked positions and gets 0/0 when there are none.
* Losses are means over the scored positions (a sum divided by their count,
  the count clamped to at least 1).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
INIT_TEMPERATURE = 0.07  # CLIP's initial softmax temperature: logit_scale = log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0  # CLIP clamps the logit scale to at most 100 (temperature >= 0.01)
WRA_WEIGHT = 0.1  # UNITER adds WRA to ITM with this weight (--itm_ot_lambda 0.1)


# ----------------------------------------------------------------------------
# Argument checks: bad input gets an error that names the argument.
# ----------------------------------------------------------------------------


def _expect(
    name: str,
    x: object,
    *,
    ndim: int,
    floating: bool | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating is True and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    return x


def _expect_shape(name: str, x: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {tuple(x.shape)}")


def _check_class_labels(name: str, labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Return the bool mask of scored labels; raise if a scored label is out of range."""
    scored = labels != ignore_index
    bad = scored & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(
            f"{name} must hold class ids in [0, {num_classes}) or {ignore_index}, got {labels[bad][0].item()}"
        )
    return scored


def _only_scored(x: Tensor, scored: Tensor) -> Tensor:
    """``x`` with every unscored position set to 0, *before* any arithmetic.

    A NaN or inf at an unscored position (a padded region, an ignored token)
    would otherwise reach the gradient as ``NaN * 0 = NaN``; ``torch.where``
    gives the unselected branch an exact zero gradient whatever its value.
    """
    keep = scored.reshape(scored.shape + (1,) * (x.dim() - scored.dim()))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _masked_mean(values: Tensor, scored: Tensor) -> Tensor:
    """Mean of ``values`` where ``scored``; 0 with a gradient when nothing is scored.

    ``torch.where`` (not multiplication) keeps unscored values out of the sum;
    :func:`_only_scored` has already kept them out of the gradient.
    """
    total = torch.where(scored, values, torch.zeros_like(values)).sum()
    return total / scored.sum().clamp(min=1).to(values.dtype)


# ----------------------------------------------------------------------------
# Masked language modelling
# ----------------------------------------------------------------------------


def mlm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    r"""Masked language modelling: cross-entropy at the masked positions only (chapter 4).

    .. math::  \mathcal{L}_{MLM} = -\frac{1}{|M|} \sum_{(b,t) \in M} \log \mathrm{softmax}(z_{b,t})_{y_{b,t}}

    where :math:`M` is the set of positions whose label is not ``ignore_index``
    (BERT; ViLBERT and UNITER score only the 15% chosen by
    :func:`fusionlib.masking.mask_tokens`). Scoring every position instead
    teaches the model to copy its input; chapter 4 shows it failing.

    Args:
        logits: ``(batch, seq, vocab)`` scores over the vocabulary.
        labels: ``(batch, seq)`` long, the original token at masked positions, -100 elsewhere.

    Returns:
        A scalar, the mean over masked positions; 0 (with a gradient) when there are none.
    """
    _expect("logits", logits, ndim=3, floating=True)
    _expect("labels", labels, ndim=2, dtype=torch.long)
    _expect_shape("labels", labels, tuple(logits.shape[:2]), "(batch, seq) of logits")
    scored = _check_class_labels("labels", labels, logits.shape[-1], ignore_index)
    logits = _only_scored(logits, scored)
    total = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="sum"
    )
    return total / scored.sum().clamp(min=1).to(total.dtype)


# ----------------------------------------------------------------------------
# Masked region modelling: MRFR, MRC, MRC-kl
# ----------------------------------------------------------------------------


def _check_region_args(
    pred_name: str, pred: Tensor, target_name: str, target: Tensor, masked: Tensor
) -> None:
    _expect(pred_name, pred, ndim=3, floating=True)
    _expect(target_name, target, ndim=3, floating=True)
    _expect_shape(target_name, target, tuple(pred.shape), f"the shape of {pred_name}")
    _expect("masked", masked, ndim=2, dtype=torch.bool)
    _expect_shape("masked", masked, tuple(pred.shape[:2]), f"(batch, regions) of {pred_name}")


def mrfr_loss(predicted: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    r"""Masked region feature regression (UNITER's MRFR, chapter 4).

    .. math::  \mathcal{L}_{MRFR} = \frac{1}{|M|} \sum_{(b,r) \in M} \frac{1}{D} \lVert \hat v_{b,r} - v_{b,r} \rVert_2^2

    the squared error averaged over the feature dimension and the masked
    regions :math:`M`. This is UNITER's reduction: ``model/pretrain.py`` takes
    ``F.mse_loss(prediction_feat, feat_targets, reduction='none')`` over the
    masked regions and ``pretrain.py`` calls ``.mean()`` on it, i.e. a mean over
    (masked regions × feature dims). The target is the *original* (unmasked)
    feature; UNITER's head ties its output weight to the image projection.

    Args:
        predicted: ``(batch, regions, dim)`` predicted features.
        target: ``(batch, regions, dim)`` original features.
        masked: ``(batch, regions)`` bool, the masked regions to score.

    Returns:
        A scalar; 0 (with a gradient) when no region is masked.
    """
    _check_region_args("predicted", predicted, "target", target, masked)
    per_region = _only_scored(predicted - target, masked).pow(2).mean(dim=-1)
    return _masked_mean(per_region, masked)


def _check_soft_labels(soft_labels: Tensor, masked: Tensor) -> None:
    rows = soft_labels[masked]
    if rows.numel() == 0:
        return
    if bool((rows < 0).any()) or not torch.allclose(
        rows.sum(-1), torch.ones_like(rows[:, 0]), atol=1e-3
    ):
        raise ValueError(
            "soft_labels must be probability distributions (non-negative, summing to 1) at masked regions"
        )


def mrc_loss(
    logits: Tensor, soft_labels: Tensor, masked: Tensor, background_class: int | None = None
) -> Tensor:
    r"""Masked region classification (UNITER's MRC, chapter 4): cross-entropy against the
    detector's most likely class.

    .. math::  \mathcal{L}_{MRC} = -\frac{1}{|M|} \sum_{(b,r) \in M} \log \mathrm{softmax}(z_{b,r})_{c_{b,r}},
               \quad c_{b,r} = \arg\max_c \, p^{det}_{b,r,c}

    UNITER's detector has a background class 0 that is never the target
    (``label_targets[:, 1:].max(-1)[1] + 1`` in ``model/pretrain.py``); pass
    ``background_class`` to exclude it the same way.

    Args:
        logits: ``(batch, regions, classes)`` predicted class scores.
        soft_labels: ``(batch, regions, classes)`` the detector's class distribution.
        masked: ``(batch, regions)`` bool, the masked regions to score.
        background_class: a class never used as the target, or None.

    Returns:
        A scalar; 0 (with a gradient) when no region is masked.
    """
    _check_region_args("logits", logits, "soft_labels", soft_labels, masked)
    num_classes = logits.shape[-1]
    logits = _only_scored(logits, masked)
    scores = _only_scored(soft_labels.detach(), masked)
    if background_class is not None:
        if (
            not isinstance(background_class, int)
            or not 0 <= background_class < num_classes
            or num_classes < 2
        ):
            raise ValueError(
                f"background_class must be an int in [0, {num_classes}) with >= 2 classes, "
                f"got {background_class!r}"
            )
        scores = scores.clone()
        scores[..., background_class] = -math.inf
    target = scores.argmax(dim=-1)
    per_region = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(
        masked.shape
    )
    return _masked_mean(per_region, masked)


def mrc_kl_loss(logits: Tensor, soft_labels: Tensor, masked: Tensor) -> Tensor:
    r"""KL divergence from the detector's class distribution to the prediction, at masked
    regions (ViLBERT's MRM, UNITER's MRC-kl; chapter 4).

    .. math::  \mathcal{L}_{KL} = \frac{1}{|M|} \sum_{(b,r) \in M} \sum_c p_{b,r,c}
               \left(\log p_{b,r,c} - \log \mathrm{softmax}(z_{b,r})_c\right)
               = \frac{1}{|M|} \sum_{(b,r) \in M} \mathrm{KL}(p_{b,r} \,\Vert\, q_{b,r})

    with :math:`0 \log 0 = 0`. Mean over masked regions: this is the per-region
    KL that UNITER's validation reports (sum / number of masked regions).
    UNITER's *training* call ``F.kl_div(..., reduction='none').mean()`` also
    divides by the number of classes — the same gradient direction, 1/C the
    scale. ViLBERT divides by the number of masked regions and gets 0/0 when a
    batch has none; here the count is clamped, so an empty mask gives 0.

    Args:
        logits: ``(batch, regions, classes)`` predicted class scores.
        soft_labels: ``(batch, regions, classes)`` the detector's distribution ``p`` (rows sum to 1
            at masked regions).
        masked: ``(batch, regions)`` bool, the masked regions to score.

    Returns:
        A scalar; 0 (with a gradient) when no region is masked.
    """
    _check_region_args("logits", logits, "soft_labels", soft_labels, masked)
    _check_soft_labels(soft_labels, masked)
    log_q = F.log_softmax(_only_scored(logits, masked), dim=-1)
    per_region = F.kl_div(log_q, _only_scored(soft_labels, masked), reduction="none").sum(
        dim=-1
    )  # xlogy: 0·log 0 = 0
    return _masked_mean(per_region, masked)


# ----------------------------------------------------------------------------
# Image-text matching and its negatives
# ----------------------------------------------------------------------------


def itm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    r"""Image-text matching: two-way cross-entropy, label 1 = the pair matches, 0 = it does not
    (ViLBERT's alignment prediction, UNITER's ITM; chapter 4).

    .. math::  \mathcal{L}_{ITM} = -\frac{1}{|S|} \sum_{b \in S} \log \mathrm{softmax}(z_b)_{y_b}

    over the samples :math:`S` whose label is not ``ignore_index``; a batch
    where every label is ignored gives 0 with a gradient, not NaN.

    Args:
        logits: ``(batch, 2)`` scores for (no match, match).
        labels: ``(batch,)`` long in {0, 1} or ``ignore_index``.

    Returns:
        A scalar.
    """
    _expect("logits", logits, ndim=2, floating=True)
    if logits.shape[-1] != 2:
        raise ValueError(f"logits must have shape (batch, 2), got {tuple(logits.shape)}")
    _expect("labels", labels, ndim=1, dtype=torch.long)
    _expect_shape("labels", labels, (logits.shape[0],), "(batch,) of logits")
    scored = _check_class_labels("labels", labels, 2, ignore_index)
    logits = _only_scored(logits, scored)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / scored.sum().clamp(min=1).to(total.dtype)


@torch.no_grad()
def accuracy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The share of scored positions whose most likely class is the label: the metric logged next to
    :func:`mlm_loss` and :func:`itm_loss` (chapter 4).

    Args:
        logits: ``(..., classes)`` scores, e.g. MLM ``(batch, seq, vocab)`` or ITM ``(batch, 2)``.
        labels: ``(...)`` long, the class at scored positions, ``ignore_index`` elsewhere.

    Returns:
        A detached scalar in [0, 1]; 0 when nothing is scored (like the losses, never NaN).
    """
    if not isinstance(labels, Tensor) or labels.dtype != torch.long:
        raise TypeError(
            f"labels must be a long tensor, got {getattr(labels, 'dtype', type(labels).__name__)}"
        )
    _expect("logits", logits, ndim=labels.dim() + 1, floating=True)
    _expect_shape("labels", labels, tuple(logits.shape[:-1]), "the leading dims of logits")
    scored = labels != ignore_index
    hits = (logits.argmax(dim=-1) == labels) & scored
    return hits.sum() / scored.sum().clamp(min=1)


def _allowed_partners(batch_size: int, group_ids: Tensor | None, device: torch.device) -> Tensor:
    """``(batch, batch)`` bool: may sample j be used as the negative for sample i?
    Never i itself, never a j with the same group id (a duplicate image or caption)."""
    allowed = ~torch.eye(batch_size, dtype=torch.bool, device=device)
    if group_ids is not None:
        group_ids = check_group_ids(group_ids, batch_size, device)
        allowed &= group_ids[:, None] != group_ids[None, :]
    return allowed


class Negatives(NamedTuple):
    """What the negative samplers return.

    ``partner[i]`` is the index of the sample whose image (or text) to pair with sample i;
    ``labels[i]`` is the ITM label of that pair: 1 = match (``partner[i] == i``), 0 = negative.
    """

    partner: Tensor  # (batch,) long
    labels: Tensor  # (batch,) long


def random_negatives(
    batch_size: int,
    generator: torch.Generator,
    p: float = 0.5,
    group_ids: Tensor | None = None,
    allowed: Tensor | None = None,
) -> Negatives:
    """Random ITM negatives (UNITER: swap in a random image with p = 0.5; ViLBERT: a random
    caption with p = 0.5; chapter 4).

    Each sample becomes a negative with probability ``p``; its partner is drawn
    uniformly from the *other* samples of the batch whose ``group_ids`` differ
    (so a duplicate of the same image never poses as a negative). A sample with
    no valid partner — batch size 1, or a batch of duplicates — stays a
    positive: it is better to lose a negative than to train on a false one.

    Args:
        batch_size: the number of pairs.
        generator: a CPU ``torch.Generator`` for every draw.
        p: the chance that a sample becomes a negative.
        group_ids: optional ``(batch,)`` ints; equal ids mark the same image/caption.
        allowed: optional ``(batch, batch)`` bool, False where j must never be
            i's partner. :mod:`fusionlib.itm` passes the pairs the truth judge
            calls false, so that no negative is secretly true (chapter 4).

    Returns:
        :class:`Negatives` ``(partner, labels)`` on the CPU (or ``group_ids``' device).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"p must be a number in [0, 1], got {p!r}")
    device = generator.device
    extra = allowed
    allowed = _allowed_partners(batch_size, group_ids, device)
    if extra is not None:
        if (
            not isinstance(extra, Tensor)
            or extra.dtype != torch.bool
            or tuple(extra.shape) != (batch_size, batch_size)
        ):
            got = (
                f"{extra.dtype} {tuple(extra.shape)}"
                if isinstance(extra, Tensor)
                else type(extra).__name__
            )
            raise ValueError(
                f"allowed must be a bool ({batch_size}, {batch_size}) tensor, got {got}"
            )
        allowed = allowed & extra.to(device)
    has_partner = allowed.any(dim=1)
    negative = (torch.rand(batch_size, generator=generator, device=device) < p) & has_partner
    # Rows without a partner get uniform dummy weights so multinomial is valid; they stay positive.
    weights = torch.where(
        has_partner[:, None], allowed.float(), torch.ones_like(allowed, dtype=torch.float)
    )
    drawn = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    self_index = torch.arange(batch_size, device=device)
    partner = torch.where(negative, drawn, self_index)
    out_device = group_ids.device if group_ids is not None else device
    return Negatives(partner.to(out_device), negative.logical_not().long().to(out_device))


class HardNegatives(NamedTuple):
    """What :func:`hard_negatives` returns."""

    index: Tensor  # (batch,) long: the negative for each row, -1 where the row has none
    valid: Tensor  # (batch,) bool: False where the row has no allowed negative


@torch.no_grad()
def hard_negatives(
    sim: Tensor, generator: torch.Generator, group_ids: Tensor | None = None
) -> HardNegatives:
    r"""Hard ITM negatives sampled from contrastive similarities, as in ALBEF (chapter 4).

    For row i (an image, say, with ``sim`` = image-to-text logits), draw a
    negative column j with probability

    .. math::  w_{ij} = \frac{\exp(s_{ij})}{\sum_{k \in A_i} \exp(s_{ik})}, \quad j \in A_i

    where :math:`A_i` excludes i itself and every j with the same group id.
    ALBEF (``models/model_pretrain.py``) takes ``softmax(sim)``, zeroes the
    diagonal and calls ``torch.multinomial``; that has two traps this version
    avoids: duplicates of the positive in the batch are drawn as "negatives"
    (false negatives), and a row with no allowed column (batch size 1, or a
    batch of duplicates) has all-zero weights, which ``multinomial`` rejects.
    Such rows get ``index = -1`` and ``valid = False``. No gradient flows.

    Args:
        sim: ``(batch, batch)`` similarity logits (already divided by the temperature);
            call it once with image-to-text and once with text-to-image logits.
        generator: the ``torch.Generator`` for the draws.
        group_ids: optional ``(batch,)`` ints; equal ids mark duplicates.

    Returns:
        :class:`HardNegatives` ``(index, valid)`` on ``sim``'s device.
    """
    _expect("sim", sim, ndim=2, floating=True)
    if sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be square (batch, batch), got {tuple(sim.shape)}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not bool(torch.isfinite(sim).all()):
        raise ValueError("sim must be finite")
    batch = sim.shape[0]
    allowed = _allowed_partners(batch, group_ids, sim.device)
    valid = allowed.any(dim=1)
    logits = sim.float().masked_fill(~allowed, -math.inf)
    # A row with nothing allowed would softmax to NaN; give it uniform dummy weights instead.
    logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))
    weights = torch.softmax(logits, dim=1)
    drawn = (
        torch.multinomial(weights.to(generator.device), 1, generator=generator)
        .squeeze(1)
        .to(sim.device)
    )
    index = torch.where(valid, drawn, torch.full_like(drawn, -1))
    return HardNegatives(index, valid)


# ----------------------------------------------------------------------------
# Contrastive (InfoNCE)
# ----------------------------------------------------------------------------


def contrastive_inputs(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> tuple[Tensor, Tensor, Tensor]:
    """Check and prepare the inputs of a contrastive loss: ``(image_emb, text_emb, scale)``.

    Both embeddings ``(batch, dim)`` come back L2-normalised, and ``scale`` is
    ``exp(clamp(logit_scale, 0, log max_logit_scale))`` as a 0-d tensor. Shared
    by :func:`contrastive_loss` and the all-gather version in
    :mod:`fusionlib.distributed`, so both check and scale the same way.
    """
    _expect("image_emb", image_emb, ndim=2, floating=True)
    _expect("text_emb", text_emb, ndim=2, floating=True)
    _expect_shape("text_emb", text_emb, tuple(image_emb.shape), "the shape of image_emb")
    if not isinstance(logit_scale, Tensor):
        logit_scale = torch.tensor(
            float(logit_scale), dtype=image_emb.dtype, device=image_emb.device
        )
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    scale = logit_scale.reshape(()).clamp(0.0, math.log(max_logit_scale)).exp()
    return F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1), scale


def check_group_ids(group_ids: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """``group_ids (batch,)`` integer ids of duplicates, checked and moved to ``device``."""
    _expect("group_ids", group_ids, ndim=1)
    _expect_shape("group_ids", group_ids, (batch_size,), "(batch,)")
    if group_ids.dtype.is_floating_point:
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    return group_ids.to(device)


def contrastive_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    group_ids: Tensor | None = None,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> Tensor:
    r"""Symmetric InfoNCE between paired image and text embeddings (CLIP, ALBEF; chapter 4).

    With :math:`u_i, v_j` the L2-normalised image and text embeddings and
    :math:`s = \exp(\min(\max(\text{logit\_scale}, 0), \log 100))`:

    .. math::  \ell_{ij} = s\, u_i^\top v_j, \qquad
               \mathcal{L} = \frac{1}{2B} \sum_i \left[-\log \frac{e^{\ell_{ii}}}{\sum_j e^{\ell_{ij}}}
                                                     -\log \frac{e^{\ell_{ii}}}{\sum_j e^{\ell_{ji}}}\right]

    The embeddings are normalised here, explicitly (TorchMultimodal's
    ``ContrastiveLossWithTemperature`` leaves that to the caller, a classic
    bug). The scale is clamped to [1, 100] as CLIP does (temperature between
    0.01 and 1); beyond the clamp its gradient is 0. UNITER has no contrastive
    loss; this one is for the dual-encoder baseline and ALBEF-style hard
    negatives.

    ``group_ids`` handles duplicates: when samples i ≠ j share an id (the same
    image twice in a batch), pair (i, j) is a false negative, so it is removed
    from both softmax denominators; the diagonal stays the positive.

    Args:
        image_emb: ``(batch, dim)`` image embeddings.
        text_emb: ``(batch, dim)`` text embeddings, row i paired with image i.
        logit_scale: scalar tensor (learnable, see :class:`ContrastiveLoss`) or float: log(1/temperature).
        group_ids: optional ``(batch,)`` ints marking duplicates.
        max_logit_scale: the largest scale ``s`` (100 in CLIP).

    Returns:
        A scalar.
    """
    image_emb, text_emb, scale = contrastive_inputs(
        image_emb, text_emb, logit_scale, max_logit_scale
    )
    logits = scale * image_emb @ text_emb.t()  # (batch, batch): row = image, column = text
    batch = logits.shape[0]
    if group_ids is not None:
        false_negative = ~_allowed_partners(batch, group_ids, logits.device)
        false_negative.fill_diagonal_(False)
        logits = logits.masked_fill(false_negative, -math.inf)
    target = torch.arange(batch, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class ContrastiveLoss(nn.Module):
    """:func:`contrastive_loss` with a learnable temperature, initialised to 0.07
    (``logit_scale = log(1/0.07)``) and clamped to at most ``max_logit_scale`` (CLIP)."""

    def __init__(
        self, init_temperature: float = INIT_TEMPERATURE, max_logit_scale: float = MAX_LOGIT_SCALE
    ):
        super().__init__()
        if not 0 < init_temperature <= 1:
            raise ValueError(f"init_temperature must be in (0, 1], got {init_temperature!r}")
        if not max_logit_scale >= 1:
            raise ValueError(f"max_logit_scale must be >= 1, got {max_logit_scale!r}")
        self.max_logit_scale = float(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @property
    def temperature(self) -> float:
        """The temperature in use, after the clamp."""
        return 1.0 / float(
            self.logit_scale.detach().clamp(0.0, math.log(self.max_logit_scale)).exp()
        )

    def forward(
        self, image_emb: Tensor, text_emb: Tensor, group_ids: Tensor | None = None
    ) -> Tensor:
        return contrastive_loss(
            image_emb, text_emb, self.logit_scale, group_ids, self.max_logit_scale
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4f}, max_logit_scale={self.max_logit_scale}"


# ----------------------------------------------------------------------------
# Word-region alignment: optimal transport with IPOT
# ----------------------------------------------------------------------------


def without_autocast(device: torch.device | str):
    """A context with autocast switched off on ``device`` (a no-op on devices without autocast, e.g. meta).

    Under bf16 autocast (``TrainConfig.amp``, the default on CUDA) every matrix product runs in bf16
    whatever its inputs' dtype; in IPOT's loop that moves the plan by most of its own size (an entry of
    about 0.01 was off by 0.008). The optimal-transport code below runs in the dtype it is given instead,
    float32 as UNITER runs it.
    """
    device_type = torch.device(device).type
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def cosine_cost(x: Tensor, y: Tensor, eps: float = 1e-5) -> Tensor:
    """Cosine distance ``1 - cos(x_i, y_j)`` for every pair: ``(batch, n, dim)``,
    ``(batch, m, dim)`` -> ``(batch, n, m)`` in [0, 2] (UNITER's ``cost_matrix_cosine``; chapter 4).

    In the inputs' dtype even under autocast (:func:`without_autocast`), so
    that float32 outputs give a float32 cost, as UNITER computes it."""
    _expect("x", x, ndim=3, floating=True)
    _expect("y", y, ndim=3, floating=True)
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"x and y must share batch and dim, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    with without_autocast(x.device):
        return 1 - F.normalize(x, dim=-1, eps=eps) @ F.normalize(y, dim=-1, eps=eps).transpose(1, 2)


@torch.no_grad()
def ipot(
    cost: Tensor,
    x_mask: Tensor,
    y_mask: Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner_steps: int = 1,
) -> Tensor:
    r"""Optimal transport plan by IPOT, the inexact proximal point method (Xie et al., 2018),
    as UNITER uses it for WRA (``model/ot.py``; chapter 4).

    Solves :math:`\min_T \langle C, T\rangle` subject to :math:`T\mathbf 1 = \mu`,
    :math:`T^\top \mathbf 1 = \nu`, with uniform marginals over the *real*
    positions (:math:`\mu_i = 1/n`, :math:`\nu_j = 1/m`), by proximal steps

    .. math::  T^{(t+1)} = \arg\min_{T} \langle C, T\rangle + \beta\, \mathrm{KL}(T \Vert T^{(t)}),

    each solved inexactly by ``inner_steps`` Sinkhorn updates on the kernel
    :math:`Q = e^{-C/\beta} \odot T^{(t)}`:
    :math:`a = \mu / (Q b)`, :math:`b = \nu / (Q^\top a)`, :math:`T = \mathrm{diag}(a)\, Q\, \mathrm{diag}(b)`.
    Unlike Sinkhorn, the plan converges to the exact (unregularised) optimum.

    Padded rows and columns get zero mass and never divide by zero. Each row's
    cost is shifted by its minimum before the exponential; the plan is
    unchanged by that (the row's mass is fixed) but ``exp`` cannot underflow a
    whole row. Costs whose spread *within* a row exceeds about 80·beta (float32)
    still underflow at the far entries; cosine costs lie in [0, 2], far inside.
    Runs without gradient: the plan is treated as a constant. Runs in ``cost``'s dtype (float32 for
    bf16 / fp16) even under autocast (:func:`without_autocast`).

    Args:
        cost: ``(batch, n, m)`` transport cost, e.g. :func:`cosine_cost`.
        x_mask: ``(batch, n)`` bool, True for real rows (words).
        y_mask: ``(batch, m)`` bool, True for real columns (regions).
        beta: proximal step size (UNITER: 0.5).
        iterations: proximal steps (UNITER: 50).
        inner_steps: Sinkhorn updates per step (UNITER: k = 1).

    Returns:
        ``(batch, n, m)`` transport plan; zero on padding; columns sum to ``nu`` exactly and rows
        to ``mu`` approximately. A sample with no real row or column gets an all-zero plan.
    """
    _expect("cost", cost, ndim=3, floating=True)
    _expect("x_mask", x_mask, ndim=2, dtype=torch.bool)
    _expect("y_mask", y_mask, ndim=2, dtype=torch.bool)
    batch, n, m = cost.shape
    _expect_shape("x_mask", x_mask, (batch, n), "(batch, n) of cost")
    _expect_shape("y_mask", y_mask, (batch, m), "(batch, m) of cost")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    for name, value in (("iterations", iterations), ("inner_steps", inner_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    joint = x_mask[:, :, None] & y_mask[:, None, :]
    if not bool(torch.isfinite(cost[joint]).all()):
        raise ValueError("cost must be finite at real (unpadded) positions")

    dtype = cost.dtype if cost.dtype in (torch.float32, torch.float64) else torch.float32
    with without_autocast(cost.device):  # bf16 autocast would run the products below in bf16
        cost = cost.detach().to(dtype).masked_fill(~joint, 0.0)
        tiny = torch.finfo(dtype).tiny
        row_min = cost.masked_fill(~joint, math.inf).amin(dim=2, keepdim=True)
        row_min = torch.where(torch.isfinite(row_min), row_min, torch.zeros_like(row_min))
        kernel = torch.exp(-(cost - row_min) / beta) * joint  # (batch, n, m), zero on padding

        mu = x_mask.to(dtype) / x_mask.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)  # (batch, n)
        nu = y_mask.to(dtype) / y_mask.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)  # (batch, m)
        plan = joint.to(dtype)
        b = nu.clone()
        for _ in range(iterations):
            q = kernel * plan
            for _ in range(inner_steps):
                a = mu / (q @ b[:, :, None]).squeeze(2).clamp(min=tiny)  # padded rows: 0 / tiny = 0
                b = nu / (q.transpose(1, 2) @ a[:, :, None]).squeeze(2).clamp(min=tiny)
            plan = a[:, :, None] * q * b[:, None, :]
    return plan


def ot_distance(
    text_h: Tensor,
    region_h: Tensor,
    text_mask: Tensor,
    region_mask: Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner_steps: int = 1,
    plan: Tensor | None = None,
) -> Tensor:
    r"""Optimal-transport distance between the words and the regions of each pair (UNITER's
    WRA, ``model/ot.py: optimal_transport_dist``; chapter 4).

    .. math::  C_{ij} = 1 - \cos(w_i, v_j), \qquad T = \mathrm{IPOT}(C), \qquad
               d = \mathrm{tr}(C\, T^\top) = \sum_{ij} C_{ij} T_{ij}

    The plan :math:`T` carries no gradient (it comes from :func:`ipot` under
    ``no_grad``), so the gradient of :math:`d` with respect to the cost is
    :math:`T` itself: each word is pulled towards the regions it is
    transported to.

    Args:
        text_h: ``(batch, words, dim)`` contextual word states.
        region_h: ``(batch, regions, dim)`` contextual region states.
        text_mask: ``(batch, words)`` bool, True for real words (UNITER includes [CLS]/[SEP]
            unless the caller masks them out).
        region_mask: ``(batch, regions)`` bool, True for real regions.
        beta, iterations, inner_steps: IPOT settings (UNITER: 0.5, 50, 1).
        plan: optional precomputed ``(batch, words, regions)`` plan (e.g. for a gradient check).

    Returns:
        ``(batch,)`` distances.
    """
    cost = cosine_cost(text_h, region_h)
    _expect("text_mask", text_mask, ndim=2, dtype=torch.bool)
    _expect("region_mask", region_mask, ndim=2, dtype=torch.bool)
    _expect_shape("text_mask", text_mask, tuple(text_h.shape[:2]), "(batch, words) of text_h")
    _expect_shape(
        "region_mask", region_mask, tuple(region_h.shape[:2]), "(batch, regions) of region_h"
    )
    joint = text_mask[:, :, None] & region_mask[:, None, :]
    cost = cost.masked_fill(~joint, 0.0)
    if plan is None:
        plan = ipot(
            cost, text_mask, region_mask, beta=beta, iterations=iterations, inner_steps=inner_steps
        )
    else:
        _expect_shape("plan", plan, tuple(cost.shape), "(batch, words, regions)")
    return (cost * plan.detach().to(cost.dtype)).sum(dim=(1, 2))


def wra_loss(distance: Tensor, itm_labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    r"""Word-region alignment loss (UNITER; chapter 4): matched pairs pull, unmatched push.

    .. math::  \mathcal{L}_{WRA} = \frac{1}{|P| + |N|}\left(\sum_{b \in P} d_b - \sum_{b \in N} d_b\right)

    with :math:`P` the matched (label 1) and :math:`N` the unmatched (label 0)
    pairs. This follows UNITER's ``pretrain.py``:
    ``ot_loss = (ot_pos.sum() - ot_neg.sum()) / (ot_pos.size(0) + ot_neg.size(0))``,
    added to the ITM loss with weight 0.1 (:data:`WRA_WEIGHT`). Labels equal to
    ``ignore_index`` are left out; nothing left gives 0 with a gradient.

    Args:
        distance: ``(batch,)`` from :func:`ot_distance`.
        itm_labels: ``(batch,)`` long in {0, 1} or ``ignore_index``.

    Returns:
        A scalar.
    """
    _expect("distance", distance, ndim=1, floating=True)
    _expect("itm_labels", itm_labels, ndim=1, dtype=torch.long)
    _expect_shape("itm_labels", itm_labels, tuple(distance.shape), "(batch,) of distance")
    scored = _check_class_labels("itm_labels", itm_labels, 2, ignore_index)
    distance = _only_scored(distance, scored)
    signed = torch.where(itm_labels == 1, distance, -distance)
    return _masked_mean(signed, scored)
