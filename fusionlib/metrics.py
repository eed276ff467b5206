"""Metrics: VQA accuracy by question family, retrieval recall@K, ITM accuracy (chapters 2-6).

Every function returns plain Python floats (in a dict where there are
several), ready for ``runtime.write_results`` and for the history of
:func:`fusionlib.train.train`. A group with no examples (say, no "count"
questions in a batch) reports accuracy ``nan`` and count 0: undefined, not 0.

Two families of retrieval recall live here. :func:`recall_at_k`,
:func:`image_text_recall` and :func:`retrieval_chance` (chapters 5 and 6b)
count ties against the model: pessimistic, so constant scores earn 0.
:func:`expected_recall_at_k`, :func:`retrieval_scores` and
:func:`retrieval_bounds` (chapter 2, "When is a caption true?", used by
chapters 5 and 6) break ties uniformly at random and return the exact
expected recall, so constant scores earn exactly the chance level, and they
score a caption against every image it is true of, not only its own.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "vqa_accuracy",
    "evaluate_vqa",
    "recall_at_k",
    "image_text_recall",
    "retrieval_chance",
    "itm_accuracy",
    "expected_recall_at_k",
    "retrieval_scores",
    "retrieval_bounds",
    "mean_range",
]


def _as_predictions(logits_or_preds: Tensor) -> Tensor:
    if not isinstance(logits_or_preds, Tensor):
        raise TypeError(f"logits_or_preds must be a tensor, got {type(logits_or_preds).__name__}")
    if logits_or_preds.is_floating_point():
        if logits_or_preds.dim() != 2:
            raise ValueError(
                f"logits must have shape (N, num_answers), got {tuple(logits_or_preds.shape)}"
            )
        return logits_or_preds.argmax(dim=-1)
    if logits_or_preds.dim() != 1:
        raise ValueError(f"predictions must have shape (N,), got {tuple(logits_or_preds.shape)}")
    return logits_or_preds.long()


def _check_1d(name: str, x: Tensor | None, n: int, dtype: torch.dtype | None = None) -> None:
    if x is None:
        return
    if not isinstance(x, Tensor) or tuple(x.shape) != (n,):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape ({n},), got {got}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {x.dtype}")


def _rate(correct: Tensor, where: Tensor) -> tuple[float, int]:
    n = int(where.sum())
    return (float(correct[where].float().mean()) if n else math.nan), n


def vqa_accuracy(
    logits_or_preds: Tensor,
    answers: Tensor,
    families: Tensor | None = None,
    relational: Tensor | None = None,
    family_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Accuracy overall, per question family and for relational vs non-relational questions (chapter 3).

    Args:
        logits_or_preds: ``(N, num_answers)`` float logits, or ``(N,)`` long predicted answers.
        answers: ``(N,)`` long, the right answers.
        families: ``(N,)`` long, indices into ``family_names`` (default
            :data:`fusionlib.data.shapes.QUESTION_FAMILIES`), or None.
        relational: ``(N,)`` bool, or None.

    Returns:
        ``accuracy`` and ``n``; with ``relational``: ``relational_accuracy``,
        ``relational_n``, ``non_relational_accuracy``, ``non_relational_n``;
        with ``families``: ``<family>_accuracy`` and ``<family>_n`` for every
        family name (``closest_accuracy``, ``count_accuracy``, ...).
    """
    preds = _as_predictions(logits_or_preds)
    n = preds.shape[0]
    if n == 0:
        raise ValueError("logits_or_preds holds no examples")
    _check_1d("answers", answers, n)
    _check_1d("families", families, n)
    _check_1d("relational", relational, n, torch.bool)
    correct = preds.cpu() == answers.cpu().long()
    out: dict[str, float] = {"accuracy": float(correct.float().mean()), "n": n}
    if relational is not None:
        rel = relational.cpu()
        out["relational_accuracy"], out["relational_n"] = _rate(correct, rel)
        out["non_relational_accuracy"], out["non_relational_n"] = _rate(correct, ~rel)
    if families is not None:
        if family_names is None:
            from fusionlib.data.shapes import QUESTION_FAMILIES as family_names
        fam = families.cpu().long()
        if bool(((fam < 0) | (fam >= len(family_names))).any()):
            raise ValueError(
                f"families must be indices in [0, {len(family_names)}) into {tuple(family_names)}, "
                f"got values in [{int(fam.min())}, {int(fam.max())}]"
            )
        for k, name in enumerate(family_names):
            out[f"{name}_accuracy"], out[f"{name}_n"] = _rate(correct, fam == k)
    return out


