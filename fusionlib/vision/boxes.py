"""Boxes and the location features made from them (chapter 2, "Scenes and their boxes", "Location features").

A box is ``(x1, y1, x2, y2)`` in pixels, origin top-left, ``x2``/``y2``
exclusive: it covers the continuous square ``[x1, x2) x [y1, y2)``. That is
exactly the convention of ``torchvision.ops.roi_align(..., aligned=True)``,
which places pixel ``i`` at ``[i, i + 1)``, so a box pools the pixels it
covers and no others. An all-zero box is padding. This module checks boxes
(:func:`check_boxes`) and turns them into the normalised locations the models
embed next to each region's feature: ViLBERT's :func:`loc5` and UNITER's
:func:`loc7` (chapters 5 and 6).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["as_image_size", "check_boxes", "loc5", "loc7"]


def as_image_size(image_size: Any, name: str = "image_size") -> tuple[int, int]:
    """``75`` or ``(75, 75)`` -> ``(H, W)`` as positive ints; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list, torch.Size)) and len(image_size) == 2:
        size = tuple(image_size)
    else:
        raise ValueError(f"{name} must be an int or a pair (H, W), got {image_size!r}")
    if not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size
    ):
        raise ValueError(f"{name} must hold positive ints (H, W), got {image_size!r}")
    return int(size[0]), int(size[1])


def check_boxes(boxes: Any, image_size: Any, name: str = "boxes") -> Tensor:
    """Return ``boxes`` as a float32 tensor ``(..., 4)`` after checking they lie in the image.

    Raises ``ValueError`` naming ``name`` for a wrong shape, a non-finite value,
    ``x2 < x1`` or ``y2 < y1``, or a box outside ``[0, W] x [0, H]``.
    All-zero (padding) boxes pass.
    """
    H, W = as_image_size(image_size)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(
            f"{name} must have shape (..., 4) as (x1, y1, x2, y2), got {tuple(boxes.shape)}"
        )
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    x1, y1, x2, y2 = boxes.unbind(-1)
    bad = (x2 < x1) | (y2 < y1)
    if bad.any():
        first = boxes[bad][0].tolist()
        raise ValueError(f"{name} must have x1 <= x2 and y1 <= y2 (xyxy pixels), got {first}")
    outside = (x1 < 0) | (y1 < 0) | (x2 > W) | (y2 > H)
    if outside.any():
        first = boxes[outside][0].tolist()
        raise ValueError(
            f"{name} must lie inside the image: 0 <= x1 <= x2 <= W={W} and 0 <= y1 <= y2 <= H={H}, "
            f"got box {first}"
        )
    return boxes


def loc5(boxes: Tensor, image_size: Any) -> Tensor:
    """ViLBERT's 5-d box location ``[x1/W, y1/H, x2/W, y2/H, area/(W*H)]`` (chapter 2).

    ``boxes (..., 4)`` xyxy pixels inside an image of ``image_size = (H, W)``
    -> ``(..., 5)`` in ``[0, 1]``. Padding boxes (all zero) give all zeros.
    Normalised coordinates do not change when an image is resized, which is
    why the same model can take images of any size.
    """
    H, W = as_image_size(image_size)
    boxes = check_boxes(boxes, (H, W), "boxes")
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    return torch.stack([x1 / W, y1 / H, x2 / W, y2 / H, area / (W * H)], dim=-1)


def loc7(boxes: Tensor, image_size: Any) -> Tensor:
    """UNITER's 7-d box location ``(x1, y1, x2, y2, w, h, w*h)``, normalised (chapter 2).

    ``boxes (..., 4)`` -> ``(..., 7)``: ``[x1/W, y1/H, x2/W, y2/H, w/W, h/H, (w*h)/(W*H)]``.
    It carries the same information as :func:`loc5` plus width and height
    spelled out, which a linear layer cannot compute from corners alone.
    """
    H, W = as_image_size(image_size)
    boxes = check_boxes(boxes, (H, W), "boxes")
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1 / W, y1 / H, x2 / W, y2 / H, w / W, h / H, (w * h) / (W * H)], dim=-1)
