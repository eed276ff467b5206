"""Image-text matching pairs: which negatives a model learns to reject (chapter 4; used in chapters 5 and 6).

ITM asks one yes/no question of a pair: is this text true of this image? The
data only hold matching pairs, so half of them are turned into negatives, and
*which* negatives they become decides what the model can learn:

``"random"``
    The text (ViLBERT) or the image (UNITER) of another sample of the batch,
    as both papers do. On our world about one in ten of these "negatives"
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
token ids (ViLBERT and UNITER call both); :func:`matching_step` trains any
model with a match head the same way. :func:`edit_pairs` and
:func:`edit_accuracy` measure, on held-out texts, whether a model prefers
each text to its minimal edits, kind by kind. Real corpora have no judge:
use ``"random"`` there.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from . import runtime
from .data.truth import EDIT_KINDS
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


def check_settings(
    negatives: str,
    hard_share: float,
    hard_kinds: Sequence[str] = EDIT_KINDS,
    names: tuple[str, str, str] = ("negatives", "hard_share", "hard_kinds"),
) -> tuple[str, ...]:
    """Raise ``ValueError`` naming the setting when one is not allowed; return ``hard_kinds`` as a tuple.

    ``names`` are what the caller calls the three settings in its messages:
    the arguments of :func:`draw_pairs`, or a config's ``itm_negatives``,
    ``hard_negative_share`` and ``hard_negative_kinds``.
    """
    negatives_name, share_name, kinds_name = names
    if negatives not in ITM_NEGATIVES:
        raise ValueError(f"{negatives_name} must be one of {ITM_NEGATIVES}, got {negatives!r}")
    if (
        isinstance(hard_share, bool)
        or not isinstance(hard_share, (int, float))
        or not 0.0 <= hard_share <= 1.0
    ):
        raise ValueError(f"{share_name} must be a number in [0, 1], got {hard_share!r}")
    if (
        isinstance(hard_kinds, str)
        or not isinstance(hard_kinds, Sequence)
        or not hard_kinds
        or any(k not in EDIT_KINDS for k in hard_kinds)
        or len(set(hard_kinds)) != len(hard_kinds)
    ):
        raise ValueError(
            f"{kinds_name} must be distinct kinds among {EDIT_KINDS}, got {hard_kinds!r}"
        )
    return tuple(hard_kinds)


CONFIG_NAMES = (
    "itm_negatives",
    "hard_negative_share",
    "hard_negative_kinds",
)  # the fields of the model configs


def _key(batch: Mapping[str, Tensor], key: str, why: str) -> Tensor:
    value = batch.get(key)
    if not isinstance(value, Tensor):
        raise ValueError(
            f"{why} needs batch[{key!r}], which this batch does not have (keys: {sorted(batch)})"
        )
    return value


def draw_pairs(
    batch: Mapping[str, Tensor],
    generator: torch.Generator,
    probability: float = 0.5,
    negatives: str = "false",
    hard_share: float = 0.0,
    swap: str = "text",
    hard_kinds: Sequence[str] = EDIT_KINDS,
) -> ItmPairs:
    """Decide, for each sample of ``batch``, whether it stays a match or becomes a negative, and how.

    Each sample becomes a negative with ``probability``; of those, a share
    ``hard_share`` (if the sample has an edit) gets a minimal edit of its own
    text, the others a partner from the batch: any other image
    (``"random"``) or one whose pair the judge calls false (``"false"``).
    Duplicates of the sample's image (same ``image_index``) are never
    partners. A sample with no valid partner stays a match, as in
    :func:`fusionlib.losses.random_negatives`, even when it has edits: hard
    negatives are taken among the samples that became negatives. ``swap`` says whose text
    the judge reads: ``"text"``, sample ``i``'s image with ``j``'s text
    (ViLBERT); ``"image"``, ``i``'s text with ``j``'s image (UNITER).

    With ``negatives="random"`` and ``hard_share=0`` the draws are exactly
    those of ``random_negatives``. ``hard_kinds`` limits the edits to some
    kinds (chapter 4: colour and shape edits teach little that false
    negatives do not). Every draw comes from ``generator`` (CPU).
    """
    hard_kinds = check_settings(negatives, hard_share, hard_kinds)
    if swap not in SWAPS:
        raise ValueError(f"swap must be one of {SWAPS}, got {swap!r}")
    if (
        isinstance(probability, bool)
        or not isinstance(probability, (int, float))
        or not 0 <= probability <= 1
    ):
        raise ValueError(f"probability must be a number in [0, 1], got {probability!r}")
    image_index = _key(batch, "image_index", "ITM (negatives must never show the same image)")
    B = image_index.shape[0]
    if tuple(image_index.shape) != (B,) or image_index.is_floating_point():
        raise ValueError(
            f"batch['image_index'] must be integer (batch,), got {image_index.dtype} "
            f"{tuple(image_index.shape)}"
        )
    allowed = None
    if negatives == "false":
        from .data import truth

        why = (
            "itm_negatives='false' (the truth judge of the synthetic world; for a corpus without one, "
            "use itm_negatives='random')"
        )
        facts, objects = _key(batch, "text_facts", why), _key(batch, "image_objects", why)
        if facts.shape[0] != B or objects.shape[0] != B:
            raise ValueError(
                f"batch['text_facts'] and batch['image_objects'] must have {B} rows like "
                f"image_index, got {tuple(facts.shape)} and {tuple(objects.shape)}"
            )
        true = truth.evaluate(facts, objects).cpu()  # (B, B): text i is true of image j
        allowed = ~true.T if swap == "text" else ~true  # [i, j]: may j be i's partner?
    drawn = random_negatives(
        B, generator, p=probability, group_ids=image_index.cpu(), allowed=allowed
    )
    partner, labels = drawn.partner.cpu(), drawn.labels.cpu()
    edit = torch.full((B,), -1, dtype=torch.long)
    edit_kind = torch.full((B,), -1, dtype=torch.long)
    if hard_share > 0:
        kinds = _key(
            batch,
            "edit_kinds",
            f"hard_negative_share={hard_share} (build the CaptionDataset with edits=E)",
        )
        _key(batch, "edit_input_ids", f"hard_negative_share={hard_share}")
        kinds = kinds.cpu()
        if kinds.dim() != 2 or kinds.shape[0] != B:
            raise ValueError(
                f"batch['edit_kinds'] must be (batch, edits) = ({B}, E), got {tuple(kinds.shape)}"
            )
        wanted = torch.tensor([EDIT_KINDS.index(k) for k in hard_kinds])
        valid = torch.isin(kinds, wanted)  # (B, E): usable edits
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


def edit_texts(
    input_ids: Tensor,
    attention_mask: Tensor,
    batch: Mapping[str, Tensor],
    edit: Tensor,
    pad_token_id: int,
) -> tuple[Tensor, Tensor]:
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
        raise ValueError(
            f"batch['edit_input_ids'] must be (batch, edits, tokens) = ({B}, E, Te), "
            f"got {tuple(edits.shape)}"
        )
    device = input_ids.device
    rows = edit.to(device)
    chosen = edits.to(device)[torch.arange(B, device=device), rows.clamp(min=0)]  # (B, Te)
    width = max(T, chosen.shape[1])
    ids = torch.nn.functional.pad(input_ids, (0, width - T), value=pad_token_id)
    mask = torch.nn.functional.pad(attention_mask, (0, width - T), value=False)
    chosen = torch.nn.functional.pad(chosen, (0, width - chosen.shape[1]), value=pad_token_id)
    use = (rows >= 0)[:, None]
    ids = torch.where(use, chosen, ids)
    mask = torch.where(use, chosen != pad_token_id, mask)
    longest = int(mask.sum(dim=1).max())
    return ids[:, :longest], mask[:, :longest]


# ---------------------------------------------------------------------------
# Training any pair scorer, and measuring it on minimal edits
# ---------------------------------------------------------------------------


def matching_step(
    model: torch.nn.Module,
    batch: Mapping[str, Tensor],
    task: str = "itm",
    *,
    probability: float = 0.5,
    negatives: str = "false",
    hard_share: float = 0.0,
    hard_kinds: Sequence[str] = EDIT_KINDS,
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """ITM for any model that maps a batch to match logits ``(B, 2)``: a ``step_fn`` for :func:`fusionlib.train.train`.

    The pairs come from :func:`draw_pairs` with ``swap="text"`` (each image
    keeps its regions and gets another text, as in ViLBERT), the loss is the
    2-way cross-entropy (class 1 = match). Chapter 4 trains chapter 3's
    cross-attention model this way, with a 2-answer head, to compare kinds
    of negatives. ``pad_token_id`` is the tokenizer's (edited texts are
    padded with it). Returns ``{"loss", "accuracy", "hard_accuracy"}``
    (``hard_accuracy``: on the minimal edits of the batch, NaN if none).
    """
    generator = runtime.step_generator(generator)
    pairs = draw_pairs(
        batch, generator, probability, negatives, hard_share, swap="text", hard_kinds=hard_kinds
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    partner = pairs.partner.to(ids.device)
    ids, mask = edit_texts(ids[partner], mask[partner], batch, pairs.edit, pad_token_id)
    logits = model(dict(batch, input_ids=ids, attention_mask=mask))
    if isinstance(logits, tuple):  # (logits, attention maps)
        logits = logits[0]
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"model must return match logits (batch, 2), got {tuple(logits.shape)}")
    labels = pairs.labels.to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    correct = (logits.detach().argmax(-1) == labels).float()
    hard = (pairs.edit >= 0).to(logits.device)
    hard_accuracy = (
        correct[hard].mean()
        if bool(hard.any())
        else torch.full((), float("nan"), device=logits.device)
    )
    return {"loss": loss, "accuracy": correct.mean(), "hard_accuracy": hard_accuracy}


class EditPairs(NamedTuple):
    """Held-out pairs for measuring what a model checks (chapter 4); see :func:`edit_pairs`.

    ``matched``: every item's own (image, text) pair, a batch dict with ``N``
    rows. ``edited``: one row per minimal edit, ``M`` rows: the same image
    with the edited text. ``owner (M,)``: the row of ``matched`` each edit
    comes from. ``kind (M,)``: index into ``fusionlib.data.truth.EDIT_KINDS``.
    """

    matched: dict[str, Tensor]
    edited: dict[str, Tensor]
    owner: Tensor
    kind: Tensor


def edit_pairs(batch: Mapping[str, Tensor], pad_token_id: int) -> EditPairs:
    """Split a caption batch with ``edit_input_ids``/``edit_kinds`` into matched and edited pairs.

    Typically ``batch`` holds a whole held-out split,
    ``TensorBatches(CaptionDataset(test_scenes, ..., edits=E))`` gathered at
    once. Keys other than the edit keys are kept, rows repeated for the edits.
    ``pad_token_id`` is the tokenizer's: it marks the padding of the edits.
    """
    kinds = _key(batch, "edit_kinds", "edit_pairs (build the CaptionDataset with edits=E)")
    ids = _key(batch, "edit_input_ids", "edit_pairs")
    owner, which = torch.nonzero(kinds >= 0, as_tuple=True)
    if len(owner) == 0:
        raise ValueError("the batch holds no minimal edits (every edit_kinds entry is -1)")
    rows = {k: v for k, v in batch.items() if k not in ("edit_input_ids", "edit_kinds")}
    edited = {
        k: v[owner.to(v.device)]
        for k, v in rows.items()
        if k not in ("input_ids", "attention_mask")
    }
    edited_ids = ids[owner.to(ids.device), which.to(ids.device)]
    real = edited_ids != pad_token_id
    longest = int(real.sum(dim=1).max())
    edited["input_ids"], edited["attention_mask"] = edited_ids[:, :longest], real[:, :longest]
    return EditPairs(
        rows, edited, owner.cpu(), kinds[owner.to(kinds.device), which.to(kinds.device)].cpu()
    )


@torch.no_grad()
def score_pairs(score_fn, batch: Mapping[str, Tensor], batch_size: int = 512) -> Tensor:
    """``score_fn(chunk) -> (b,)`` over ``batch`` in chunks of ``batch_size`` rows; returns ``(N,)`` float on the CPU."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = batch["input_ids"].shape[0]
    out = []
    for start in range(0, n, batch_size):
        chunk = {k: v[start : start + batch_size] for k, v in batch.items()}
        scores = score_fn(chunk)
        if scores.shape != (min(batch_size, n - start),):
            raise ValueError(
                f"score_fn must return one score per pair ({min(batch_size, n - start)},), "
                f"got {tuple(scores.shape)}"
            )
        out.append(scores.float().cpu())
    return torch.cat(out)


