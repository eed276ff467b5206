"""Region proposals: the boxes an RPN would hand the detector's box head (chapter 2, "Region proposals").

For a scene with ``K`` objects, :func:`propose_regions` returns the objects'
own boxes, jittered copies of some of them (IoU >= 0.5 with their object,
labelled as that object: exactly Faster R-CNN's foreground rule) and
background boxes (IoU < 0.3 with every object). They come shuffled, so that
"region i is object i" is not something a model can learn. All randomness is
drawn from the caller's ``torch.Generator``, so a scene's proposals are a
function of the generator's state and nothing else.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou, clip_boxes_to_image

from fusionlib import runtime

from .boxes import as_image_size, check_boxes

__all__ = ["propose_regions"]


def propose_regions(
    object_boxes: Tensor,
    image_size: Any,
    num_jitter: int,
    num_background: int,
    generator: torch.Generator,
    *,
    min_jitter_iou: float = 0.5,
    max_background_iou: float = 0.3,
    max_tries: int = 100,
) -> tuple[Tensor, Tensor]:
    """Proposals as a detector's RPN would give them: objects, jittered objects, background.

    Args:
        object_boxes: ``(K, 4)`` xyxy pixel boxes of the scene's objects.
        image_size: ``(H, W)`` (or one int for a square image).
        num_jitter: how many jittered copies of (randomly chosen) objects to add.
            A copy has IoU >= ``min_jitter_iou`` with its object and overlaps no
            other object more; Faster R-CNN labels such a box as that object.
        num_background: how many background boxes to add: IoU < ``max_background_iou``
            with every object (they may still clip an object's corner, like real
            negatives do). Their sides are 0.5x to 2x the mean object side.
        generator: the torch generator all randomness comes from.

    Returns:
        ``boxes (n, 4)`` float32 and ``region_object (n,)`` long, the index of the
        object each region covers (``-1`` for background), in a random order
        drawn from ``generator``; ``n = K + num_jitter + num_background``
        (no jitter when ``K == 0``).
    """
    # Tiny tensors: one thread. With several, each small op can wait ~1 ms on
    # waking OpenMP workers, which made proposals 100x slower on 2 busy cores.
    with runtime.num_threads(1):
        H, W = as_image_size(image_size)
        boxes = check_boxes(object_boxes, (H, W), "object_boxes")
        if boxes.dim() != 2:
            raise ValueError(f"object_boxes must have shape (K, 4), got {tuple(boxes.shape)}")
        for arg, value in (("num_jitter", num_jitter), ("num_background", num_background)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
        if not 0.0 < min_jitter_iou <= 1.0:
            raise ValueError(f"min_jitter_iou must be in (0, 1], got {min_jitter_iou}")
        if not 0.0 < max_background_iou <= 1.0:
            raise ValueError(f"max_background_iou must be in (0, 1], got {max_background_iou}")
        return _propose(
            boxes,
            (H, W),
            num_jitter,
            num_background,
            generator,
            min_jitter_iou,
            max_background_iou,
            max_tries,
        )


def _propose(
    boxes: Tensor,
    size: tuple[int, int],
    num_jitter: int,
    num_background: int,
    generator: torch.Generator,
    min_jitter_iou: float,
    max_background_iou: float,
    max_tries: int,
) -> tuple[Tensor, Tensor]:
    num_objects = boxes.shape[0]
    parts = [boxes]
    owners = [torch.arange(num_objects)]
    if num_jitter > 0 and num_objects > 0:
        # Every object is jittered once before any is jittered twice.
        repeats = math.ceil(num_jitter / num_objects)
        source = torch.cat(
            [torch.randperm(num_objects, generator=generator) for _ in range(repeats)]
        )[:num_jitter]
        parts.append(_jitter_boxes(boxes, source, size, generator, min_jitter_iou, max_tries))
        owners.append(source)
    if num_background > 0:
        parts.append(
            _background_boxes(boxes, num_background, size, generator, max_background_iou, max_tries)
        )
        owners.append(torch.full((num_background,), -1, dtype=torch.long))
    all_boxes = torch.cat(parts)
    all_owners = torch.cat(owners)
    order = torch.randperm(all_boxes.shape[0], generator=generator)
    return all_boxes[order], all_owners[order]


def _jitter_boxes(
    boxes: Tensor,
    source: Tensor,
    size: tuple[int, int],
    generator: torch.Generator,
    min_iou: float,
    max_tries: int,
    candidates: int = 8,
) -> Tensor:
    """One jittered copy of ``boxes[source[j]]`` for each j: ``(J, 4)``, by vectorised rejection sampling.

    Each try draws ``candidates`` boxes per copy still missing (centre moved by
    up to a quarter side, sides scaled by ``exp(+-0.35)``) and keeps the first
    that overlaps its own object at least ``min_iou`` and at least as much as
    any other object.
    """
    out = torch.empty(len(source), 4)
    todo = torch.arange(len(source))
    for _ in range(max_tries):
        src = boxes[source[todo]]  # (J, 4)
        w = (src[:, 2] - src[:, 0]).clamp(min=1.0)[:, None]
        h = (src[:, 3] - src[:, 1]).clamp(min=1.0)[:, None]
        cx = (src[:, 0] + src[:, 2])[:, None] / 2
        cy = (src[:, 1] + src[:, 3])[:, None] / 2
        noise = torch.rand(len(todo), candidates, 4, generator=generator) * 2 - 1  # U(-1, 1)
        cx = cx + 0.25 * w * noise[..., 0]
        cy = cy + 0.25 * h * noise[..., 1]
        nw = w * torch.exp(0.35 * noise[..., 2])
        nh = h * torch.exp(0.35 * noise[..., 3])
        cand = clip_boxes_to_image(
            torch.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], dim=-1), size
        )
        iou = box_iou(cand.reshape(-1, 4), boxes).reshape(len(todo), candidates, -1)  # (J, M, K)
        own = iou.gather(2, source[todo][:, None, None].expand(-1, candidates, 1)).squeeze(2)
        ok = (own >= min_iou) & (own >= iou.max(dim=2).values)
        found = ok.any(dim=1)
        first = ok.float().argmax(dim=1)  # first valid candidate
        out[todo[found]] = cand[found, first[found]]
        todo = todo[~found]
        if len(todo) == 0:
            return out
    raise RuntimeError(
        f"could not jitter {len(todo)} boxes to IoU >= {min_iou} in {max_tries} tries"
    )


def _background_boxes(
    boxes: Tensor,
    count: int,
    size: tuple[int, int],
    generator: torch.Generator,
    max_iou: float,
    max_tries: int,
) -> Tensor:
    """``count`` boxes ``(count, 4)`` with IoU < ``max_iou`` against every object (rejection sampling)."""
    H, W = size
    if len(boxes):
        side = ((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])).mean().item() / 2
    else:
        side = min(H, W) / 8
    side = max(side, 1.0)
    found: list[Tensor] = []
    need = count
    for _ in range(max_tries):
        m = 4 * need + 4
        r = torch.rand(m, 4, generator=generator)
        w = (side * (0.5 + 1.5 * r[:, 0])).clamp(max=W)
        h = (side * (0.5 + 1.5 * r[:, 1])).clamp(max=H)
        x1 = r[:, 2] * (W - w)
        y1 = r[:, 3] * (H - h)
        cand = torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
        if len(boxes):
            ok = box_iou(cand, boxes).max(dim=1).values < max_iou
            cand = cand[ok]
        found.append(cand[:need])
        need -= len(found[-1])
        if need == 0:
            return torch.cat(found)
    raise RuntimeError(
        f"could not place {count} background boxes with IoU < {max_iou} in {max_tries} tries"
    )
