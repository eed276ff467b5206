"""The region features every model in the book reads (chapter 2, "Region features, and the cache").

ViLBERT and UNITER never see pixels. They see a *set of regions*: for every
box, a feature vector, the box itself and the detector's class distribution
for it. :class:`RegionFeatures` holds those for ``N`` images as padded
tensors, with the ``[IMG]`` feature and the location features, and saves
itself as one safetensors file. It knows nothing of detectors or of the
world that made it, so :mod:`fusionlib.data.datasets` can batch it without
importing the rest of :mod:`fusionlib.vision`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fusionlib.fileio import atomic_write

from .boxes import as_image_size, check_boxes, loc5, loc7

__all__ = ["FEATURES_FORMAT_VERSION", "RegionFeatures", "pad_regions"]

FEATURES_FORMAT_VERSION = 1


@dataclass
class RegionFeatures:
    """Padded region features of ``N`` images with at most ``R`` regions each (chapter 2).

    Fields:

    - feats ``(N, R, D)`` float32: box-head outputs (zeros at padding).
    - boxes ``(N, R, 4)`` float32: xyxy pixels (zeros at padding).
    - mask ``(N, R)`` bool: True where a region is real; real regions come first.
    - soft_labels ``(N, R, C)`` float32: the detector's softmax over its classes,
      the MRC-kl target of ViLBERT/UNITER (rows of zeros at padding).
    - region_object ``(N, R)`` long: index into ``scene.objects`` of the object
      the region covers, ``-1`` for background and padding. For evaluation
      and plots only; a model must never see it.
    - image_feats ``(N, D)`` float32: the ``[IMG]`` feature, the mean of the real
      regions' features. ViLBERT prepends this as an ``[IMG]`` token with
      location ``[0, 0, 1, 1, 1]``: it summarises the whole image in the same
      space as the regions, so the same embedding layer takes it, and its
      output is what ITM pools on the visual side.
    - indices ``(N,)`` long: the scene index of each row.
    - image_size ``(H, W)``: the frame the boxes are in.
    - class_names: the names of the ``C`` soft-label classes.

    ``loc5`` ``(N, R, 5)`` and ``loc7`` ``(N, R, 7)`` are computed from ``boxes``.
    """

    feats: Tensor
    boxes: Tensor
    mask: Tensor
    soft_labels: Tensor
    region_object: Tensor
    image_feats: Tensor
    indices: Tensor
    image_size: tuple[int, int]
    class_names: tuple[str, ...] = ()
    _rows: dict[int, int] | None = field(default=None, init=False, repr=False, compare=False)

    _TENSORS = ("feats", "boxes", "mask", "soft_labels", "region_object", "image_feats", "indices")

    def __post_init__(self) -> None:
        self.image_size = as_image_size(self.image_size)
        self.class_names = tuple(self.class_names)
        if self.feats.dim() != 3:
            raise ValueError(f"feats must be (N, R, D), got {tuple(self.feats.shape)}")
        N, R, D = self.feats.shape
        expected = {
            "boxes": ((N, R, 4), torch.float32),
            "mask": ((N, R), torch.bool),
            "region_object": ((N, R), torch.long),
            "image_feats": ((N, D), torch.float32),
            "indices": ((N,), torch.long),
        }
        for name, (shape, dtype) in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name} must be {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")
        if self.soft_labels.dim() != 3 or tuple(self.soft_labels.shape[:2]) != (N, R):
            raise ValueError(
                f"soft_labels must be ({N}, {R}, C), got {tuple(self.soft_labels.shape)}"
            )
        if self.class_names and len(self.class_names) != self.soft_labels.shape[2]:
            raise ValueError(
                f"class_names has {len(self.class_names)} names for {self.soft_labels.shape[2]} classes"
            )
        check_boxes(self.boxes, self.image_size, "boxes")

    def __len__(self) -> int:
        return self.feats.shape[0]

    @property
    def num_regions(self) -> int:
        return self.feats.shape[1]

    @property
    def feature_dim(self) -> int:
        return self.feats.shape[2]

    @property
    def num_classes(self) -> int:
        return self.soft_labels.shape[2]

    @property
    def loc5(self) -> Tensor:
        """``(N, R, 5)`` ViLBERT locations (zeros at padding)."""
        return loc5(self.boxes, self.image_size)

    @property
    def loc7(self) -> Tensor:
        """``(N, R, 7)`` UNITER locations (zeros at padding)."""
        return loc7(self.boxes, self.image_size)

    def row(self, scene_index: int) -> int:
        """The row holding scene ``scene_index``; ``KeyError`` if it is not here."""
        if self._rows is None:
            self._rows = {int(i): r for r, i in enumerate(self.indices.tolist())}
        return self._rows[int(scene_index)]

    def select(self, rows: Any) -> "RegionFeatures":
        """A new :class:`RegionFeatures` with only ``rows`` (an index tensor, list or slice)."""
        rows = torch.as_tensor(rows, dtype=torch.long) if not isinstance(rows, slice) else rows
        return RegionFeatures(
            self.feats[rows],
            self.boxes[rows],
            self.mask[rows],
            self.soft_labels[rows],
            self.region_object[rows],
            self.image_feats[rows],
            self.indices[rows],
            self.image_size,
            self.class_names,
        )

    def save(self, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> str:
        """Write one safetensors file (atomically); sizes and class names go in its metadata."""
        tensors = {name: getattr(self, name).contiguous() for name in self._TENSORS}
        metadata = {
            "image_size": json.dumps(list(self.image_size)),
            "class_names": json.dumps(list(self.class_names)),
            "format_version": str(FEATURES_FORMAT_VERSION),
            **(extra_metadata or {}),
        }

        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RegionFeatures":
        path = os.fspath(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format_version") != str(FEATURES_FORMAT_VERSION):
            raise ValueError(
                f"{path} has format_version {metadata.get('format_version')!r}, "
                f"expected {FEATURES_FORMAT_VERSION}"
            )
        tensors = load_file(path)
        missing = [n for n in cls._TENSORS if n not in tensors]
        if missing:
            raise ValueError(f"{path} lacks tensors {missing}")
        return cls(
            **{n: tensors[n] for n in cls._TENSORS},
            image_size=tuple(json.loads(metadata["image_size"])),
            class_names=tuple(json.loads(metadata["class_names"])),
        )


def pad_regions(
    per_image: Sequence[tuple[Tensor, Tensor]],
    feats: Tensor,
    probs: Tensor,
    indices: Tensor,
    image_size: tuple[int, int],
    max_regions: int | None,
    class_names: Sequence[str],
) -> RegionFeatures:
    """Scatter flat per-region outputs into a padded :class:`RegionFeatures`.

    ``per_image``: one ``(boxes (n_i, 4), region_object (n_i,))`` pair per image;
    ``feats (sum n_i, D)`` and ``probs (sum n_i, C)`` in the same order;
    ``indices (N,)`` the scene indices. ``R`` is ``max_regions``, or the largest
    ``n_i`` when it is None. The ``[IMG]`` feature is the mean over real regions.
    """
    counts = torch.tensor([len(b) for b, _ in per_image], dtype=torch.long)
    N = len(per_image)
    R = int(counts.max().item()) if N else 0
    if max_regions is not None:
        if R > max_regions:
            raise ValueError(f"max_regions={max_regions} is smaller than an image's {R} regions")
        R = max_regions
    D, C = feats.shape[1], probs.shape[1]
    row = torch.repeat_interleave(torch.arange(N), counts)
    slot = torch.arange(len(row)) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    out_feats = torch.zeros(N, R, D)
    out_boxes = torch.zeros(N, R, 4)
    out_probs = torch.zeros(N, R, C)
    out_owner = torch.full((N, R), -1, dtype=torch.long)
    mask = torch.zeros(N, R, dtype=torch.bool)
    out_feats[row, slot] = feats
    out_probs[row, slot] = probs
    if len(row):
        out_boxes[row, slot] = torch.cat([b for b, _ in per_image])
        out_owner[row, slot] = torch.cat([o for _, o in per_image])
    mask[row, slot] = True
    image_feats = out_feats.sum(1) / counts.clamp(min=1)[:, None].float()
    return RegionFeatures(
        out_feats,
        out_boxes,
        mask,
        out_probs,
        out_owner,
        image_feats,
        indices,
        image_size,
        tuple(class_names),
    )