def edit_accuracy(
    matched_scores: Tensor, edited_scores: Tensor, pairs: EditPairs
) -> dict[str, float]:
    """How often a text scores above its minimal edit on the same image, overall and per edit kind (chapter 4).

    Each (text, edit) pair is a two-way choice on one image (one half of
    Winoground's text score, which asks it of two images at once): a win when
    the true text scores higher, half a win on a tie, so chance is 0.5 for
    any model and no threshold is needed. Returns ``all`` and one key
    per edit kind present (``color``, ``relation``, ...), with ``n_<kind>``
    counts.
    """
    n, m = pairs.owner.max().item() + 1, len(pairs.owner)
    if matched_scores.dim() != 1 or matched_scores.shape[0] < n:
        raise ValueError(
            f"matched_scores must be (N,) with N >= {n}, got {tuple(matched_scores.shape)}"
        )
    if tuple(edited_scores.shape) != (m,):
        raise ValueError(
            f"edited_scores must be ({m},), one per edit, got {tuple(edited_scores.shape)}"
        )
    if bool(torch.isnan(matched_scores).any() | torch.isnan(edited_scores).any()):
        raise ValueError("scores must not be NaN")
    own = matched_scores.cpu()[pairs.owner]
    other = edited_scores.cpu()
    win = (own > other).float() + 0.5 * (own == other).float()
    out = {"all": float(win.mean())}
    for k, name in enumerate(EDIT_KINDS):
        chosen = pairs.kind == k
        if bool(chosen.any()):
            out[name] = float(win[chosen].mean())
            out[f"n_{name}"] = int(chosen.sum())
    return out
