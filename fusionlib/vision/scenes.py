"""What the vision code reads from a scene of :mod:`fusionlib.data.shapes`, as tensors (chapter 2).

A scene is read through three attributes only: ``image`` (``(H, W, 3)`` uint8),
``objects`` (each with a pixel ``box`` and a ``color`` and ``shape``) and
``index``. Anything with those attributes works, which keeps this package from
depending on how the world is generated.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["stack_images", "object_boxes", "object_labels"]


def stack_images(scenes: Sequence[Any]) -> Tensor:
    """The scenes' pixels as one ``(N, H, W, 3)`` uint8 tensor."""
    return torch.from_numpy(np.stack([np.asarray(s.image) for s in scenes]))


def object_boxes(scene: Any) -> Tensor:
    """The scene's object boxes ``(K, 4)`` float32, xyxy pixels (``(0, 4)`` for an empty scene)."""
    return torch.tensor([list(o.box) for o in scene.objects], dtype=torch.float32).reshape(-1, 4)


def object_labels(scene: Any, class_index: Mapping[str, int]) -> Tensor:
    """The scene's object classes ``(K,)`` long, looked up as ``class_index["<color> <shape>"]``."""
    try:
        return torch.tensor(
            [class_index[f"{o.color} {o.shape}"] for o in scene.objects], dtype=torch.long
        )
    except KeyError as err:
        raise ValueError(
            f"scene {scene.index} has an object of class {err.args[0]!r} the detector does not know"
        ) from None
