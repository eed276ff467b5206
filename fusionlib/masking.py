"""Masking for pretraining: BERT token masking, region masking, conditional masking.

Chapter 4 ("Pretraining losses and masking") explains every function here.

What the papers and their public code do:

* **Tokens** (BERT, ViLBERT, UNITER): choose 15% of the maskable tokens; of
  those, 80% become ``[MASK]``, 10% a random token, 10% stay unchanged. The
  loss is scored only at the chosen positions (labels are -100 elsewhere).
* **Regions** (ViLBERT): choose each real region with p = 0.15; zero the
  features of 90% of them and keep 10% unchanged. UNITER zeroes *all* chosen
  regions (``zero_fraction=1.0``) and always masks at least one.
* **Conditional masking** (UNITER): mask one modality at a time and keep the
  other intact, so the model must recover a word from the whole image (or a
  region from the whole sentence). The paper's ablation compares it with
  joint random masking, which masks both at once.
* **Grounded words** (Bitton et al., 2021, "Data Efficient Masked Language
  Modeling for Vision and Language"): at 15% most masked tokens are words
  the text alone predicts ("the", "is", "of"), so the image is barely
  used. ``grounded_ids`` / ``grounded_probability`` choose the words only the
  image can decide (in the book's world: colours, shapes, places) at a
  chance of their own. Chapter 5 measures what it changes.

Every random choice takes a ``torch.Generator`` so that a run can be replayed.
Boolean masks are True where a position is real / allowed (the PyTorch SDPA
convention used across fusionlib); ``maskable`` is True where a token may be
chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100  # the label where there is no target (PyTorch's cross_entropy default)


# ----------------------------------------------------------------------------
# Argument checks: bad input gets an error that names the argument.
# ----------------------------------------------------------------------------


def _check_tensor(name: str, x: object, *, ndim: int, dtype: torch.dtype | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    return x


def _check_same_shape(name: str, x: Tensor, other_name: str, other: Tensor) -> None:
    if x.shape != other.shape:
        raise ValueError(
            f"{name} must have the shape of {other_name} {tuple(other.shape)}, got {tuple(x.shape)}"
        )


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def _check_probability(name: str, p: float, *, allow_zero: bool = False) -> float:
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"{name} must be a number in {interval}, got {p!r}")
    if not ((p >= 0 if allow_zero else p > 0) and p <= 1):
        raise ValueError(f"{name} must be a number in {interval}, got {p!r}")
    return float(p)


def _uniform(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator, device: torch.device
) -> Tensor:
    """Uniform [0, 1) numbers drawn with ``generator`` (on its own device), moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _force_one(chosen: Tensor, allowed: Tensor, generator: torch.Generator) -> Tensor:
    """Return ``chosen`` with one uniformly drawn ``allowed`` position added in every row
    that has an allowed position but nothing chosen (UNITER: "at least mask 1")."""
    empty = allowed.any(dim=1) & ~chosen.any(dim=1)
    scores = _uniform(allowed.shape, generator, allowed.device).masked_fill(~allowed, -1.0)
    pick = torch.zeros_like(chosen)
    pick.scatter_(1, scores.argmax(dim=1, keepdim=True), True)
    return chosen | (pick & empty[:, None])


# ----------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------


def maskable_tokens(
    input_ids: Tensor, attention_mask: Tensor, special_ids: Sequence[int]
) -> Tensor:
    """Which tokens masking may choose: real (``attention_mask``) and not special.

    Args:
        input_ids: ``(batch, seq)`` token ids.
        attention_mask: ``(batch, seq)`` bool, or the tokenizer's 0/1 ints; True / 1 = real token.
        special_ids: ids never to mask, e.g. ``[pad, unk, cls, sep, mask]`` from the tokenizer
            (fusionlib's tokenizer puts them at 0..4, but pass them, don't assume).

    Returns:
        ``(batch, seq)`` bool, True where a token may be masked.
    """
    _check_tensor("input_ids", input_ids, ndim=2)
    _check_tensor("attention_mask", attention_mask, ndim=2)
    _check_same_shape("attention_mask", attention_mask, "input_ids", input_ids)
    if attention_mask.dtype != torch.bool:
        if attention_mask.dtype.is_floating_point or not bool(
            ((attention_mask == 0) | (attention_mask == 1)).all()
        ):
            raise ValueError("attention_mask must be bool or hold only 0/1 integers")
        attention_mask = attention_mask.bool()
    special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    return attention_mask & ~torch.isin(input_ids, special)


