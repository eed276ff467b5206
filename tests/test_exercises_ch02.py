"""Chapter 2's exercise checks pass right answers and explain typical wrong ones."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from fusionlib.data.shapes import answer, generate_split
from fusionlib.exercises import ExerciseFailure
from fusionlib.exercises import ch02


def not_written(*args, **kwargs):
    raise NotImplementedError


# -- exercise 1: loc5 ------------------------------------------------------------


def loc5_right(boxes, image_size):
    H, W = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1 / W, y1 / H, x2 / W, y2 / H, (x2 - x1) * (y2 - y1) / (W * H)], dim=-1)


def loc5_pixel_area(boxes, image_size):
    out = loc5_right(boxes, image_size)
    out[:, 4] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return out


def loc5_swapped(boxes, image_size):
    return loc5_right(boxes, tuple(reversed(image_size)))


def loc5_xywh(boxes, image_size):
    H, W = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        [x1 / W, y1 / H, (x2 - x1) / W, (y2 - y1) / H, (x2 - x1) * (y2 - y1) / (W * H)], dim=-1
    )


def test_loc5_check(capsys):
    ch02.check_loc5(loc5_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (loc5_pixel_area, "divide it by the image area"),
        (loc5_swapped, "x coordinates go with the width"),
        (loc5_xywh, "corners x1, y1, x2, y2"),
        (lambda b, s: loc5_right(b, s)[:, :4], "shape"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch02.check_loc5(wrong)


# -- exercise 2: IoU ---------------------------------------------------------------


def _inter(a, b, plus=0.0, clamp=True):
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = rb - lt + plus
    if clamp:
        wh = wh.clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _area(x):
    return (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])


def iou_right(a, b):
    inter = _inter(a, b)
    return inter / (_area(a)[:, None] + _area(b)[None, :] - inter)


def iou_double_counted(a, b):
    return _inter(a, b) / (_area(a)[:, None] + _area(b)[None, :])


def iou_unclamped(a, b):
    inter = _inter(a, b, clamp=False)
    return inter / (_area(a)[:, None] + _area(b)[None, :] - inter)


def iou_over_a(a, b):
    return _inter(a, b) / _area(a)[:, None]


def iou_plus_one(a, b):
    return ch02._iou_plus_one(a, b)


def iou_elementwise(a, b):
    return torch.diagonal(iou_right(a, b))


def test_box_iou_check(capsys):
    ch02.check_box_iou(iou_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (iou_double_counted, "counts the intersection twice"),
        (iou_unclamped, "clamp the intersection"),
        (iou_over_a, "one box's area"),
        (iou_plus_one, r"\+1 pixel"),
        (iou_elementwise, "shape"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch02.check_box_iou(wrong)


# -- exercise 3: majority baseline --------------------------------------------------


def majority_right(train_scenes, test_scenes, family):
    counts = Counter(q.answer for s in train_scenes for q in s.questions if q.family == family)
    best = counts.most_common(1)[0][0]
    test = [q.answer for s in test_scenes for q in s.questions if q.family == family]
    return sum(a == best for a in test) / len(test)


def majority_from_test(train_scenes, test_scenes, family):
    return majority_right(test_scenes, test_scenes, family)


def majority_no_family_filter(train_scenes, test_scenes, family):
    best = Counter(q.answer for s in train_scenes for q in s.questions).most_common(1)[0][0]
    test = [q.answer for s in test_scenes for q in s.questions]
    return sum(a == best for a in test) / len(test)


def majority_percent(train_scenes, test_scenes, family):
    return 100 * majority_right(train_scenes, test_scenes, family)


def majority_answer_only(train_scenes, test_scenes, family):
    return Counter(
        q.answer for s in train_scenes for q in s.questions if q.family == family
    ).most_common(1)[0][0]


def test_majority_baseline_check(capsys):
    ch02.check_majority_baseline(majority_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (majority_from_test, "from the test questions"),
        (majority_no_family_filter, "given family"),
        (majority_percent, "not a percentage"),
        (majority_answer_only, "not the answer"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch02.check_majority_baseline(wrong)


# -- exercise 4: closest object -------------------------------------------------------


def _target(objects, color):
    return next(o for o in objects if o.color == color)


def closest_right(objects, color):
    t = _target(objects, color)
    others = [o for o in objects if o is not t]
    return min(
        others, key=lambda o: math.hypot(o.center[0] - t.center[0], o.center[1] - t.center[1])
    ).color


def closest_includes_itself(objects, color):
    t = _target(objects, color)
    return min(
        objects, key=lambda o: math.hypot(o.center[0] - t.center[0], o.center[1] - t.center[1])
    ).color


def closest_is_furthest(objects, color):
    t = _target(objects, color)
    return max(
        objects, key=lambda o: math.hypot(o.center[0] - t.center[0], o.center[1] - t.center[1])
    ).color


def closest_manhattan(objects, color):
    t = _target(objects, color)
    others = [o for o in objects if o is not t]
    return min(
        others, key=lambda o: abs(o.center[0] - t.center[0]) + abs(o.center[1] - t.center[1])
    ).color


def closest_returns_object(objects, color):
    name = closest_right(objects, color)
    return _target(objects, name)


def test_closest_object_check(capsys):
    ch02.check_closest_object(closest_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (closest_includes_itself, "itself is at distance 0"),
        (closest_is_furthest, "furthest"),
        (closest_manhattan, "Euclidean"),
        (closest_returns_object, "return the colour"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch02.check_closest_object(wrong)


def test_the_checks_reference_agrees_with_the_worlds_answers():
    """The check's notion of "closest" is the world's: its shape is the generated answer."""
    world = ch02._CHECK_WORLD
    for scene in generate_split(world, "train")[:30]:
        by_color = {o.color: o for o in scene.objects}
        for q in scene.questions:
            if q.family == "closest":
                assert by_color[ch02._closest(scene.objects, q.color)].shape == q.answer
                assert q.answer == answer(scene.objects, "closest", q.color, world.image_size)
