"""Chapter 6's exercise checks pass right answers and explain typical wrong ones."""

from __future__ import annotations

import pytest
import torch

from fusionlib.exercises import ExerciseFailure
from fusionlib.exercises import ch06


def not_written(*args, **kwargs):
    raise NotImplementedError


# -- exercise 1: the joint attention mask ---------------------------------------------


def mask_right(attention_mask, region_mask):
    keys = torch.cat([attention_mask, region_mask], dim=1)
    n = keys.shape[1]
    return keys[:, None, :].expand(-1, n, n)


def mask_keys_only(attention_mask, region_mask):
    return torch.cat([attention_mask, region_mask], dim=1)


def mask_inverted(attention_mask, region_mask):
    return ~mask_right(attention_mask, region_mask)


def mask_regions_first(attention_mask, region_mask):
    return mask_right(region_mask, attention_mask)


def mask_outer(attention_mask, region_mask):
    keys = torch.cat([attention_mask, region_mask], dim=1)
    return keys[:, :, None] & keys[:, None, :]


def mask_two_streams(attention_mask, region_mask):
    B, T = attention_mask.shape
    R = region_mask.shape[1]
    out = torch.zeros(B, T + R, T + R, dtype=torch.bool)
    out[:, :T, :T] = attention_mask[:, None, :].expand(B, T, T)
    out[:, T:, T:] = region_mask[:, None, :].expand(B, R, R)
    return out


def mask_float(attention_mask, region_mask):
    return mask_right(attention_mask, region_mask).float()


def test_joint_attention_mask_check(capsys):
    ch06.check_joint_attention_mask(mask_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (mask_keys_only, "key padding mask"),
        (mask_inverted, "True and False are swapped"),
        (mask_regions_first, "regions first"),
        (mask_outer, "NaN"),
        (mask_two_streams, "two separate streams"),
        (mask_float, "should be bool"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch06.check_joint_attention_mask(wrong)


# -- exercise 2: loc7 ----------------------------------------------------------------


def loc7_right(boxes, image_size):
    H, W = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1 / W, y1 / H, x2 / W, y2 / H, w / W, h / H, w * h / (W * H)], dim=-1)


def loc7_pixel_area(boxes, image_size):
    out = loc7_right(boxes, image_size)
    out[:, 6] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return out


def loc7_pixel_wh(boxes, image_size):
    out = loc7_right(boxes, image_size)
    out[:, 4] = boxes[:, 2] - boxes[:, 0]
    out[:, 5] = boxes[:, 3] - boxes[:, 1]
    return out


def loc7_swapped(boxes, image_size):
    H, W = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1 / H, y1 / W, x2 / H, y2 / W, w / H, h / W, w * h / (W * H)], dim=-1)


def loc7_wh_first(boxes, image_size):
    out = loc7_right(boxes, image_size)
    return out[:, [0, 1, 4, 5, 2, 3, 6]]


def test_loc7_check(capsys):
    ch06.check_loc7(loc7_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (loc7_pixel_area, "divide it by W\\*H"),
        (loc7_pixel_wh, "divide w by W and h by H"),
        (loc7_swapped, "x coordinates \\(and w\\) go with the width"),
        (loc7_wh_first, "corners first"),
        (lambda b, s: loc7_right(b, s)[:, :5], "shape"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch06.check_loc7(wrong)


# -- exercise 3: task probabilities -------------------------------------------------


def probabilities_right(mix):
    total = sum(mix.values())
    return {t: w / total for t, w in mix.items()}


def test_task_probabilities_check(capsys):
    ch06.check_task_probabilities(probabilities_right)
    assert "Correct" in capsys.readouterr().out
    tensor_answer = lambda mix: {t: torch.tensor(p) for t, p in probabilities_right(mix).items()}  # noqa: E731
    ch06.check_task_probabilities(tensor_answer)
    softmax = lambda mix: dict(
        zip(mix, torch.softmax(torch.tensor([float(w) for w in mix.values()]), 0).tolist())
    )  # noqa: E731
    for wrong, message in [
        (lambda mix: dict(mix), "returned the weights themselves"),
        (lambda mix: {t: 1 / len(mix) for t in mix}, "same probability"),
        (softmax, "softmax"),
        (lambda mix: {t: 0.5 for t in mix}, "sum to"),
        (lambda mix: [1.0], "return a dict"),
        (lambda mix: {"itm": 1.0}, "one entry per task"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch06.check_task_probabilities(wrong)


# -- exercise 4: WRA loss ------------------------------------------------------------


def wra_right(distance, labels):
    scored = labels != -100
    signed = torch.where(labels == 1, distance, -distance)
    return signed[scored].sum() / scored.sum()


def wra_reversed(distance, labels):
    return -wra_right(distance, labels)


def wra_no_ignore(distance, labels):
    return torch.where(labels == 1, distance, -distance).mean()


def wra_sum(distance, labels):
    scored = labels != -100
    return torch.where(labels == 1, distance, -distance)[scored].sum()


def wra_positives_only_count(distance, labels):
    scored = labels != -100
    return torch.where(labels == 1, distance, -distance)[scored].sum() / (labels == 1).sum()


def wra_no_labels(distance, labels):
    return distance[labels != -100].mean()


def wra_float(distance, labels):
    return torch.tensor(wra_right(distance.detach(), labels).item())


def test_wra_loss_check(capsys):
    ch06.check_wra_loss(wra_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (wra_reversed, "signs are reversed"),
        (wra_no_ignore, "-100 too"),
        (wra_sum, "you summed"),
        (wra_positives_only_count, "matched pairs only"),
        (wra_no_labels, "without looking at the labels"),
        (wra_float, "no gradient"),
        (lambda d, l: torch.stack([d.mean(), d.mean()]), "scalar"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch06.check_wra_loss(wrong)