class MaskedTokens(NamedTuple):
    """What :func:`mask_tokens` returns; unpacks as ``inputs, labels = mask_tokens(...)``."""

    inputs: Tensor  # (batch, seq) the ids to feed the model: [MASK] / random / unchanged at chosen positions
    labels: (
        Tensor  # (batch, seq) the original id at chosen positions, IGNORE_INDEX (-100) elsewhere
    )


def check_grounded_words(
    grounded_ids: Sequence[int], grounded_probability: float | None, vocab_size: int
) -> tuple[int, ...]:
    """``grounded_ids`` as a tuple, or a ``ValueError`` naming what is wrong (model configs call it too).

    No ids and no probability is BERT's rule; ids need a probability in (0, 1]
    and a probability needs ids.
    """
    if isinstance(grounded_ids, (str, bytes)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in grounded_ids
    ):
        raise ValueError(
            f"grounded_ids must be int token ids in [0, vocab_size={vocab_size}), got {grounded_ids!r}"
        )
    if not grounded_ids:
        if grounded_probability is not None:
            raise ValueError(
                f"grounded_probability={grounded_probability} needs grounded_ids (which words), got none"
            )
        return ()
    if grounded_probability is None:
        raise ValueError("grounded_ids need grounded_probability (their chance), got None")
    _check_probability("grounded_probability", grounded_probability)
    return tuple(grounded_ids)


def _token_chances(
    input_ids: Tensor,
    probability: float,
    grounded_ids: tuple[int, ...],
    grounded_probability: float | None,
) -> float | Tensor:
    """``probability``, or ``(batch, seq)`` chances with ``grounded_probability`` at ``grounded_ids``."""
    if not grounded_ids:
        return probability
    ids = torch.tensor(grounded_ids, dtype=input_ids.dtype, device=input_ids.device)
    return torch.where(torch.isin(input_ids, ids), grounded_probability, probability)


