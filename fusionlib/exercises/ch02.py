"""Checks for chapter 2's exercises (the visual world and its region features)."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from torchvision.ops import box_iou

from fusionlib.data.shapes import Question, SceneObject, WorldConfig, generate_split
from fusionlib.exercises import call_student, expect_tensor, fail, passed, random_boxes
from fusionlib.vision import loc5

# Small worlds for the checks: generated in well under a second.
_CHECK_WORLD = WorldConfig(num_train=60, num_val=0, num_test=40, seed=7)


# --------------------------------------------------------------------------- exercise 1: loc5


def check_loc5(fn: Callable) -> None:
    """Exercise 1: ``fn(boxes (N, 4) xyxy pixels, image_size (H, W)) -> (N, 5)`` ViLBERT locations."""
    g = torch.Generator().manual_seed(0)
    # A non-square image, so that swapping W and H shows.
    for H, W in [(60, 80), (75, 75), (30, 120)]:
        boxes = random_boxes(6, (H, W), g)
        got = expect_tensor("your loc5", call_student(fn, boxes.clone(), (H, W)), (6, 5))
        want = loc5(boxes, (H, W))
        if torch.allclose(got, want, atol=1e-5):
            continue
        x1, y1, x2, y2 = boxes.unbind(-1)
        w, h = x2 - x1, y2 - y1
        if torch.allclose(got[:, :4], want[:, :4], atol=1e-5):
            if torch.allclose(got[:, 4], w * h, atol=1e-3):
                fail("the area is in pixels: divide it by the image area W*H so it lies in [0, 1]")
            fail(
                f"the first four numbers are right; the fifth should be (x2-x1)*(y2-y1)/(W*H), "
                f"got {got[0, 4].item():.4f} instead of {want[0, 4].item():.4f}"
            )
        swapped = torch.stack([x1 / H, y1 / W, x2 / H, y2 / W, w * h / (W * H)], dim=-1)
        if H != W and torch.allclose(got, swapped, atol=1e-5):
            fail(
                "you divided x by H and y by W: x coordinates go with the width W, y with the height H "
                "(image_size is (H, W))"
            )
        xywh = torch.stack([x1 / W, y1 / H, w / W, h / H, w * h / (W * H)], dim=-1)
        if torch.allclose(got, xywh, atol=1e-5):
            fail("you returned (x1, y1, w, h): ViLBERT's location uses the corners x1, y1, x2, y2")
        fail(
            f"for image (H, W) = {(H, W)} and box {boxes[0].tolist()} expected {want[0].tolist()}, "
            f"got {got[0].tolist()}"
        )
    passed("your loc5 matches fusionlib.vision.loc5 on square and non-square images")


# --------------------------------------------------------------------------- exercise 2: IoU


def check_box_iou(fn: Callable) -> None:
    """Exercise 2: ``fn(a (N, 4), b (M, 4)) -> (N, M)`` intersection over union, xyxy boxes."""
    g = torch.Generator().manual_seed(1)
    # Overlapping, nested, touching and disjoint pairs, plus random boxes.
    fixed_a = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],
            [2.0, 2.0, 4.0, 4.0],
        ]
    )
    fixed_b = torch.tensor(
        [
            [5.0, 5.0, 15.0, 15.0],
            [10.0, 0.0, 20.0, 10.0],
            [20.0, 20.0, 30.0, 30.0],
            [0.0, 0.0, 10.0, 10.0],
        ]
    )
    xy = torch.rand(5, 2, generator=g) * 40
    rand_a = torch.cat([xy, xy + 1 + torch.rand(5, 2, generator=g) * 20], 1)
    xy = torch.rand(3, 2, generator=g) * 40
    rand_b = torch.cat([xy, xy + 1 + torch.rand(3, 2, generator=g) * 20], 1)
    for a, b in [(fixed_a, fixed_b), (rand_a, rand_b), (rand_a[:1], rand_a)]:
        got = expect_tensor("your IoU", call_student(fn, a.clone(), b.clone()), (len(a), len(b)))
        want = box_iou(a, b)
        if torch.allclose(got, want, atol=1e-5):
            continue
        if (got < -1e-6).any() or (got > 1 + 1e-6).any():
            fail(
                "an IoU outside [0, 1]: clamp the intersection's width and height at 0 "
                "(disjoint boxes have no overlap, not a negative one)"
            )
        area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
        area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        lt = torch.max(a[:, None, :2], b[None, :, :2])
        rb = torch.min(a[:, None, 2:], b[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        if torch.allclose(got, inter / (area_a[:, None] + area_b[None, :]), atol=1e-5):
            fail("the union counts the intersection twice: union = area_a + area_b - intersection")
        unclamped = (rb - lt).prod(-1)
        if torch.allclose(
            got, unclamped / (area_a[:, None] + area_b[None, :] - unclamped), atol=1e-5
        ):
            fail(
                "disjoint boxes get an overlap: clamp the intersection's width and height at 0 separately"
            )
        if torch.allclose(got, inter / area_a[:, None], atol=1e-5) or torch.allclose(
            got, inter / area_b[None], atol=1e-5
        ):
            fail("you divided by one box's area: IoU divides the intersection by the union of both")
        plus_one = _iou_plus_one(a, b)
        if torch.allclose(got, plus_one, atol=1e-5):
            fail(
                "you used the old '+1 pixel' convention (w = x2 - x1 + 1); in this book x2, y2 are exclusive, "
                "so w = x2 - x1, as in torchvision"
            )
        fail(f"IoU differs from torchvision.ops.box_iou by up to {(got - want).abs().max():.3g}")
    passed("your IoU matches torchvision.ops.box_iou, including touching and disjoint boxes")


def _iou_plus_one(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


# --------------------------------------------------------------------------- exercise 3: majority baseline


def reference_majority_baseline(
    train_scenes: Sequence[Any], test_scenes: Sequence[Any], family: str
) -> float:
    """Accuracy on ``test_scenes`` of always answering ``family``'s most common training answer."""
    counts = Counter(q.answer for s in train_scenes for q in s.questions if q.family == family)
    if not counts:
        raise ValueError(f"no training question of family {family!r}")
    # Ties: the answer seen first, as Counter.most_common does.
    best = counts.most_common(1)[0][0]
    test = [q.answer for s in test_scenes for q in s.questions if q.family == family]
    if not test:
        raise ValueError(f"no test question of family {family!r}")
    return sum(a == best for a in test) / len(test)


