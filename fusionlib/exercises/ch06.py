"""Checks for chapter 6's exercises (UNITER: one stream, task sampling, word-region alignment)."""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from fusionlib.exercises import call_student, expect_tensor, fail, passed, random_boxes
from fusionlib.losses import wra_loss
from fusionlib.vision import loc7

IGNORE = -100


# --------------------------------------------------------------------------- exercise 1: the joint attention mask


def _padding(lengths: list[int], size: int) -> torch.Tensor:
    return torch.arange(size)[None, :] < torch.tensor(lengths)[:, None]


def check_joint_attention_mask(fn: Callable) -> None:
    """Exercise 1: ``fn(attention_mask (B, T) bool, region_mask (B, R) bool) -> (B, T + R, T + R)`` bool,
    True where query ``i`` may attend to key ``j`` of the sequence ``[text; regions]``."""
    cases = [
        (_padding([5, 3, 1], 5), _padding([4, 2, 0], 4)),  # an image without any region
        (_padding([2, 6], 6), _padding([3, 3], 3)),
    ]
    for text_mask, region_mask in cases:
        B, T = text_mask.shape
        R = region_mask.shape[1]
        got = call_student(fn, text_mask.clone(), region_mask.clone())
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (B, T + R):
            fail(
                f"you returned the key padding mask (B, T + R) = {(B, T + R)}; the exercise asks for the full "
                f"(B, T + R, T + R) = {(B, T + R, T + R)} mask, one row per query (expand over queries)"
            )
        got = expect_tensor("your mask", got, (B, T + R, T + R))
        if got.dtype != torch.bool:
            fail(
                f"the mask should be bool (True = attention allowed, the SDPA convention), got {got.dtype}"
            )
        keys = torch.cat([text_mask, region_mask], dim=1)  # (B, T + R)
        want = keys[:, None, :].expand(B, T + R, T + R)
        if torch.equal(got, want):
            continue
        if torch.equal(got, ~want):
            fail(
                "True and False are swapped: in fusionlib (and F.scaled_dot_product_attention) True means "
                "'may attend', so real positions are True and padding False"
            )
        swapped = torch.cat([region_mask, text_mask], dim=1)[:, None, :].expand(B, T + R, T + R)
        if torch.equal(got, swapped):
            fail(
                "you put the regions first: UNITER's sequence is [text; regions], words at positions 0..T-1"
            )
        outer = keys[:, :, None] & keys[:, None, :]
        if torch.equal(got, outer):
            fail(
                "you also masked the padded *queries*: then a padded position's row has no allowed key and "
                "its softmax is 0/0 = NaN. Mask keys only; padded rows are computed and ignored"
            )
        blocks = torch.zeros_like(want)
        blocks[:, :T, :T] = text_mask[:, None, :].expand(B, T, T)
        blocks[:, T:, T:] = region_mask[:, None, :].expand(B, R, R)
        if torch.equal(got, blocks):
            fail(
                "words only see words and regions only see regions: that is two separate streams. In a single "
                "stream every position may attend to every real word *and* every real region"
            )
        bad = (got != want).nonzero()[0].tolist()
        fail(
            f"entry [sample {bad[0]}, query {bad[1]}, key {bad[2]}] should be {bool(want[tuple(bad)])}: "
            f"key {bad[2]} is a {'word' if bad[2] < T else 'region'} that is "
            f"{'real' if want[tuple(bad)] else 'padding'}"
        )
    passed("your mask lets every query see exactly the real words and regions of its own sample")


# --------------------------------------------------------------------------- exercise 2: the 7-d location


