"""Checks for chapter 6b's exercises (the grounding probe and steps to ground)."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch

from fusionlib.exercises import call_student, expect_tensor, fail, passed

IGNORE = -100
MASK_ID = 4


# --------------------------------------------------------------------------- exercise 1: mask every occurrence


def _probe_cases() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, word_ids): repeated probe words, padding, a caption without any."""
    ids = torch.tensor(
        [
            [2, 10, 20, 11, 30, 10, 3, 0],  # word 10 twice
            [2, 12, 20, 13, 3, 0, 0, 0],  # no probe word at all
            [2, 11, 10, 11, 10, 20, 3, 10],
        ]
    )  # a probe word at a padded position (last)
    real = torch.tensor(
        [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]],
        dtype=torch.bool,
    )
    return [(ids, real, torch.tensor([10, 11])), (ids[:2], real[:2], torch.tensor([20]))]


def check_mask_every_occurrence(fn: Callable) -> None:
    """Exercise 1: ``fn(input_ids (B, T), attention_mask (B, T) bool, word_ids (K,), mask_id) -> (masked_ids, labels)``.

    ``masked_ids``: ``input_ids`` with every real occurrence of a word of
    ``word_ids`` replaced by ``mask_id``; ``labels``: the original id there and
    -100 everywhere else; the caller's ``input_ids`` unchanged.
    """
    for ids, real, words in _probe_cases():
        original = ids.clone()
        got = call_student(fn, ids, real.clone(), words.clone(), MASK_ID)
        if not isinstance(got, tuple) or len(got) != 2:
            fail(f"return two tensors (masked_ids, labels), got {type(got).__name__}")
        masked, labels = (
            expect_tensor(name, t, tuple(ids.shape))
            for name, t in zip(("masked_ids", "labels"), got)
        )
        if not torch.equal(ids, original):
            fail(
                "you changed the caller's input_ids in place: the probe batch is reused at every evaluation, "
                "so work on a copy (masked_fill, not masked_fill_, or .clone() first)"
            )
        probed = torch.isin(ids, words) & real
        want_masked = ids.masked_fill(probed, MASK_ID)
        want_labels = ids.masked_fill(~probed, IGNORE)
        if torch.equal(masked, want_masked) and torch.equal(labels, want_labels):
            continue
        anywhere = torch.isin(ids, words)
        if torch.equal(masked, ids.masked_fill(anywhere, MASK_ID)) and not torch.equal(
            anywhere, probed
        ):
            fail(
                "you masked a probe word at a padded position (attention_mask False): padding is not part of the "
                "caption; mask only where attention_mask is True"
            )
        first = torch.zeros_like(probed)
        for b in range(ids.shape[0]):
            hits = probed[b].nonzero()
            if len(hits):
                first[b, hits[0, 0]] = True
        if torch.equal(masked, ids.masked_fill(first, MASK_ID)) and not torch.equal(first, probed):
            fail(
                "you masked only the first occurrence in each caption: a second, unmasked 'square' would give the "
                "answer away without the image. Mask every occurrence"
            )
        if torch.equal(masked, want_masked) and torch.equal(
            labels, ids.masked_fill(probed, IGNORE)
        ):
            fail(
                "labels are -100 at the probed positions and the original ids elsewhere: the other way round. "
                "The loss and the accuracy are taken where the words were masked"
            )
        if torch.equal(masked, want_masked) and torch.equal(labels, ids):
            fail(
                "labels must be -100 wherever nothing was masked, or the unmasked words (trivially right) are "
                "scored too"
            )
        if torch.equal(masked, want_masked) and torch.equal(
            labels, want_masked.masked_fill(~probed, IGNORE)
        ):
            fail(
                "the labels at the masked positions are the mask id; they must be the original words"
            )
        if not torch.equal(masked, want_masked):
            bad = (masked != want_masked).nonzero()[0].tolist()
            fail(
                f"masked_ids[{bad[0]}, {bad[1]}] should be {int(want_masked[tuple(bad)])}, "
                f"got {int(masked[tuple(bad)])}"
            )
        bad = (labels != want_labels).nonzero()[0].tolist()
        fail(
            f"labels[{bad[0]}, {bad[1]}] should be {int(want_labels[tuple(bad)])}, got {int(labels[tuple(bad)])}"
        )
    passed("every real occurrence is masked, labels are -100 elsewhere, and the input is untouched")


