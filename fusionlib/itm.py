"""Image-text matching pairs: which negatives a model learns to reject (chapter 4; used in chapters 5 and 6).

ITM asks one yes/no question of a pair: is this text true of this image? The
data only hold matching pairs, so half of them are turned into negatives, and
*which* negatives they become decides what the model can learn:

``"random"``
    The text (ViLBERT) or the image (UNITER) of another sample of the batch,
    as both papers do. On our world about one in eleven of these "negatives"
    is true of its image (chapter 2), so the model is taught to say "no" to
    true pairs.
``"false"`` (the default)
    The same draw, among the batch's pairs that the truth judge
    (:mod:`fusionlib.data.truth`) calls false, using the batch's
    ``text_facts`` and ``image_objects``.
hard negatives (``hard_share``)
    A share of the negatives keeps its image and gets a *minimal edit* of
    its own text instead ("left" for "right", another colour, the two objects
    swapped), from the batch's ``edit_input_ids``. They are false, and they
    differ from the truth in one thing only, so a model cannot reject them
    without reading that thing. Edits are drawn kind by kind: first a kind,
    uniformly among the kinds the text has, then an edit of that kind.

:func:`draw_pairs` makes the draw, :func:`edit_texts` builds the edited
token ids. Real corpora have no judge: use ``"random"`` there.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
from torch import Tensor

from .losses import random_negatives

ITM_NEGATIVES = ("random", "false")
SWAPS = ("text", "image")


class ItmPairs(NamedTuple):
    """What :func:`draw_pairs` returns, all ``(B,)`` long on the CPU.

    ``partner[i]``: the sample whose text (``swap="text"``) or image
    (``swap="image"``) sample ``i`` is paired with (``i`` itself for a
    positive or a hard negative). ``labels[i]``: 1 match, 0 negative.
    ``edit[i]``: which of sample ``i``'s minimal edits replaces its text, -1
    for none. ``edit_kind[i]``: that edit's index in
    ``fusionlib.data.truth.EDIT_KINDS``, -1 for none.
    """

    partner: Tensor
    labels: Tensor
    edit: Tensor
    edit_kind: Tensor


def check_settings(negatives: str, hard_share: float) -> None:
    """Raise ``ValueError`` naming the setting when ``negatives`` or ``hard_share`` is not allowed."""
    if negatives not in ITM_NEGATIVES:
        raise ValueError(f"itm_negatives must be one of {ITM_NEGATIVES}, got {negatives!r}")
    if isinstance(hard_share, bool) or not isinstance(hard_share, (int, float)) or not 0.0 <= hard_share <= 1.0:
        raise ValueError(f"hard_negative_share must be a number in [0, 1], got {hard_share!r}")


def _key(batch: Mapping[str, Tensor], key: str, why: str) -> Tensor:
    value = batch.get(key)
    if not isinstance(value, Tensor):
        raise ValueError(f"{why} needs batch[{key!r}], which this batch does not have (keys: {sorted(batch)})")
    return value


def draw_pairs(batch: Mapping[str, Tensor], generator: torch.Generator, probability: float = 0.5,
               negatives: str = "false", hard_share: float = 0.0, swap: str = "text") -> ItmPairs:
    """Decide, for each sample of ``batch``, whether it stays a match or becomes a negative, and how.

    Each sample becomes a negative with ``probability``; of those, a share
    ``hard_share`` (if the sample has an edit) gets a minimal edit of its own
    text, the others a partner from the batch: any other image
    (``"random"``) or one whose pair the judge calls false (``"false"``).
    Duplicates of the sample's image (same ``image_index``) are never
    partners. A sample with no valid partner stays a match, as in
    :func:`fusionlib.losses.random_negatives`. ``swap`` says whose text
    the judge reads: ``"text"``, sample ``i``'s image with ``j``'s text
    (ViLBERT); ``"image"``, ``i``'s text with ``j``'s image (UNITER).

    With ``negatives="random"`` and ``hard_share=0`` the draws are exactly
    those of ``random_negatives``. Every draw comes from ``generator`` (CPU).
    """
    check_settings(negatives, hard_share)
    if swap not in SWAPS:
        raise ValueError(f"swap must be one of {SWAPS}, got {swap!r}")
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
        raise ValueError(f"probability must be a number in [0, 1], got {probability!r}")
    image_index = _key(batch, "image_index", "ITM (negatives must never show the same image)")
    B = image_index.shape[0]
    if tuple(image_index.shape) != (B,) or image_index.is_floating_point():
        raise ValueError(f"batch['image_index'] must be integer (batch,), got {image_index.dtype} "
                         f"{tuple(image_index.shape)}")
    allowed = None
    if negatives == "false":
        from .data import truth

        why = ("itm_negatives='false' (the truth judge of the synthetic world; for a corpus without one, "
               "use itm_negatives='random')")
        facts, objects = _key(batch, "text_facts", why), _key(batch, "image_objects", why)
        if facts.shape[0] != B or objects.shape[0] != B:
            raise ValueError(f"batch['text_facts'] and batch['image_objects'] must have {B} rows like "
                             f"image_index, got {tuple(facts.shape)} and {tuple(objects.shape)}")
        true = truth.evaluate(facts, objects).cpu()                  # (B, B): text i is true of image j
        allowed = ~true.T if swap == "text" else ~true                # [i, j]: may j be i's partner?
    drawn = random_negatives(B, generator, p=probability, group_ids=image_index.cpu(), allowed=allowed)
    partner, labels = drawn.partner.cpu(), drawn.labels.cpu()
    edit = torch.full((B,), -1, dtype=torch.long)
    edit_kind = torch.full((B,), -1, dtype=torch.long)
    if hard_share > 0:
        kinds = _key(batch, "edit_kinds", f"hard_negative_share={hard_share} (build the CaptionDataset with edits=E)")
        _key(batch, "edit_input_ids", f"hard_negative_share={hard_share}")
        kinds = kinds.cpu()
        if kinds.dim() != 2 or kinds.shape[0] != B:
            raise ValueError(f"batch['edit_kinds'] must be (batch, edits) = ({B}, E), got {tuple(kinds.shape)}")
        valid = kinds >= 0                                                     # (B, E)
        hard = (labels == 0) & (torch.rand(B, generator=generator) < hard_share) & valid.any(dim=1)
        # Kind-balanced: each kind the text has gets the same weight, split among its edits.
        same_kind = (kinds[:, :, None] == kinds[:, None, :]) & valid[:, None, :]
        weights = torch.where(valid, 1.0 / same_kind.sum(-1).clamp(min=1).float(), torch.zeros(()))
        weights = torch.where(valid.any(dim=1, keepdim=True), weights, torch.ones_like(weights))
        choice = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        edit = torch.where(hard, choice, edit)
        edit_kind = torch.where(hard, kinds.gather(1, choice[:, None]).squeeze(1), edit_kind)
        partner = torch.where(hard, torch.arange(B), partner)
        labels = torch.where(hard, torch.zeros_like(labels), labels)
    return ItmPairs(partner, labels, edit, edit_kind)


def edit_texts(input_ids: Tensor, attention_mask: Tensor, batch: Mapping[str, Tensor], edit: Tensor,
               pad_token_id: int) -> tuple[Tensor, Tensor]:
    """``input_ids``/``attention_mask (B, T)`` with row ``i`` replaced by its edit ``edit[i]`` where ``edit[i] >= 0``.

    The edits come from ``batch["edit_input_ids"] (B, E, Te)``. Both are
    right-padded to the longer of the two and trimmed back to the longest
    real text, so the result is ``(B, T')`` with ``T' >= 1``.
    """
    if not bool((edit >= 0).any()):
        return input_ids, attention_mask
    edits = _key(batch, "edit_input_ids", "edited texts")
    B, T = input_ids.shape
    if edits.dim() != 3 or edits.shape[0] != B:
        raise ValueError(f"batch['edit_input_ids'] must be (batch, edits, tokens) = ({B}, E, Te), "
                         f"got {tuple(edits.shape)}")
    device = input_ids.device
    rows = edit.to(device)
    chosen = edits.to(device)[torch.arange(B, device=device), rows.clamp(min=0)]     # (B, Te)
    width = max(T, chosen.shape[1])
    ids = torch.nn.functional.pad(input_ids, (0, width - T), value=pad_token_id)
    mask = torch.nn.functional.pad(attention_mask, (0, width - T), value=False)
    chosen = torch.nn.functional.pad(chosen, (0, width - chosen.shape[1]), value=pad_token_id)
    use = (rows >= 0)[:, None]
    ids = torch.where(use, chosen, ids)
    mask = torch.where(use, chosen != pad_token_id, mask)
    longest = int(mask.sum(dim=1).max())
    return ids[:, :longest], mask[:, :longest]