def check_loc7(fn: Callable) -> None:
    """Exercise 2: ``fn(boxes (N, 4) xyxy pixels, image_size (H, W)) -> (N, 7)`` UNITER locations."""
    g = torch.Generator().manual_seed(6)
    for H, W in [(60, 80), (75, 75), (40, 120)]:
        boxes = random_boxes(5, (H, W), g)
        got = expect_tensor("your loc7", call_student(fn, boxes.clone(), (H, W)), (5, 7))
        want = loc7(boxes, (H, W))
        if torch.allclose(got, want, atol=1e-5):
            continue
        x1, y1, x2, y2 = boxes.unbind(-1)
        w, h = x2 - x1, y2 - y1
        if torch.allclose(got[:, :6], want[:, :6], atol=1e-5):
            if torch.allclose(got[:, 6], w * h, atol=1e-3):
                fail(
                    "the area w*h is in pixels: divide it by W*H so that it lies in [0, 1] like the rest"
                )
            fail(
                f"the first six numbers are right; the seventh is the normalised area (w*h)/(W*H), "
                f"expected {want[0, 6].item():.4f}, got {got[0, 6].item():.4f}"
            )
        if torch.allclose(got[:, :4], want[:, :4], atol=1e-5) and torch.allclose(
            got[:, 4:6], torch.stack([w, h], -1), atol=1e-3
        ):
            fail("the width and height are in pixels: divide w by W and h by H")
        if H != W and torch.allclose(got, _loc7_swapped(boxes, H, W), atol=1e-5):
            fail(
                "you divided x by H and y by W: x coordinates (and w) go with the width W, y (and h) with the "
                "height H (image_size is (H, W))"
            )
        xywh = torch.stack([x1 / W, y1 / H, w / W, h / H, x2 / W, y2 / H, w * h / (W * H)], dim=-1)
        if torch.allclose(got, xywh, atol=1e-5):
            fail("the order is (x1, y1, x2, y2, w, h, w*h): corners first, then width and height")
        fail(
            f"for image (H, W) = {(H, W)} and box {[round(v, 2) for v in boxes[0].tolist()]} expected "
            f"{[round(v, 4) for v in want[0].tolist()]}, got {[round(v, 4) for v in got[0].tolist()]}"
        )
    passed("your loc7 matches fusionlib.vision.loc7 on square and non-square images")


def _loc7_swapped(boxes: torch.Tensor, H: int, W: int) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1 / H, y1 / W, x2 / H, y2 / W, w / H, h / W, w * h / (W * H)], dim=-1)


# --------------------------------------------------------------------------- exercise 3: task sampling


def check_task_probabilities(fn: Callable) -> None:
    """Exercise 3: ``fn(mix {task: weight}) -> {task: probability}``, the chance that a step trains each task."""
    for mix in (
        {"itm": 2, "mlm": 2, "mrfr": 1, "mrc_kl": 1},
        {"mlm": 1, "itm": 1},
        {"mlm": 3, "itm": 1, "mrfr": 4},
    ):
        got = call_student(fn, dict(mix))
        if not isinstance(got, Mapping):
            fail(f"return a dict {{task: probability}}, got {type(got).__name__}")
        if set(got) != set(mix):
            fail(
                f"the dict should have one entry per task of the mix {sorted(mix)}, got {sorted(got)}"
            )
        try:
            got = {t: float(p) for t, p in got.items()}
        except (TypeError, ValueError):
            fail("each probability should be a number (a float or a one-element tensor)")
        total = sum(mix.values())
        want = {t: w / total for t, w in mix.items()}
        if all(math.isclose(got[t], want[t], abs_tol=1e-6) for t in mix):
            continue
        if all(math.isclose(got[t], float(mix[t]), abs_tol=1e-6) for t in mix):
            fail(
                "you returned the weights themselves; probabilities must sum to 1: divide each weight by the "
                f"sum of all weights ({total})"
            )
        if all(math.isclose(got[t], 1 / len(mix), abs_tol=1e-6) for t in mix):
            fail(
                "every task got the same probability: the mix is a *ratio*, a task with weight 2 is drawn "
                "twice as often as one with weight 1"
            )
        soft = torch.softmax(torch.tensor([float(w) for w in mix.values()]), 0).tolist()
        if all(math.isclose(got[t], s, abs_tol=1e-6) for t, s in zip(mix, soft)):
            fail(
                "you took a softmax of the weights; torch.multinomial (what fusionlib.train samples with) "
                "draws in proportion to the weights themselves: w / sum(w)"
            )
        if not math.isclose(sum(got.values()), 1.0, abs_tol=1e-6):
            fail(f"your probabilities sum to {sum(got.values()):.4f}, not 1")
        fail(f"for the mix {mix} expected {want}, got {got}")
    passed(
        "your probabilities are the mix weights divided by their sum, as torch.multinomial samples them"
    )


