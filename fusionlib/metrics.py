"""Metrics: VQA accuracy by question family, retrieval recall@K, ITM accuracy (chapters 3-6).

Every function returns plain Python floats (in a dict where there are
several), ready for ``runtime.write_results`` and for the history of
:func:`fusionlib.train.train`. A group with no examples (say, no "count"
questions in a batch) reports accuracy ``nan`` and count 0: undefined, not 0.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["vqa_accuracy", "evaluate_vqa", "recall_at_k", "image_text_recall", "retrieval_chance", "itm_accuracy"]


def _as_predictions(logits_or_preds: Tensor) -> Tensor:
    if not isinstance(logits_or_preds, Tensor):
        raise TypeError(f"logits_or_preds must be a tensor, got {type(logits_or_preds).__name__}")
    if logits_or_preds.is_floating_point():
        if logits_or_preds.dim() != 2:
            raise ValueError(f"logits must have shape (N, num_answers), got {tuple(logits_or_preds.shape)}")
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


def vqa_accuracy(logits_or_preds: Tensor, answers: Tensor, families: Tensor | None = None,
                 relational: Tensor | None = None, family_names: Sequence[str] | None = None) -> dict[str, float]:
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
            raise ValueError(f"families must be indices in [0, {len(family_names)}) into {tuple(family_names)}, "
                             f"got values in [{int(fam.min())}, {int(fam.max())}]")
        for k, name in enumerate(family_names):
            out[f"{name}_accuracy"], out[f"{name}_n"] = _rate(correct, fam == k)
    return out


def evaluate_vqa(model: nn.Module, loader: Any, device: torch.device | str | None = None, prefix: str = "",
                 family_names: Sequence[str] | None = None) -> dict[str, float]:
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
                if isinstance(logits, tuple):          # (logits, attention weights)
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
    result = vqa_accuracy(p, a, torch.cat(families) if len(families) == len(preds) else None,
                          torch.cat(relational) if len(relational) == len(preds) else None, family_names)
    result["loss"] = loss_sum / len(p)
    return {f"{prefix}{k}": v for k, v in result.items()}


def recall_at_k(similarity: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
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
    """
    if not isinstance(similarity, Tensor) or similarity.dim() != 2 or not similarity.is_floating_point():
        raise ValueError(f"similarity must be a float (Nq, Nc) tensor, got "
                         f"{tuple(similarity.shape) if isinstance(similarity, Tensor) else type(similarity).__name__}")
    nq, nc = similarity.shape
    if positives.dtype == torch.bool:
        if tuple(positives.shape) != (nq, nc):
            raise ValueError(f"bool positives must have shape ({nq}, {nc}), got {tuple(positives.shape)}")
        pos = positives.to(similarity.device)
    else:
        if tuple(positives.shape) != (nq,):
            raise ValueError(f"index positives must have shape ({nq},), got {tuple(positives.shape)}")
        if bool(((positives < 0) | (positives >= nc)).any()):
            raise ValueError(f"positives must be candidate indices in [0, {nc})")
        pos = F.one_hot(positives.long(), nc).bool().to(similarity.device)
    if not bool(pos.any(dim=1).all()):
        raise ValueError("every query needs at least one positive candidate")
    if not ks or any(not isinstance(k, int) or k <= 0 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks}")
    sim = similarity.float()
    best_positive = sim.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)   # (Nq, 1)
    rank = ((sim >= best_positive) & ~pos).sum(dim=1)                               # wrong ones ahead
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


def image_text_recall(similarity: Tensor, caption_image: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways for image-text retrieval with several captions per image (chapter 5).

    ``similarity (N_images, N_captions)``; ``caption_image (N_captions,)`` long,
    the row (image) each caption describes. Returns ``i2t_R@K`` (an image
    finds any of its captions) and ``t2i_R@K`` (a caption finds its image).
    """
    if not isinstance(similarity, Tensor) or similarity.dim() != 2:
        raise ValueError(f"similarity must be (N_images, N_captions), got "
                         f"{tuple(similarity.shape) if isinstance(similarity, Tensor) else type(similarity).__name__}")
    ni, nc = similarity.shape
    if not isinstance(caption_image, Tensor) or tuple(caption_image.shape) != (nc,):
        raise ValueError(f"caption_image must have shape ({nc},), one image index per caption")
    if bool(((caption_image < 0) | (caption_image >= ni)).any()):
        raise ValueError(f"caption_image must hold image indices in [0, {ni})")
    owner = caption_image.long().to(similarity.device)
    i2t = recall_at_k(similarity, torch.arange(ni, device=similarity.device)[:, None] == owner[None, :], ks)
    t2i = recall_at_k(similarity.t(), owner, ks)
    return {**{f"i2t_{k}": v for k, v in i2t.items()}, **{f"t2i_{k}": v for k, v in t2i.items()}}


def retrieval_chance(num_images: int, captions_per_image: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """The recall@K of a random ranking, for the keys of :func:`image_text_recall` (chapter 6b).

    Text to image: each caption has one right image among ``num_images``, so
    ``K / num_images``. Image to text: an image has ``captions_per_image``
    right captions among ``num_images * captions_per_image``, and a hit needs
    any of them in the top K: ``1 - C(N_c - c, K) / C(N_c, K)``.
    """
    for name, value in (("num_images", num_images), ("captions_per_image", captions_per_image)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k <= 0 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks}")
    n_c, c = num_images * captions_per_image, captions_per_image
    # With K above the wrong captions C(n_c - c, K) is 0 and the formula gives 1; with K above all
    # the captions C(n_c, K) is 0 too, and every caption is in the top K anyway.
    chance = {f"i2t_R@{k}": 1 - math.comb(n_c - c, k) / math.comb(n_c, k) if k <= n_c else 1.0 for k in ks}
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