def mask_tokens(
    input_ids: Tensor,
    maskable: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    special_ids: Sequence[int] = (),
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    grounded_ids: Sequence[int] = (),
    grounded_probability: float | None = None,
) -> MaskedTokens:
    """BERT masking (chapter 4): choose ``probability`` of the maskable tokens, then
    80% -> ``[MASK]``, 10% -> a random token, 10% unchanged.

    Every row that has a maskable token gets at least one chosen (UNITER forces
    one too), so no sequence is wasted; short sequences are therefore masked a
    little more than 15% on average: E[chosen] = n·p + (1-p)^n for n maskable.
    The random replacement is drawn uniformly from the vocabulary minus
    ``special_ids`` and ``mask_token_id`` (BERT draws from the whole
    vocabulary; UNITER from a range without special tokens), so a random token
    is never ``[PAD]`` or ``[CLS]``.

    Args:
        input_ids: ``(batch, seq)`` long token ids.
        maskable: ``(batch, seq)`` bool, True where a token may be chosen; build it with
            :func:`maskable_tokens` (never special or padding tokens).
        mask_token_id: the id of ``[MASK]``.
        vocab_size: the number of ids; random tokens are in ``[0, vocab_size)``.
        generator: the ``torch.Generator`` for every draw.
        special_ids: ids a random replacement must never be.
        probability: the fraction of maskable tokens chosen (0.15).
        mask_fraction, random_fraction: of the chosen, the share made ``[MASK]`` (0.8)
            and the share made a random token (0.1); the rest stay unchanged.
        grounded_ids: token ids chosen with ``grounded_probability`` instead of
            ``probability`` (the words the image decides; empty: BERT's rule).
        grounded_probability: their chance, required with ``grounded_ids``.

    Returns:
        :class:`MaskedTokens` ``(inputs, labels)``, both ``(batch, seq)`` long; ``labels`` holds
        the original id at chosen positions and -100 elsewhere.
    """
    _check_tensor("input_ids", input_ids, ndim=2, dtype=torch.long)
    _check_tensor("maskable", maskable, ndim=2, dtype=torch.bool)
    _check_same_shape("maskable", maskable, "input_ids", input_ids)
    _check_generator(generator)
    _check_probability("probability", probability)
    _check_probability("mask_fraction", mask_fraction, allow_zero=True)
    _check_probability("random_fraction", random_fraction, allow_zero=True)
    if mask_fraction + random_fraction > 1:
        raise ValueError(
            f"mask_fraction + random_fraction must be <= 1, got {mask_fraction} + {random_fraction}"
        )
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"mask_token_id must be an int in [0, vocab_size={vocab_size}), got {mask_token_id!r}"
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"input_ids must lie in [0, vocab_size={vocab_size}), got min {int(input_ids.min())}, "
            f"max {int(input_ids.max())}"
        )
    grounded_ids = check_grounded_words(grounded_ids, grounded_probability, vocab_size)
    chance = _token_chances(input_ids, probability, grounded_ids, grounded_probability)
    excluded = torch.tensor(sorted({*special_ids, mask_token_id}), dtype=torch.long)
    candidates = torch.arange(vocab_size)[~torch.isin(torch.arange(vocab_size), excluded)]
    if candidates.numel() == 0 and random_fraction > 0:
        raise ValueError(
            "special_ids cover the whole vocabulary: no id is left for random replacement"
        )

    device = input_ids.device
    chosen = (_uniform(input_ids.shape, generator, device) < chance) & maskable
    chosen = _force_one(chosen, maskable, generator)

    # One draw decides the fate of each chosen token: [0, 0.8) mask, [0.8, 0.9) random, rest kept.
    fate = _uniform(input_ids.shape, generator, device)
    to_mask = chosen & (fate < mask_fraction)
    to_random = chosen & (fate >= mask_fraction) & (fate < mask_fraction + random_fraction)

    inputs = input_ids.clone()
    inputs[to_mask] = mask_token_id
    if candidates.numel():
        draw = torch.randint(
            candidates.numel(), input_ids.shape, generator=generator, device=generator.device
        )
        random_ids = candidates.to(generator.device)[draw].to(device)
        inputs[to_random] = random_ids[to_random]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return MaskedTokens(inputs, labels)


# ----------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------


@dataclass
class RegionMasking:
    """Which regions :func:`mask_regions` chose.

    Attributes:
        masked: ``(batch, regions)`` bool, the chosen regions: the MRM losses are scored here.
        zeroed: ``(batch, regions)`` bool, the chosen regions whose features are zeroed
            (a subset of ``masked``); the rest of ``masked`` are fed unchanged.
    """

    masked: Tensor
    zeroed: Tensor

    @property
    def kept(self) -> Tensor:
        """``(batch, regions)`` bool: chosen but fed unchanged (ViLBERT's 10%)."""
        return self.masked & ~self.zeroed