# --------------------------------------------------------------------------- exercise 4: the WRA loss


def check_wra_loss(fn: Callable) -> None:
    """Exercise 4: ``fn(distance (B,), itm_labels (B,) in {1, 0, -100}) -> scalar``: UNITER's WRA loss."""
    cases = [
        (torch.tensor([0.2, 0.9, 0.4, 0.7]), torch.tensor([1, 0, 1, 0])),
        (torch.tensor([0.3, 0.8, 0.5, 0.6, 0.1]), torch.tensor([1, 1, 0, IGNORE, 1])),
        (torch.tensor([0.25, 0.5, 0.75]), torch.tensor([0, 0, 1])),
    ]
    for distance, labels in cases:
        got = call_student(fn, distance.clone(), labels.clone())
        got = expect_tensor("your WRA loss", got)
        if got.numel() != 1:
            fail(
                f"the loss should be one number (a scalar), got shape {tuple(got.shape)}; average over the pairs"
            )
        value = float(got.detach())
        want = float(wra_loss(distance, labels))
        if math.isclose(value, want, abs_tol=1e-5):
            continue
        scored = labels != IGNORE
        sign = torch.where(labels == 1, 1.0, -1.0)
        if math.isclose(value, -want, abs_tol=1e-5):
            fail(
                "the signs are reversed: a matched pair (label 1) should be *pulled together*, so its distance "
                "enters with +; an unmatched pair (label 0) is pushed apart, so its distance enters with -"
            )
        if math.isclose(value, float((distance * sign).mean()), abs_tol=1e-5) and not scored.all():
            fail(
                "you scored the pair labelled -100 too: ignored pairs must be left out of the sum and the count"
            )
        if math.isclose(value, float((distance * sign)[scored].sum()), abs_tol=1e-5):
            fail("you summed; UNITER divides by the number of scored pairs (matched + unmatched)")
        pos = labels == 1
        if math.isclose(value, float((distance * sign)[scored].sum() / pos.sum()), abs_tol=1e-5):
            fail(
                "you divided by the number of matched pairs only; divide by all scored pairs (matched + unmatched)"
            )
        if math.isclose(value, float(distance[scored].mean()), abs_tol=1e-5):
            fail(
                "you averaged the distances without looking at the labels: unmatched pairs must count with a minus "
                "sign (they are pushed apart)"
            )
        fail(
            f"for distances {distance.tolist()} and labels {labels.tolist()} expected {want:.4f}, got {value:.4f}"
        )
    # Gradient: matched pairs must pull (positive gradient), unmatched push.
    distance = torch.tensor([0.4, 0.6], requires_grad=True)
    loss = call_student(fn, distance, torch.tensor([1, 0]))
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        fail(
            "the loss has no gradient: compute it with tensor operations on `distance` (no .item(), no floats)"
        )
    loss.backward()
    if not (distance.grad[0] > 0 > distance.grad[1]):
        fail(
            f"gradient {distance.grad.tolist()}: a step down the loss should shrink the matched distance and grow "
            "the unmatched one"
        )
    passed(
        "your WRA loss matches fusionlib.losses.wra_loss: matched pairs pull, unmatched push, -100 ignored"
    )


__all__ = ["check_joint_attention_mask", "check_loc7", "check_task_probabilities", "check_wra_loss"]
