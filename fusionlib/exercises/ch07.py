"""Checks for chapter 7's exercises (efficiency).

Each check runs the student's function on cases whose answer
:mod:`fusionlib.bench.models` / :mod:`fusionlib.losses` know, and names the
usual mistake: a multiply-add counted as one FLOP, the weighted sum
:math:`AV` forgotten, the cross-modal terms of :math:`(T+V)^2` dropped; a
speed-up taken from unpaired medians or means, or upside down; the positives
of a rank's rows put at the first columns instead of at the rank's own.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from fusionlib.bench.models import attention_flops
from fusionlib.exercises import call_student, expect_tensor, fail, passed
from fusionlib.losses import contrastive_loss

__all__ = ["check_attention_flops", "check_speedup", "check_local_contrastive_loss"]


# ---------------------------------------------------------------------------- exercise 1


def check_attention_flops(fn: Callable) -> None:
    """Exercise 1: ``fn(T, V, d) -> {"single": int, "co": int, "cross": int}``: forward FLOPs of the
    attention scores and the weighted sum of one sample (projections left out), for one single-stream
    layer over ``T + V`` positions, a two-stream pair (both self-attentions and both cross-attentions),
    and the two cross-attentions alone."""
    for T, V, d in [(16, 8, 256), (20, 36, 64), (1, 100, 32)]:
        got = call_student(fn, T, V, d)
        if not isinstance(got, dict) or set(got) != {"single", "co", "cross"}:
            fail(f"return a dict with the keys 'single', 'co' and 'cross', got {got!r}")
        for kind in ("single", "co", "cross"):
            value, want = got[kind], attention_flops(T, V, d, kind)
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                fail(f"{kind}: return a number of FLOPs, got {type(value).__name__}")
            if math.isclose(value, want, rel_tol=1e-9):
                continue
            pairs = {"single": (T + V) ** 2, "co": T * T + V * V + 2 * T * V, "cross": 2 * T * V}[
                kind
            ]
            hints = {
                2
                * d
                * pairs: "a multiply-add is 2 FLOPs, and there are two products per pair of positions: "
                "the scores QKᵀ and the weighted sum AV",
                d
                * pairs: "each pair of positions costs a d-long dot product for QKᵀ *and* a d-long "
                "weighted sum for AV, each 2d FLOPs (multiply and add): 4d per pair",
                8
                * d
                * pairs: "you counted the backward pass too (or both products twice): the forward is "
                "4d FLOPs per pair of positions",
            }
            if kind == "single" and math.isclose(value, 4 * d * (T * T + V * V), rel_tol=1e-9):
                fail(
                    "single stream: the joint sequence has T + V positions and every one attends to every "
                    "other, so the pairs are (T + V)² = T² + V² + 2TV; you left out the 2TV cross-modal pairs"
                )
            if kind == "co" and math.isclose(value, 4 * d * 2 * T * V, rel_tol=1e-9):
                fail(
                    "co: a two-stream pair also runs each stream's self-attention (T² and V² pairs), "
                    "not only the two cross-attentions"
                )
            if kind == "cross" and math.isclose(value, 4 * d * T * V, rel_tol=1e-9):
                fail(
                    "cross: there are two cross-attentions, words over regions *and* regions over words: 2TV pairs"
                )
            for wrong, message in hints.items():
                if math.isclose(value, wrong, rel_tol=1e-9):
                    fail(f"{kind}: {message}")
            fail(f"{kind} for T={T}, V={V}, d={d}: expected {want:,} FLOPs, got {value:,}")
    passed(
        "your FLOP counts match fusionlib.bench.models.attention_flops (and torch's FLOP counter)"
    )


# ---------------------------------------------------------------------------- exercise 2


def _rounds() -> tuple[list[float], list[float]]:
    # Round 3 stalled (another process took the CPU) while the slow model ran; round 5 while the fast one did.
    slow = [2.0, 2.2, 9.0, 2.1, 2.3, 2.0, 2.4]
    fast = [1.0, 1.0, 1.1, 1.05, 4.0, 0.95, 1.2]
    return slow, fast


def check_speedup(fn: Callable) -> None:
    """Exercise 2: ``fn(slow_times, fast_times) -> (median, q25, q75)`` of the per-round ratios
    ``slow[i] / fast[i]`` (quartiles as ``statistics.quantiles(..., n=4, method="inclusive")``)."""
    slow, fast = _rounds()
    got = call_student(fn, list(slow), list(fast))
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        fail(f"return three numbers (median, q25, q75), got {got!r}")
    try:
        got = tuple(float(v) for v in got)
    except (TypeError, ValueError):
        fail(f"return three numbers (median, q25, q75), got {got!r}")
    ratios = [s / f for s, f in zip(slow, fast)]
    q25, _, q75 = statistics.quantiles(ratios, n=4, method="inclusive")
    want = (statistics.median(ratios), q25, q75)
    if all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got, want)):
        passed(
            f"per-round speed-up {want[0]:.2f}x [{want[1]:.2f}-{want[2]:.2f}]: the stalled rounds do not move it"
        )
        return
    inverse = [f / s for s, f in zip(slow, fast)]
    if math.isclose(got[0], statistics.median(inverse), rel_tol=1e-9):
        fail(
            "your ratio is upside down: a speed-up is slow / fast (> 1 when the fast one is faster)"
        )
    if math.isclose(got[0], statistics.median(slow) / statistics.median(fast), rel_tol=1e-9):
        fail(
            "you divided the two medians: that forgets which times ran side by side. Divide round by round "
            "(slow[i] / fast[i]), then take the median of those ratios"
        )
    if math.isclose(got[0], statistics.mean(slow) / statistics.mean(fast), rel_tol=1e-9):
        fail(
            "you divided the means: one stalled round drags a mean. Take the ratio of each round, then the median"
        )
    if math.isclose(got[0], statistics.mean(ratios), rel_tol=1e-9):
        fail(
            "you averaged the per-round ratios: the mean is pulled by the stalled rounds; take the median"
        )
    if math.isclose(got[0], want[0], rel_tol=1e-9):
        fail(
            f"the median is right but the quartiles are not: expected q25={want[1]:.4f}, q75={want[2]:.4f}, got "
            f"{got[1]:.4f}, {got[2]:.4f} (statistics.quantiles(ratios, n=4, method='inclusive'))"
        )
    fail(f"expected (median, q25, q75) = ({want[0]:.4f}, {want[1]:.4f}, {want[2]:.4f}), got {got}")


# ---------------------------------------------------------------------------- exercise 3


def check_local_contrastive_loss(fn: Callable) -> None:
    """Exercise 3: ``fn(image_local (b, D), text_local (b, D), all_images (W b, D), all_texts (W b, D), rank,
    scale) -> scalar``: rank ``rank``'s share of the global symmetric InfoNCE (its ``b`` image rows against
    every caption, its ``b`` caption rows against every image, averaged). The embeddings are not normalised."""
    g = torch.Generator().manual_seed(77)
    for world, b, dim, scale in [(3, 4, 8, 10.0), (2, 5, 6, 3.0)]:
        images = (
            torch.randn(world * b, dim, generator=g, dtype=torch.float64)
            * torch.linspace(0.5, 2.5, world * b)[:, None]
        )
        texts = images + 0.7 * torch.randn(world * b, dim, generator=g, dtype=torch.float64)
        shares = []
        for rank in range(world):
            rows = slice(rank * b, (rank + 1) * b)
            got = expect_tensor(
                "the loss",
                call_student(
                    fn,
                    images[rows].clone(),
                    texts[rows].clone(),
                    images.clone(),
                    texts.clone(),
                    rank,
                    scale,
                ),
            )
            if got.numel() != 1:
                fail(
                    f"return the mean over this rank's rows (a scalar), got shape {tuple(got.shape)}"
                )
            shares.append(got.reshape(()).double())
            u, v = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
            mine = torch.arange(b) + rank * b
            want = (
                F.cross_entropy(scale * u[rows] @ v.T, mine)
                + F.cross_entropy(scale * v[rows] @ u.T, mine)
            ) / 2
            if torch.allclose(shares[-1], want, atol=1e-8):
                continue
            first = torch.arange(b)
            candidates = {
                "the positive of local row i is global column rank * b + i, not i: add the rank's offset": (
                    F.cross_entropy(scale * u[rows] @ v.T, first)
                    + F.cross_entropy(scale * v[rows] @ u.T, first)
                )
                / 2,
                "you used only the image-to-text rows; average them with the text-to-image rows": F.cross_entropy(
                    scale * u[rows] @ v.T, mine
                ),
                "you used only the text-to-image rows; average them with the image-to-text rows": F.cross_entropy(
                    scale * v[rows] @ u.T, mine
                ),
                "you compared the rank's rows with its own b columns only: the negatives of the other ranks are "
                "what the gather is for (use all_images / all_texts)": (
                    F.cross_entropy(scale * u[rows] @ v[rows].T, first)
                    + F.cross_entropy(scale * v[rows] @ u[rows].T, first)
                )
                / 2,
                "the embeddings are not L2-normalised: F.normalize before the dot products": (
                    F.cross_entropy(scale * images[rows] @ texts.T, mine)
                    + F.cross_entropy(scale * texts[rows] @ images.T, mine)
                )
                / 2,
                "multiply the cosine similarities by scale (you divided)": (
                    F.cross_entropy(u[rows] @ v.T / scale, mine)
                    + F.cross_entropy(v[rows] @ u.T / scale, mine)
                )
                / 2,
            }
            for message, value in candidates.items():
                if torch.allclose(shares[-1], value, atol=1e-8):
                    fail(message)
            fail(f"rank {rank} of {world}: expected {want.item():.6f}, got {shares[-1].item():.6f}")
        global_loss = contrastive_loss(images, texts, math.log(scale))
        if not torch.allclose(torch.stack(shares).mean(), global_loss, atol=1e-8):
            fail(
                "the ranks' losses do not average to the global loss"
            )  # unreachable when every share is right
    passed(
        "every rank's share is right, and their mean is the one-process InfoNCE over the global batch"
    )