def mask_regions(
    region_mask: Tensor,
    generator: torch.Generator,
    probability: float = 0.15,
    zero_fraction: float = 0.9,
) -> RegionMasking:
    """Choose regions for masked region modelling (chapter 4).

    Each real region is chosen with ``probability`` (0.15); at least one real
    region is chosen in every sample that has one (UNITER's rule, which also
    keeps the MRM loss from dividing by zero). Of the chosen, ``zero_fraction``
    get their features zeroed (ViLBERT: 0.9; UNITER: 1.0) and the rest are fed
    unchanged. Padded regions are never chosen.

    Args:
        region_mask: ``(batch, regions)`` bool, True for real regions, False for padding.
        generator: the ``torch.Generator`` for every draw.
        probability: the chance that a real region is chosen.
        zero_fraction: the share of chosen regions whose features are zeroed.

    Returns:
        :class:`RegionMasking` with ``masked`` and ``zeroed``, both ``(batch, regions)`` bool.
        Zero the features with :func:`apply_region_mask`.
    """
    _check_tensor("region_mask", region_mask, ndim=2, dtype=torch.bool)
    _check_generator(generator)
    _check_probability("probability", probability)
    _check_probability("zero_fraction", zero_fraction, allow_zero=True)
    device = region_mask.device
    masked = (_uniform(region_mask.shape, generator, device) < probability) & region_mask
    masked = _force_one(masked, region_mask, generator)
    zeroed = masked & (_uniform(region_mask.shape, generator, device) < zero_fraction)
    return RegionMasking(masked=masked, zeroed=zeroed)


def apply_region_mask(region_feats: Tensor, zeroed: Tensor) -> Tensor:
    """Return a copy of ``region_feats`` ``(batch, regions, dim)`` with the ``zeroed``
    ``(batch, regions)`` regions set to 0 (the input is left untouched: it is the MRFR target)."""
    _check_tensor("region_feats", region_feats, ndim=3)
    _check_tensor("zeroed", zeroed, ndim=2, dtype=torch.bool)
    if zeroed.shape != region_feats.shape[:2]:
        raise ValueError(
            f"zeroed must have shape (batch, regions) = {tuple(region_feats.shape[:2])}, got {tuple(zeroed.shape)}"
        )
    return region_feats.masked_fill(zeroed[..., None], 0.0)


# ----------------------------------------------------------------------------
# Conditional masking (UNITER) and joint random masking (its ablation)
# ----------------------------------------------------------------------------


@dataclass
class MultimodalMasking:
    """The masks for one image-text batch (chapter 4, chapter 6).

    Attributes:
        input_ids: ``(batch, seq)`` the text to feed the model.
        labels: ``(batch, seq)`` MLM targets, -100 where there is none.
        region_masked: ``(batch, regions)`` bool, where the MRM losses are scored.
        region_zeroed: ``(batch, regions)`` bool, whose features to zero (:func:`apply_region_mask`).
        text_masked: ``(batch,)`` bool, samples whose text was masked.
        image_masked: ``(batch,)`` bool, samples whose regions were masked.
    """

    input_ids: Tensor
    labels: Tensor
    region_masked: Tensor
    region_zeroed: Tensor
    text_masked: Tensor
    image_masked: Tensor


def _mask_both(
    input_ids: Tensor,
    maskable: Tensor,
    region_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    special_ids: Sequence[int],
    probability: float,
    zero_fraction: float,
    grounded_ids: Sequence[int] = (),
    grounded_probability: float | None = None,
) -> tuple[MaskedTokens, RegionMasking]:
    _check_tensor("region_mask", region_mask, ndim=2, dtype=torch.bool)
    _check_tensor("input_ids", input_ids, ndim=2)
    if region_mask.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"region_mask must have batch size {input_ids.shape[0]} like input_ids, got {region_mask.shape[0]}"
        )
    tokens = mask_tokens(
        input_ids,
        maskable,
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
        generator=generator,
        special_ids=special_ids,
        probability=probability,
        grounded_ids=grounded_ids,
        grounded_probability=grounded_probability,
    )
    regions = mask_regions(
        region_mask, generator, probability=probability, zero_fraction=zero_fraction
    )
    return tokens, regions