# --------------------------------------------------------------------------- exercise 2: the probe's accuracy


def check_probe_accuracy(fn: Callable) -> None:
    """Exercise 2: ``fn(logits (B, T, V), labels (B, T)) -> float``: accuracy at the positions with a label."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 12, generator=g)
    predicted = logits.argmax(-1)
    labels = torch.full((3, 8), IGNORE)
    labels[0, [1, 5]] = predicted[0, [1, 5]]  # right
    labels[2, [1, 2, 3]] = (predicted[2, [1, 2, 3]] + 1) % 12  # wrong: 2 of 5 right
    got = call_student(fn, logits.clone(), labels.clone())
    if isinstance(got, torch.Tensor) and got.numel() != 1:
        fail(
            f"return one number, the share of scored positions that are right, got shape {tuple(got.shape)}"
        )
    if isinstance(got, (bool, str)) or not isinstance(got, (numbers.Real, torch.Tensor)):
        fail(f"return a float, got {type(got).__name__}")
    got = float(got)
    if math.isclose(got, 0.4, abs_tol=1e-6):
        passed(
            "accuracy over the labelled positions only, as uniter.masked_word_accuracy scores it"
        )
        return
    scored = labels != IGNORE
    if math.isclose(got, float(((predicted == labels) | ~scored).float().mean()), abs_tol=1e-6):
        fail("you counted the -100 positions as right: average over the labelled positions only")
    if math.isclose(got, float((predicted == labels).float().mean()), abs_tol=1e-6):
        fail(
            "you averaged over every position, so the -100 ones count as wrong: average over the labelled "
            "positions only"
        )
    if math.isclose(got, float((logits.argmin(-1) == labels)[scored].float().mean()), abs_tol=1e-6):
        fail("the prediction is the *largest* logit: argmax, not argmin")
    if math.isclose(got, 0.6, abs_tol=1e-6):
        fail(
            "you returned the share of labelled positions predicted *wrong*: count argmax == label"
        )
    fail(
        f"2 of the 5 labelled positions are predicted right, so the accuracy is 0.4; got {got:.4f}"
    )


# --------------------------------------------------------------------------- exercise 3: steps to ground


def check_steps_to_ground(fn: Callable) -> None:
    """Exercise 3: ``fn(steps, accuracies, threshold) -> int | None``: the first probed step at or above threshold."""
    cases: list[tuple[Sequence[int], Sequence[float], float, int | None]] = [
        (
            [150, 300, 450, 600, 750],
            [0.52, 0.63, 0.95, 0.99, 1.0],
            0.95,
            450,
        ),  # reached exactly: counts
        ([150, 300, 450, 600], [0.52, 0.97, 0.80, 0.99], 0.95, 300),  # first, not last
        ([100, 200, 300], [0.40, 0.60, 0.70], 0.95, None),  # never
    ]
    for steps, accuracies, threshold, want in cases:
        got = call_student(fn, list(steps), list(accuracies), threshold)
        if got == want and (want is None or not isinstance(got, bool)):
            continue
        if want is None:
            if got == steps[-1]:
                fail(
                    "the run never reached the threshold, so it did not ground: return None, not the last step "
                    "(the table writes such a run as '> cap')"
                )
            fail(
                f"the accuracies {list(accuracies)} never reach {threshold}: return None, got {got!r}"
            )
        index = list(steps).index(want)
        if got == index:
            fail("you returned the index into the list; return the step at that index")
        if got == accuracies[index]:
            fail(
                "you returned the accuracy; return the step at which it first reached the threshold"
            )
        reached = [s for s, a in zip(steps, accuracies) if a >= threshold]
        if got == reached[-1]:
            fail("you returned the last step at or above the threshold; grounding is the *first*")
        strictly = [s for s, a in zip(steps, accuracies) if a > threshold]
        if strictly and got == strictly[0]:
            fail(
                f"at step {want} the accuracy equals the threshold {threshold}, which counts: use >="
            )
        fail(
            f"for steps {list(steps)} and accuracies {list(accuracies)} the first step with accuracy >= "
            f"{threshold} is {want}; got {got!r}"
        )
    passed("the first probed step at or above the threshold, None when the run never got there")


__all__ = ["check_mask_every_occurrence", "check_probe_accuracy", "check_steps_to_ground"]
