"""Chapter 4's exercise checks pass right answers and explain typical wrong ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusionlib.exercises import ExerciseFailure
from fusionlib.exercises import ch04

IGNORE = -100


def not_written(*args, **kwargs):
    raise NotImplementedError


# -- exercise 1: masked-position cross-entropy ---------------------------------------


def mlm_right(logits, labels):
    scored = labels != IGNORE
    total = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return total / scored.sum().clamp(min=1)


def mlm_nan_when_empty(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def mlm_all_positions(logits, labels):
    total = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return total / labels.numel()


def mlm_sum(logits, labels):
    return F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def mlm_wrong_dim(logits, labels):
    log_p = F.log_softmax(logits, dim=1).flatten(0, 1)
    return F.nll_loss(log_p, labels.flatten(), ignore_index=IGNORE)


def mlm_per_position(logits, labels):
    return F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none"
    )


def test_masked_cross_entropy_check(capsys):
    ch04.check_masked_cross_entropy(mlm_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (mlm_nan_when_empty, "NaN"),
        (mlm_all_positions, "divided by every position"),
        (mlm_sum, "returned the sum"),
        (mlm_wrong_dim, "over the vocabulary"),
        (mlm_per_position, "scalar"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch04.check_masked_cross_entropy(wrong)


# -- exercise 2: symmetric InfoNCE ----------------------------------------------------


def _logits(img, txt, tau, normalise=True):
    if normalise:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return img @ txt.T / tau


def nce_right(img, txt, tau):
    logits = _logits(img, txt, tau)
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def nce_one_way(img, txt, tau):
    return F.cross_entropy(_logits(img, txt, tau), torch.arange(len(img)))


def nce_other_way(img, txt, tau):
    return F.cross_entropy(_logits(img, txt, tau).T, torch.arange(len(img)))


def nce_added(img, txt, tau):
    return 2 * nce_right(img, txt, tau)


def nce_unnormalised(img, txt, tau):
    logits = _logits(img, txt, tau, normalise=False)
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def nce_times_tau(img, txt, tau):
    return nce_right(img, txt, 1 / tau)


def nce_no_tau(img, txt, tau):
    return nce_right(img, txt, 1.0)


def test_info_nce_check(capsys):
    ch04.check_info_nce(nce_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (nce_one_way, "only the image-to-text"),
        (nce_other_way, "only the text-to-image"),
        (nce_added, "added the two directions"),
        (nce_unnormalised, "not L2-normalised"),
        (nce_times_tau, "you multiplied"),
        (nce_no_tau, "forgot the temperature"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch04.check_info_nce(wrong)


# -- exercise 3: the 80/10/10 replacement ---------------------------------------------


def replace_right(input_ids, chosen, u, random_ids, mask_token_id):
    inputs = input_ids.clone()
    inputs[chosen & (u < 0.8)] = mask_token_id
    rnd = chosen & (u >= 0.8) & (u < 0.9)
    inputs[rnd] = random_ids[rnd]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    return inputs, labels


def replace_labels_everywhere(input_ids, chosen, u, random_ids, mask_token_id):
    return replace_right(input_ids, chosen, u, random_ids, mask_token_id)[0], input_ids.clone()


def replace_labels_from_inputs(input_ids, chosen, u, random_ids, mask_token_id):
    inputs, _ = replace_right(input_ids, chosen, u, random_ids, mask_token_id)
    return inputs, torch.where(chosen, inputs, torch.full_like(inputs, IGNORE))


def replace_in_place(input_ids, chosen, u, random_ids, mask_token_id):
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    input_ids[chosen & (u < 0.8)] = mask_token_id
    rnd = chosen & (u >= 0.8) & (u < 0.9)
    input_ids[rnd] = random_ids[rnd]
    return input_ids, labels


def replace_everything(input_ids, chosen, u, random_ids, mask_token_id):
    inputs = input_ids.clone()
    inputs[u < 0.8] = mask_token_id
    return inputs, torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))


def replace_swapped(input_ids, chosen, u, random_ids, mask_token_id):
    inputs = input_ids.clone()
    inputs[chosen & (u < 0.1)] = mask_token_id  # 10% [MASK], 80% random: swapped
    rnd = chosen & (u >= 0.1) & (u < 0.9)
    inputs[rnd] = random_ids[rnd]
    return inputs, torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))


def replace_no_random(input_ids, chosen, u, random_ids, mask_token_id):
    inputs = input_ids.clone()
    inputs[chosen & (u < 0.8)] = mask_token_id
    return inputs, torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))


def test_bert_replacement_check(capsys):
    ch04.check_bert_replacement(replace_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (replace_labels_everywhere, "-100 where no token was chosen"),
        (replace_labels_from_inputs, "ORIGINAL token"),
        (replace_in_place, "in place"),
        (replace_everything, "not chosen changed"),
        (replace_swapped, "u < 0.8 become \\[MASK\\]"),
        (replace_no_random, "becomes random_ids"),
        (lambda *a: replace_right(*a)[0], "pair"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch04.check_bert_replacement(wrong)


# -- exercise 4: transport cost ---------------------------------------------------------


def cost_right(cost, plan):
    return torch.diagonal(cost @ plan.transpose(1, 2), dim1=1, dim2=2).sum(-1)


def test_transport_cost_check(capsys):
    ch04.check_transport_cost(cost_right)
    ch04.check_transport_cost(lambda c, t: (c * t).sum(dim=(1, 2)))
    assert capsys.readouterr().out.count("Correct") == 2
    for wrong, message in [
        (lambda c, t: torch.diagonal(c @ t, dim1=1, dim2=2).sum(-1), "trace\\(C T\\)"),
        (lambda c, t: (c * t).mean(dim=(1, 2)), "mean of C \\* T"),
        (lambda c, t: (c * t).sum(), "summed over the batch"),
        (lambda c, t: c * t, "shape"),
        (lambda c, t: (c * t).sum(dim=(1, 2)) + 1, "expected"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch04.check_transport_cost(wrong)