def _restrict(
    input_ids: Tensor, tokens: MaskedTokens, regions: RegionMasking, text: Tensor, image: Tensor
) -> MultimodalMasking:
    return MultimodalMasking(
        input_ids=torch.where(text[:, None], tokens.inputs, input_ids),
        labels=torch.where(
            text[:, None], tokens.labels, torch.full_like(tokens.labels, IGNORE_INDEX)
        ),
        region_masked=regions.masked & image[:, None],
        region_zeroed=regions.zeroed & image[:, None],
        text_masked=text,
        image_masked=image,
    )


def conditional_masking(
    input_ids: Tensor,
    maskable: Tensor,
    region_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    special_ids: Sequence[int] = (),
    probability: float = 0.15,
    zero_fraction: float = 1.0,
    text_probability: float = 0.5,
    grounded_ids: Sequence[int] = (),
    grounded_probability: float | None = None,
) -> MultimodalMasking:
    """UNITER's conditional masking: per sample, mask exactly one modality and keep the other intact.

    Each sample masks its text with probability ``text_probability`` (0.5),
    otherwise its regions. A sample with nothing maskable in the drawn
    modality masks the other one instead; a sample with nothing maskable in
    either masks neither. Within the chosen modality the rules are those of
    :func:`mask_tokens` and :func:`mask_regions` (at least one token / region).

    UNITER's code realises this per *task* (an MLM batch masks only text, an
    MRM batch only regions); drawing the modality per sample gives each batch
    both kinds. ``zero_fraction`` defaults to 1.0 because UNITER zeroes every
    masked region (ViLBERT's 90/10 is ``zero_fraction=0.9``).

    Args:
        input_ids: ``(batch, seq)`` long token ids.
        maskable: ``(batch, seq)`` bool, see :func:`maskable_tokens`.
        region_mask: ``(batch, regions)`` bool, True for real regions.
        mask_token_id, vocab_size, special_ids, probability: as in :func:`mask_tokens`.
        grounded_ids, grounded_probability: as in :func:`mask_tokens` (they apply to words only).
        generator: the ``torch.Generator`` for every draw.
        zero_fraction: as in :func:`mask_regions`.
        text_probability: the chance that a sample's text (not its image) is masked.

    Returns:
        :class:`MultimodalMasking`; ``text_masked ^ image_masked`` is True for every sample that
        has anything maskable.
    """
    _check_probability("text_probability", text_probability, allow_zero=True)
    tokens, regions = _mask_both(
        input_ids,
        maskable,
        region_mask,
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
        generator=generator,
        special_ids=special_ids,
        probability=probability,
        zero_fraction=zero_fraction,
        grounded_ids=grounded_ids,
        grounded_probability=grounded_probability,
    )
    has_text, has_image = maskable.any(dim=1), region_mask.any(dim=1)
    coin = _uniform((input_ids.shape[0],), generator, input_ids.device) < text_probability
    text = has_text & (coin | ~has_image)
    image = has_image & ~text
    return _restrict(input_ids, tokens, regions, text, image)


def joint_masking(
    input_ids: Tensor,
    maskable: Tensor,
    region_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    special_ids: Sequence[int] = (),
    probability: float = 0.15,
    zero_fraction: float = 1.0,
    grounded_ids: Sequence[int] = (),
    grounded_probability: float | None = None,
) -> MultimodalMasking:
    """Joint random masking, the alternative in UNITER's ablation: text and regions are
    masked independently in the same sample, so a masked word may have lost the very
    region that would explain it. Arguments as in :func:`conditional_masking`."""
    tokens, regions = _mask_both(
        input_ids,
        maskable,
        region_mask,
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
        generator=generator,
        special_ids=special_ids,
        probability=probability,
        zero_fraction=zero_fraction,
        grounded_ids=grounded_ids,
        grounded_probability=grounded_probability,
    )
    return _restrict(input_ids, tokens, regions, maskable.any(dim=1), region_mask.any(dim=1))