def evaluate_vqa(
    model: nn.Module,
    loader: Any,
    device: torch.device | str | None = None,
    prefix: str = "",
    family_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Run ``model`` over every batch of ``loader`` and score it with :func:`vqa_accuracy`.

    ``model(batch)`` must return logits ``(B, num_answers)``; batches need
    ``answer`` and, for the breakdowns, ``family`` and ``relational``. Also
    reports ``loss``, the mean cross-entropy. Keys get ``prefix`` (e.g.
    ``"val_"`` gives ``val_accuracy``, the name ``TrainConfig.keep_best_by``
    expects). The model is evaluated in eval mode under ``no_grad`` and its
    mode is restored afterwards.
    """
    from fusionlib.train import to_device

    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    preds, answers, families, relational = [], [], [], []
    loss_sum = 0.0
    try:
        with torch.no_grad():
            for batch in loader:
                batch = to_device(batch, device)
                logits = model(batch)
                if isinstance(logits, tuple):  # (logits, attention weights)
                    logits = logits[0]
                loss_sum += float(F.cross_entropy(logits.float(), batch["answer"], reduction="sum"))
                preds.append(logits.argmax(dim=-1).cpu())
                answers.append(batch["answer"].cpu())
                if "family" in batch:
                    families.append(batch["family"].cpu())
                if "relational" in batch:
                    relational.append(batch["relational"].cpu())
    finally:
        model.train(was_training)
    if not preds:
        raise ValueError("loader yielded no batches")
    p, a = torch.cat(preds), torch.cat(answers)
    result = vqa_accuracy(
        p,
        a,
        torch.cat(families) if len(families) == len(preds) else None,
        torch.cat(relational) if len(relational) == len(preds) else None,
        family_names,
    )
    result["loss"] = loss_sum / len(p)
    return {f"{prefix}{k}": v for k, v in result.items()}


def recall_at_k(
    similarity: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K for retrieval: the fraction of queries with a right candidate among their top K (chapter 5).

    Args:
        similarity: ``(Nq, Nc)``, higher = more similar.
        positives: ``(Nq,)`` long, the index of each query's one right
            candidate; or ``(Nq, Nc)`` bool, True at every right candidate
            (an image has several captions). Every query needs at least one.
        ks: the K values.

    Returns ``{"R@1": ..., "R@5": ..., "R@10": ...}``. A query's rank is the
    number of wrong candidates scoring at least as high as its best right
    one; ties count against the model, so constant scores earn nothing.
    :func:`expected_recall_at_k` breaks ties at random instead (the two agree
    when no wrong candidate ties a query's best right one).
    """
    if (
        not isinstance(similarity, Tensor)
        or similarity.dim() != 2
        or not similarity.is_floating_point()
    ):
        raise ValueError(
            f"similarity must be a float (Nq, Nc) tensor, got "
            f"{tuple(similarity.shape) if isinstance(similarity, Tensor) else type(similarity).__name__}"
        )
    pos = _positive_mask(positives, *similarity.shape, similarity.device)
    ks = _check_ks(ks)
    sim = similarity.float()
    best_positive = sim.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)  # (Nq, 1)
    rank = ((sim >= best_positive) & ~pos).sum(dim=1)  # wrong ones ahead
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


