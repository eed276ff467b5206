"""Chapter 7's exercise checks pass right answers and explain typical wrong ones."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from fusionlib.exercises import ExerciseFailure
from fusionlib.exercises import ch07


def not_written(*args, **kwargs):
    raise NotImplementedError


# -- exercise 1: attention FLOPs -------------------------------------------------------


def flops_right(T, V, d):
    return {
        "single": 4 * d * (T + V) ** 2,
        "co": 4 * d * (T * T + V * V + 2 * T * V),
        "cross": 8 * d * T * V,
    }


def flops_one_product(T, V, d):
    return {k: v // 2 for k, v in flops_right(T, V, d).items()}


def flops_macs(T, V, d):
    return {k: v // 4 for k, v in flops_right(T, V, d).items()}


def flops_no_cross_terms(T, V, d):
    return {**flops_right(T, V, d), "single": 4 * d * (T * T + V * V)}


def flops_co_is_cross(T, V, d):
    return {**flops_right(T, V, d), "co": 8 * d * T * V}


def flops_one_cross(T, V, d):
    return {**flops_right(T, V, d), "cross": 4 * d * T * V}


def test_attention_flops_check(capsys):
    ch07.check_attention_flops(flops_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (flops_one_product, "a multiply-add is 2 FLOPs"),
        (flops_macs, "4d per pair"),
        (flops_no_cross_terms, "left out the 2TV cross-modal pairs"),
        (flops_co_is_cross, "each stream's self-attention"),
        (flops_one_cross, "two cross-attentions"),
        (lambda T, V, d: [1, 2, 3], "return a dict"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch07.check_attention_flops(wrong)


# -- exercise 2: the speed-up with its spread ----------------------------------------------


def speedup_right(slow, fast):
    ratios = [s / f for s, f in zip(slow, fast)]
    q25, _, q75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), q25, q75


def test_speedup_check(capsys):
    ch07.check_speedup(speedup_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (lambda s, f: speedup_right(f, s), "upside down"),
        (
            lambda s, f: (statistics.median(s) / statistics.median(f), 0, 0),
            "divided the two medians",
        ),
        (lambda s, f: (statistics.mean(s) / statistics.mean(f), 0, 0), "divided the means"),
        (
            lambda s, f: (statistics.mean([a / b for a, b in zip(s, f)]), 0, 0),
            "averaged the per-round ratios",
        ),
        (lambda s, f: (speedup_right(s, f)[0], min(s), max(s)), "quartiles are not"),
        (lambda s, f: 2.0, "three numbers"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch07.check_speedup(wrong)


# -- exercise 3: a rank's share of the contrastive loss -----------------------------------------


def local_right(image_local, text_local, all_images, all_texts, rank, scale):
    u, v = F.normalize(image_local, dim=-1), F.normalize(text_local, dim=-1)
    U, V = F.normalize(all_images, dim=-1), F.normalize(all_texts, dim=-1)
    target = rank * len(u) + torch.arange(len(u))
    return (F.cross_entropy(scale * u @ V.T, target) + F.cross_entropy(scale * v @ U.T, target)) / 2


def local_no_offset(image_local, text_local, all_images, all_texts, rank, scale):
    return local_right(image_local, text_local, all_images, all_texts, 0, scale)


def local_one_direction(image_local, text_local, all_images, all_texts, rank, scale):
    u, V = F.normalize(image_local, dim=-1), F.normalize(all_texts, dim=-1)
    return F.cross_entropy(scale * u @ V.T, rank * len(u) + torch.arange(len(u)))


def local_own_columns(image_local, text_local, all_images, all_texts, rank, scale):
    return local_right(image_local, text_local, image_local, text_local, 0, scale)


def local_not_normalised(image_local, text_local, all_images, all_texts, rank, scale):
    target = rank * len(image_local) + torch.arange(len(image_local))
    return (
        F.cross_entropy(scale * image_local @ all_texts.T, target)
        + F.cross_entropy(scale * text_local @ all_images.T, target)
    ) / 2


def test_local_contrastive_loss_check(capsys):
    ch07.check_local_contrastive_loss(local_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (local_no_offset, "add the rank's offset"),
        (local_one_direction, "only the image-to-text rows"),
        (local_own_columns, "negatives of the other ranks"),
        (local_not_normalised, "not L2-normalised"),
        (lambda *a: local_right(*a[:5], 1 / a[5]), "you divided"),
        (lambda *a: torch.zeros(2), "scalar"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch07.check_local_contrastive_loss(wrong)