def _fake_scenes(answers_by_family: dict[str, list[str]]) -> list[SimpleNamespace]:
    """Scene-like objects holding only ``questions`` (what a baseline may look at)."""
    questions = [
        Question(f"question {i}", a, fam, fam in ("closest", "furthest", "count"), "red")
        for fam, answers in answers_by_family.items()
        for i, a in enumerate(answers)
    ]
    return [SimpleNamespace(questions=questions[i : i + 4]) for i in range(0, len(questions), 4)]


def check_majority_baseline(fn: Callable) -> None:
    """Exercise 3: ``fn(train_scenes, test_scenes, family) -> float``, the majority-answer accuracy."""
    # Crafted: the training majority for "count" is "3", the test majority "4"; over all families
    # the training majority is "square". Each typical mistake gives its own number.
    train = _fake_scenes({"count": ["3"] * 5 + ["4"] * 3, "shape": ["square"] * 6 + ["circle"] * 2})
    test = _fake_scenes({"count": ["4"] * 6 + ["3"] * 2, "shape": ["circle"] * 5 + ["square"] * 3})
    got = call_student(fn, train, test, "count")
    if isinstance(got, str):
        fail(
            f"return the accuracy (a float in [0, 1]) of always answering the majority answer, not the answer {got!r}"
        )
    try:
        got = float(got)
    except (TypeError, ValueError):
        fail(f"return a float accuracy in [0, 1], got {type(got).__name__}")
    if math.isclose(got, 0.75):
        fail(
            "you took the majority answer from the test questions: a baseline may only learn from the training split"
        )
    if math.isclose(got, 25.0):
        fail("return a fraction in [0, 1], not a percentage")
    if not math.isclose(got, 0.25):
        if any(math.isclose(got, wrong) for wrong in (3 / 16, 0.0, 2 / 16)):
            fail(
                "keep only the questions of the given family, in both splits (the majority answer of "
                "all training questions, or accuracy over all test questions, mixes families)"
            )
        fail(
            f"on a crafted example (train majority '3', test answers 6x '4', 2x '3') expected 0.25, got {got}"
        )
    world_train = generate_split(_CHECK_WORLD, "train")
    world_test = generate_split(_CHECK_WORLD, "test")
    for family in ("shape", "top", "count", "closest"):
        got = float(call_student(fn, world_train, world_test, family))
        want = reference_majority_baseline(world_train, world_test, family)
        if not math.isclose(got, want, abs_tol=1e-9):
            fail(f"family {family!r} on a small world: expected {want:.4f}, got {got:.4f}")
    passed("your majority baseline learns from train only, per family, and scores the test split")


# --------------------------------------------------------------------------- exercise 4: closest object


def check_closest_object(fn: Callable) -> None:
    """Exercise 4: ``fn(objects: list[SceneObject], color: str) -> str``, the colour of the closest other object."""
    scenes = generate_split(_CHECK_WORLD, "train")
    for scene in scenes:
        for color in scene.objects[0].color, scene.objects[-1].color:
            got = call_student(fn, list(scene.objects), color)
            if isinstance(got, SceneObject):
                fail(
                    "return the colour of the closest object (a str such as 'blue'), e.g. `best.color`"
                )
            if not isinstance(got, str):
                fail(f"return a colour name (str), got {type(got).__name__}")
            want = _closest(scene.objects, color)
            if got == want:
                continue
            if got == color:
                fail(f"the {color} object itself is at distance 0: leave it out of the candidates")
            if got == _closest(scene.objects, color, furthest=True):
                fail("you returned the furthest object: take the minimum distance")
            if got == _closest(scene.objects, color, manhattan=True):
                fail(
                    "use the Euclidean distance between centres (math.hypot(dx, dy)), not |dx| + |dy|"
                )
            fail(
                f"in scene {scene.index} the object closest to the {color} one is the {want} one, you said {got!r}"
            )
    passed(f"your closest_object agrees with the geometry on {2 * len(scenes)} questions")


def _closest(
    objects: Sequence[SceneObject], color: str, furthest: bool = False, manhattan: bool = False
) -> str:
    target = next(o for o in objects if o.color == color)

    def dist(o: SceneObject) -> float:
        dx, dy = o.center[0] - target.center[0], o.center[1] - target.center[1]
        return abs(dx) + abs(dy) if manhattan else math.hypot(dx, dy)

    others = [o for o in objects if o is not target]
    return (max if furthest else min)(others, key=dist).color