def image_text_recall(
    similarity: Tensor, caption_image: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K both ways for image-text retrieval with several captions per image (chapter 5).

    ``similarity (N_images, N_captions)``; ``caption_image (N_captions,)`` long,
    the row (image) each caption describes. Returns ``i2t_R@K`` (an image
    finds any of its captions) and ``t2i_R@K`` (a caption finds its image).
    Ties count against the model as in :func:`recall_at_k`;
    :func:`retrieval_scores` gives the same keys with ties broken at random,
    plus recall against every image a caption is true of.
    """
    if not isinstance(similarity, Tensor) or similarity.dim() != 2:
        raise ValueError(
            f"similarity must be (N_images, N_captions), got "
            f"{tuple(similarity.shape) if isinstance(similarity, Tensor) else type(similarity).__name__}"
        )
    ni, nc = similarity.shape
    if not isinstance(caption_image, Tensor) or tuple(caption_image.shape) != (nc,):
        raise ValueError(f"caption_image must have shape ({nc},), one image index per caption")
    if bool(((caption_image < 0) | (caption_image >= ni)).any()):
        raise ValueError(f"caption_image must hold image indices in [0, {ni})")
    owner = caption_image.long().to(similarity.device)
    i2t = recall_at_k(
        similarity, torch.arange(ni, device=similarity.device)[:, None] == owner[None, :], ks
    )
    t2i = recall_at_k(similarity.t(), owner, ks)
    return {**{f"i2t_{k}": v for k, v in i2t.items()}, **{f"t2i_{k}": v for k, v in t2i.items()}}


def retrieval_chance(
    num_images: int, captions_per_image: int, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """The recall@K of a random ranking, for the keys of :func:`image_text_recall` (chapter 6b).

    Text to image: each caption has one right image among ``num_images``, so
    ``K / num_images``. Image to text: an image has ``captions_per_image``
    right captions among ``num_images * captions_per_image``, and a hit needs
    any of them in the top K: ``1 - C(N_c - c, K) / C(N_c, K)``.
    This is also what :func:`retrieval_scores` gives constant scores; for
    chance and ceiling against a truth matrix see :func:`retrieval_bounds`.
    """
    for name, value in (("num_images", num_images), ("captions_per_image", captions_per_image)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    ks = _check_ks(ks)
    n_c, c = num_images * captions_per_image, captions_per_image
    # With K above the wrong captions C(n_c - c, K) is 0 and the formula gives 1; with K above all
    # the captions C(n_c, K) is 0 too, and every caption is in the top K anyway.
    chance = {
        f"i2t_R@{k}": 1 - math.comb(n_c - c, k) / math.comb(n_c, k) if k <= n_c else 1.0 for k in ks
    }
    chance.update({f"t2i_R@{k}": min(1.0, k / num_images) for k in ks})
    return chance


def itm_accuracy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> float:
    """Image-text matching accuracy (chapters 4-6).

    ``logits``: ``(N, 2)`` (class 1 = match) or ``(N,)`` one logit per pair
    (> 0 = match). ``labels``: ``(N,)`` long 0/1; ``ignore_index`` entries are
    skipped. Returns nan when nothing is scored.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError("logits must be a float tensor")
    if logits.dim() == 2 and logits.shape[1] == 2:
        preds = logits.argmax(dim=-1)
    elif logits.dim() == 1:
        preds = (logits > 0).long()
    else:
        raise ValueError(f"logits must have shape (N, 2) or (N,), got {tuple(logits.shape)}")
    _check_1d("labels", labels, preds.shape[0])
    scored = labels != ignore_index
    if bool(((labels[scored] != 0) & (labels[scored] != 1)).any()):
        raise ValueError(f"labels must be 0, 1 or {ignore_index}")
    return _rate(preds.cpu() == labels.cpu(), scored.cpu())[0]


# ----------------------------------------------------------------------------------------------------------------
# Retrieval with honest ties and a truth judge (chapter 2, "When is a caption true?"; used by chapters 5 and 6)
# ----------------------------------------------------------------------------------------------------------------

_PRODUCT_CHUNK = 1024  # factors of the tie product computed at once per query


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    return type(x).__name__


def _indices(mask: Tensor, limit: int = 10) -> str:
    """``[3, 17, ...] (5 in all)``: the first ``limit`` True positions of a 1-d mask."""
    where = mask.nonzero().flatten().tolist()
    shown = ", ".join(str(i) for i in where[:limit])
    return f"[{shown}{', ...' if len(where) > limit else ''}] ({len(where)} in all)"


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if (
        isinstance(ks, (str, bytes))
        or not isinstance(ks, Sequence)
        or not ks
        or any(not isinstance(k, int) or isinstance(k, bool) or k <= 0 for k in ks)
    ):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return tuple(ks)


def _positive_mask(positives: Any, nq: int, nc: int, device: torch.device) -> Tensor:
    """``(Nq, Nc)`` bool of the right candidates, from ``(Nq,)`` integer indices or an ``(Nq, Nc)`` bool mask."""
    if not isinstance(positives, Tensor):
        raise ValueError(
            f"positives must be a ({nq},) integer or ({nq}, {nc}) bool tensor, "
            f"got {_describe(positives)}"
        )
    if positives.dtype == torch.bool:
        if tuple(positives.shape) != (nq, nc):
            raise ValueError(
                f"bool positives must have shape ({nq}, {nc}), got {tuple(positives.shape)}"
            )
        pos = positives.to(device)
    else:
        if positives.is_floating_point() or positives.is_complex():
            raise ValueError(f"index positives must have an integer dtype, got {positives.dtype}")
        if tuple(positives.shape) != (nq,):
            raise ValueError(
                f"index positives must have shape ({nq},), got {tuple(positives.shape)}"
            )
        bad = (positives < 0) | (positives >= nc)
        if bool(bad.any()):
            raise ValueError(
                f"index positives must be candidate indices in [0, {nc}), "
                f"got out-of-range values for queries {_indices(bad.cpu())}"
            )
        pos = torch.zeros(nq, nc, dtype=torch.bool, device=device)
        pos.scatter_(1, positives.long().to(device)[:, None], True)
    empty = ~pos.any(dim=1)
    if bool(empty.any()):
        raise ValueError(
            f"every query needs at least one positive candidate; queries {_indices(empty.cpu())} "
            f"have none"
        )
    return pos


def _check_scores(name: str, scores: Any, shape: str) -> Tensor:
    """A float 2-d tensor with no NaN; half precision is widened (exactly) to float32."""
    if not isinstance(scores, Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"{name} must be a float {shape} tensor, got {_describe(scores)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty {shape} tensor, got shape {tuple(scores.shape)}"
        )
    nan = torch.isnan(scores)
    if bool(nan.any()):
        raise ValueError(
            f"{name} must hold no NaN, got NaN in rows {_indices(nan.any(dim=1).cpu())}"
        )
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


def _tie_hit_probability(tied: Tensor, tied_right: Tensor, slots: Tensor) -> Tensor:
    """P(some right one among the first ``slots`` of ``tied`` candidates in random order), float64.

    All arguments are ``(Nq,)`` long: ``t``, ``p`` and ``j`` of
    :func:`expected_recall_at_k`. The miss probability
    ``C(t - p, j) / C(t, j) = prod_{i<j} (t - p - i) / (t - i)`` equals
    ``prod_{i<p} (t - j - i) / (t - i)`` (both are ``(t-p)! (t-j)! / (t! (t-p-j)!)``),
    so it is a product of ``min(j, p)`` factors ``(t - max(j, p) - i) / (t - i)``,
    each in (0, 1]: no overflow, relative error about ``min(j, p) * 1e-16``.
    """
    t, p, j = tied, tied_right, slots
    sure = j > t - p  # more slots than wrong ties: a right one is among them
    never = j <= 0  # the wrong candidates scoring above fill the top K
    n_factors = torch.where(sure | never, torch.zeros_like(j), torch.minimum(j, p))
    shift = torch.maximum(j, p)
    miss = torch.ones(t.shape, dtype=torch.float64, device=t.device)
    most = int(n_factors.max()) if n_factors.numel() else 0
    for start in range(0, most, _PRODUCT_CHUNK):
        rows = (n_factors > start).nonzero().flatten()
        i = torch.arange(
            start, min(start + _PRODUCT_CHUNK, most), dtype=torch.float64, device=t.device
        )
        t_r = t[rows].double()[:, None]
        factors = (t_r - shift[rows].double()[:, None] - i) / (t_r - i).clamp(min=1)
        factors = torch.where(i[None, :] < n_factors[rows, None], factors, torch.ones_like(factors))
        miss[rows] = miss[rows] * factors.prod(dim=1)
    hit = 1.0 - miss
    hit = torch.where(sure, torch.ones_like(hit), hit)
    return torch.where(never, torch.zeros_like(hit), hit)


def _expected_recall(sim: Tensor, pos: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """:func:`expected_recall_at_k` on checked arguments: ``pos`` (Nq, Nc) bool on ``sim``'s device."""
    best = sim.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)  # b, (Nq, 1)
    above = (sim > best).sum(dim=1)  # a: all wrong
    at_best = sim == best
    tied = at_best.sum(dim=1)  # t
    tied_right = (at_best & pos).sum(dim=1)  # p >= 1
    return {f"R@{k}": float(_tie_hit_probability(tied, tied_right, k - above).mean()) for k in ks}


def expected_recall_at_k(
    similarity: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K with ties broken uniformly at random: the exact expected recall (chapter 2; chapters 5, 6).

    Args:
        similarity: ``(Nq, Nc)`` float, higher = more similar; no NaN. Ties
            are exact equality in the given dtype (float64 stays float64).
        positives: ``(Nq,)`` integer, the index of each query's one right
            candidate; or ``(Nq, Nc)`` bool, True at every right candidate.
            Every query needs at least one.
        ks: the K values, positive ints (K above ``Nc`` gives 1).

    Returns ``{"R@1": ..., "R@5": ..., "R@10": ...}``, the mean over queries of
    the probability of a hit. Per query, with ``b`` the best score among its
    right candidates, ``a`` the number of candidates scoring strictly above
    ``b`` (all wrong), ``t`` the number scoring exactly ``b`` of which ``p``
    are right: a hit at K happens iff the first right one in the randomly
    ordered tie group sits at position ``<= j = K - a``, with probability 0
    if ``j <= 0``, else ``1 - C(t - p, j) / C(t, j)`` (1 when ``j > t - p``).
    Constant scores therefore earn the chance level, where :func:`recall_at_k`
    (ties against the model) gives 0; the two agree when no wrong candidate
    ties a query's best right one.
    """
    sim = _check_scores("similarity", similarity, "(Nq, Nc)")
    pos = _positive_mask(positives, *sim.shape, sim.device)
    return _expected_recall(sim, pos, _check_ks(ks))


def retrieval_scores(
    similarity: Tensor,
    text_image: Tensor,
    truth: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-text recall@K both ways, ties broken at random, optionally against a truth judge (chapter 2).

    Args:
        similarity: ``(N_images, N_texts)`` float, higher = more alike (the
            orientation of :func:`image_text_recall`); no NaN.
        text_image: ``(N_texts,)`` integer, the image each text was written
            for. Images no text was written for are distractors: candidates
            for the t2i keys, but not queries of the i2t keys.
        truth: ``(N_texts, N_images)`` bool, True where a text is true of an
            image (the orientation ``truth_matrix(texts, scenes)`` returns),
            or None. Every text must be true of its own image.
        ks: the K values, positive ints.

    Returns, all with the expected recall of :func:`expected_recall_at_k`:

    - ``i2t_R@K``: an image finds any of the texts written for it (mean over
      the images some text was written for);
    - ``t2i_R@K``: a text finds the one image it was written for (exact
      match). With one description per image and ``text_image = arange(N)``
      this is identification retrieval (description <-> image);
    - with ``truth``: ``truth_t2i_R@K`` (a text finds any image it is true
      of) and ``truth_i2t_R@K`` (an image finds any text true of it; mean
      over the same images as ``i2t_R@K``).

    A short caption is true of many images, so exact match punishes a model
    for ranking another image the caption fits equally well; the truth-aware
    keys do not. :func:`retrieval_bounds` gives both kinds' chance and ceiling.
    """
    sim = _check_scores("similarity", similarity, "(N_images, N_texts)")
    ks = _check_ks(ks)
    n_images, n_texts = sim.shape
    if (
        not isinstance(text_image, Tensor)
        or text_image.dtype == torch.bool
        or text_image.is_floating_point()
        or text_image.is_complex()
        or tuple(text_image.shape) != (n_texts,)
    ):
        raise ValueError(
            f"text_image must be an integer ({n_texts},) tensor, one image index per text "
            f"(similarity is (N_images, N_texts) = {tuple(sim.shape)}), got {_describe(text_image)}"
        )
    bad = (text_image < 0) | (text_image >= n_images)
    if bool(bad.any()):
        raise ValueError(
            f"text_image must hold image indices in [0, {n_images}), got values in "
            f"[{int(text_image.min())}, {int(text_image.max())}] for texts {_indices(bad.cpu())}"
        )
    owner = text_image.long().to(sim.device)
    written_for = (
        torch.arange(n_images, device=sim.device)[:, None] == owner[None, :]
    )  # (N_images, N_texts)
    queried = written_for.any(dim=1)  # images without a text of their own are only distractors
    if truth is not None:
        if (
            not isinstance(truth, Tensor)
            or truth.dtype != torch.bool
            or tuple(truth.shape) != (n_texts, n_images)
        ):
            hint = (
                " (pass truth as (N_texts, N_images), not transposed)"
                if isinstance(truth, Tensor)
                and tuple(truth.shape) == (n_images, n_texts)
                and n_images != n_texts
                else ""
            )
            raise ValueError(
                f"truth must be a bool (N_texts, N_images) = ({n_texts}, {n_images}) tensor{hint}, "
                f"got {_describe(truth)}"
            )
        true_of = truth.to(sim.device)
        false_of_own = ~true_of[torch.arange(n_texts, device=sim.device), owner]
        if bool(false_of_own.any()):
            raise ValueError(
                f"every text must be true of its own image (truth[k, text_image[k]]), but texts "
                f"{_indices(false_of_own.cpu())} are not: the truth judge or the data is broken"
            )
    out = {
        f"i2t_{k}": v for k, v in _expected_recall(sim[queried], written_for[queried], ks).items()
    }
    out.update({f"t2i_{k}": v for k, v in _expected_recall(sim.t(), written_for.t(), ks).items()})
    if truth is not None:
        out.update({f"truth_t2i_{k}": v for k, v in _expected_recall(sim.t(), true_of, ks).items()})
        out.update(
            {
                f"truth_i2t_{k}": v
                for k, v in _expected_recall(sim[queried], true_of.t()[queried], ks).items()
            }
        )
    return out


def retrieval_bounds(
    truth: Tensor, text_image: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """Chance and ceiling for every key of :func:`retrieval_scores` with ``truth`` (chapter 2; chapters 5, 6).

    Args:
        truth: ``(N_texts, N_images)`` bool, as ``truth_matrix`` returns; every
            text true of its own image.
        text_image: ``(N_texts,)`` integer, the image each text was written for.
        ks: the K values.

    Returns ``{"chance": {...}, "ceiling": {...}}``, each with the keys of
    ``retrieval_scores(similarity, text_image, truth, ks)``. Both come from
    that one function, so they share its formula and tie rule:

    - chance is ``retrieval_scores`` of a constant similarity: all scores
      tie, so the random tie-break is a uniformly random ranking (for the
      exact-match keys this is :func:`retrieval_chance`);
    - ceiling is ``retrieval_scores`` of ``truth.T.float()``: a perfect truth
      judge scoring 1 for every true pair and 0 otherwise, ties broken at
      random. The truth-aware ceilings are 1; an exact-match ceiling is below
      1 when a text is true of other images than its own, which no model can
      tell apart from its own image by what the text says.
    """
    if not isinstance(truth, Tensor) or truth.dtype != torch.bool or truth.dim() != 2:
        raise ValueError(f"truth must be a bool (N_texts, N_images) tensor, got {_describe(truth)}")
    constant = torch.zeros(truth.shape[1], truth.shape[0], device=truth.device)
    return {
        "chance": retrieval_scores(constant, text_image, truth, ks),
        "ceiling": retrieval_scores(truth.t().float(), text_image, truth, ks),
    }


def mean_range(values: Sequence[float], digits: int = 3) -> str:
    """A metric over seeds as the book prints it (chapters 4, 6b): ``"0.855 (0.814–0.929)"``.

    The mean, then the lowest and highest value in brackets; only the mean
    when every value rounds the same at ``digits`` (the seeds agree).
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values must hold at least one number, got none")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"values must not be NaN, got {values}")
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise ValueError(f"digits must be an int >= 0, got {digits!r}")
    lo, hi, mean = min(values), max(values), sum(values) / len(values)
    if hi - lo < 10**-digits:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"
