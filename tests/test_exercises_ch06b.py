"""Chapter 6b's exercise checks pass right answers and explain typical wrong ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionlib.exercises import ExerciseFailure
from fusionlib.exercises import ch06b


def not_written(*args, **kwargs):
    raise NotImplementedError


# -- exercise 1: mask every occurrence ---------------------------------------------------


def mask_right(input_ids, attention_mask, word_ids, mask_id):
    probed = torch.isin(input_ids, word_ids) & attention_mask
    return input_ids.masked_fill(probed, mask_id), input_ids.masked_fill(~probed, -100)


def mask_in_place(input_ids, attention_mask, word_ids, mask_id):
    labels = mask_right(input_ids, attention_mask, word_ids, mask_id)[1]
    return input_ids.masked_fill_(torch.isin(input_ids, word_ids) & attention_mask, mask_id), labels


def mask_padding_too(input_ids, attention_mask, word_ids, mask_id):
    probed = torch.isin(input_ids, word_ids)
    return input_ids.masked_fill(probed, mask_id), input_ids.masked_fill(~probed, -100)


def mask_first_only(input_ids, attention_mask, word_ids, mask_id):
    probed = torch.isin(input_ids, word_ids) & attention_mask
    first = probed & (probed.cumsum(1) == 1)
    return input_ids.masked_fill(first, mask_id), input_ids.masked_fill(~first, -100)


def labels_inverted(input_ids, attention_mask, word_ids, mask_id):
    probed = torch.isin(input_ids, word_ids) & attention_mask
    return input_ids.masked_fill(probed, mask_id), input_ids.masked_fill(probed, -100)


def labels_everywhere(input_ids, attention_mask, word_ids, mask_id):
    return mask_right(input_ids, attention_mask, word_ids, mask_id)[0], input_ids.clone()


def labels_are_the_mask(input_ids, attention_mask, word_ids, mask_id):
    masked = mask_right(input_ids, attention_mask, word_ids, mask_id)[0]
    probed = torch.isin(input_ids, word_ids) & attention_mask
    return masked, masked.masked_fill(~probed, -100)


def test_mask_every_occurrence_check(capsys):
    ch06b.check_mask_every_occurrence(mask_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (mask_in_place, "in place"),
        (mask_padding_too, "padded position"),
        (mask_first_only, "only the first occurrence"),
        (labels_inverted, "the other way round"),
        (labels_everywhere, "must be -100 wherever nothing was masked"),
        (labels_are_the_mask, "the mask id"),
        (lambda i, a, w, m: mask_right(i, a, w, m)[0], "two tensors"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch06b.check_mask_every_occurrence(wrong)


# -- exercise 2: the probe's accuracy ----------------------------------------------------


def accuracy_right(logits, labels):
    scored = labels != -100
    return float((logits.argmax(-1) == labels)[scored].float().mean())


def test_probe_accuracy_check(capsys):
    ch06b.check_probe_accuracy(accuracy_right)
    ch06b.check_probe_accuracy(
        lambda lo, la: torch.tensor(accuracy_right(lo, la))
    )  # a 0-d tensor will do
    ch06b.check_probe_accuracy(
        lambda lo, la: np.float32(accuracy_right(lo, la))
    )  # and a numpy float
    assert capsys.readouterr().out.count("Correct") == 3
    for wrong, message in [
        (lambda lo, la: float((lo.argmax(-1) == la).float().mean()), "every position"),
        (
            lambda lo, la: float(((lo.argmax(-1) == la) | (la == -100)).float().mean()),
            "counted the -100 positions as right",
        ),
        (lambda lo, la: (lo.argmax(-1) == la).float(), "one number"),
        (lambda lo, la: "0.4", "return a float"),
        (lambda lo, la: 1 - accuracy_right(lo, la), "predicted \\*wrong\\*"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch06b.check_probe_accuracy(wrong)


# -- exercise 3: steps to ground ---------------------------------------------------------


def steps_right(steps, accuracies, threshold):
    return next((s for s, a in zip(steps, accuracies) if a >= threshold), None)


def test_steps_to_ground_check(capsys):
    ch06b.check_steps_to_ground(steps_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (lambda s, a, t: next((i for i, x in enumerate(a) if x >= t), None), "index"),
        (lambda s, a, t: next((x for x in a if x >= t), None), "returned the accuracy"),
        (lambda s, a, t: ([st for st, x in zip(s, a) if x >= t] or [None])[-1], "last step"),
        (lambda s, a, t: next((st for st, x in zip(s, a) if x > t), None), "use >="),
        (lambda s, a, t: steps_right(s, a, t) or s[-1], "return None"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch06b.check_steps_to_ground(wrong)
