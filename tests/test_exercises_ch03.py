"""Chapter 3's exercise checks pass right answers and explain typical wrong ones."""

from __future__ import annotations

import math

import pytest
import torch

from fusionlib.exercises import ExerciseFailure
from fusionlib.exercises import ch03


def not_written(*args, **kwargs):
    raise NotImplementedError


# -- exercise 1: masked mean over regions -----------------------------------------------


def mean_right(regions, mask):
    m = mask.unsqueeze(-1).to(regions.dtype)
    return (regions * m).sum(1) / m.sum(1).clamp(min=1)


def mean_everything(regions, mask):
    return regions.mean(1)


def mean_by_slots(regions, mask):
    m = mask.unsqueeze(-1).to(regions.dtype)
    return (regions * m).sum(1) / regions.shape[1]


def mean_nan_when_empty(regions, mask):
    m = mask.unsqueeze(-1).to(regions.dtype)
    return (regions * m).sum(1) / m.sum(1)


def test_masked_mean_check(capsys):
    ch03.check_masked_mean(mean_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (mean_everything, "padded ones included"),
        (mean_by_slots, "divided by R"),
        (mean_nan_when_empty, "no real region gave NaN"),
        (lambda r, m: mean_right(r, m)[:, :2], "shape"),
        (lambda r, m: mean_right(r, m) + 1, "expected"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch03.check_masked_mean(wrong)


# -- exercise 2: the pairs of a relation network and their cost ---------------------------


def test_rn_pairs_check(capsys):
    ch03.check_rn_pairs(lambda mask: mask.sum(1) ** 2)
    assert "Correct" in capsys.readouterr().out
    n = lambda mask: mask.sum(1)  # noqa: E731
    for wrong, message in [
        (lambda m: n(m) * (n(m) - 1), "with itself"),
        (lambda m: n(m) * (n(m) - 1) // 2, "unordered"),
        (lambda m: torch.full((m.shape[0],), m.shape[1] ** 2), "padded regions"),
        (lambda m: n(m), "expected"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch03.check_rn_pairs(wrong)


def macs_right(R, H, G, L):
    return R * R * (3 * H * G + (L - 1) * G * G)


def test_rn_macs_check(capsys):
    ch03.check_rn_macs(macs_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (lambda R, H, G, L: R * R * (2 * H * G + (L - 1) * G * G), "3\\*hidden"),
        (lambda R, H, G, L: R * (R - 1) * (3 * H * G + (L - 1) * G * G), "pairs \\(i, i\\)"),
        (lambda R, H, G, L: R * R * 3 * H * G * L, "only the first layer"),
        (lambda R, H, G, L: 3 * H * G + (L - 1) * G * G, "one pair"),
        (lambda R, H, G, L: "many", "return a number"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch03.check_rn_macs(wrong)


# -- exercise 3: one cross-attention step -------------------------------------------------


def step_right(
    tokens, regions, region_mask, w_q, w_k, w_v, scale=True, mask=True, dim=-1, values="v"
):
    q, k = tokens @ w_q, regions @ w_k
    v = regions @ (w_v if values == "v" else w_k)
    scores = q @ k.T / (math.sqrt(q.shape[-1]) if scale else 1.0)
    if mask == "inverted":
        scores = scores.masked_fill(region_mask, float("-inf"))
    elif mask:
        scores = scores.masked_fill(~region_mask, float("-inf"))
    weights = torch.softmax(scores, dim=dim)
    return weights @ v, weights


def test_cross_attention_step_check(capsys):
    ch03.check_cross_attention_step(step_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (lambda *a: step_right(*a, scale=False), "sqrt\\(d\\)"),
        (lambda *a: step_right(*a, mask=False), "padded regions get attention weight"),
        (lambda *a: step_right(*a, mask="inverted"), "True at REAL regions"),
        (lambda *a: step_right(*a, dim=0), "over the regions"),
        (lambda *a: step_right(*a, values="k"), "projected with w_v"),
        (lambda *a: step_right(*a)[0], "return a pair"),
        (lambda *a: (step_right(*a)[0], step_right(*a)[1][:, :3]), "shape"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch03.check_cross_attention_step(wrong)


# -- exercise 4: batched IoU --------------------------------------------------------------


def iou_right(boxes):
    from fusionlib.geometry import pairwise_iou

    return pairwise_iou(boxes)


def _iou_parts(boxes, plus_one=False, clamp=True, by_min=False):
    tl = torch.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])
    br = torch.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    wh = br - tl + (1 if plus_one else 0)
    inter = (wh.clamp(min=0) if clamp else wh).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2] + (1 if plus_one else 0)).prod(-1)
    if by_min:
        return inter / torch.minimum(area[..., :, None], area[..., None, :])
    return inter / (area[..., :, None] + area[..., None, :] - inter)


def iou_nan_for_padding(boxes):
    return _iou_parts(boxes)


def iou_no_clamp(boxes):
    return torch.nan_to_num(_iou_parts(boxes, clamp=False))


def iou_by_smaller_area(boxes):
    return torch.nan_to_num(_iou_parts(boxes, by_min=True))


@pytest.mark.parametrize(
    "fn, message",
    [
        (not_written, "not implemented yet"),
        (iou_nan_for_padding, "NaN"),
        (iou_no_clamp, "negative"),
        (iou_by_smaller_area, "union"),
    ],
)
def test_pairwise_iou_check_explains_mistakes(fn, message):
    with pytest.raises(ExerciseFailure, match=message):
        ch03.check_pairwise_iou(fn)


def test_pairwise_iou_check_passes_the_library(capsys):
    ch03.check_pairwise_iou(iou_right)
    assert "torchvision" in capsys.readouterr().out
