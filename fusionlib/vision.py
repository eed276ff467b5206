"""Region features the way bottom-up attention makes them (chapter 2).

ViLBERT and UNITER never see pixels. They see a *set of regions*: for every
box a detector proposed, a feature vector pooled from a CNN feature map with
RoI pooling, the box itself, and the detector's class distribution for that
box. Anderson et al.'s "bottom-up attention" (a Faster R-CNN trained on Visual
Genome, 10-36 boxes per image, 2048-d pooled features, 1600 classes plus
background) is the standard source. This module builds the same thing for the
synthetic world of :mod:`fusionlib.data.shapes`, small enough to train in
seconds on a CPU:

1. :class:`RegionDetector`: a 3-layer CNN backbone, ``torchvision.ops.roi_align``
   over boxes, a small MLP (the "box head") whose output is the region feature,
   and a linear classifier over colour x shape classes plus ``background``.
   :func:`train_detector` trains it on the world's scenes.
2. :func:`propose_regions`: what a region proposal network hands the box head:
   the objects, jittered copies of some of them (IoU >= 0.5 with their
   object, labelled as that object, exactly Faster R-CNN's foreground rule)
   and background boxes (IoU < 0.3 with every object). Shuffled, so that
   "region i is object i" is not something a model can learn.
3. :func:`extract_region_features` -> :class:`RegionFeatures`: padded tensors of
   features, boxes, masks, soft labels (the MRC-kl target) and the ``[IMG]``
   feature; :func:`loc5` (ViLBERT) and :func:`loc7` (UNITER) location features.
4. :func:`load_or_build_features`: the same, cached to disk with safetensors
   under a key that hashes both configs.
5. Real images (opt-in, never downloads): :func:`grid_boxes` +
   :func:`extract_grid_features` with a torchvision ResNet-18, and
   :class:`FasterRCNNRegions` when Faster R-CNN weights are on disk.

Boxes are ``(x1, y1, x2, y2)`` in pixels, origin top-left, ``x2``/``y2``
exclusive: a box covers the continuous square ``[x1, x2) x [y1, y2)``. That is
exactly the convention of ``roi_align(..., aligned=True)``, which places pixel
``i`` at ``[i, i + 1)``. Masks are True where a region is real.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchvision.ops import box_iou, roi_align

from fusionlib import runtime

BACKGROUND = "background"
FEATURES_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------
# Argument checks shared by everything below
# ---------------------------------------------------------------------------


def _as_image_size(image_size: Any, name: str = "image_size") -> tuple[int, int]:
    """``75`` or ``(75, 75)`` -> ``(H, W)`` as positive ints."""
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list, torch.Size)) and len(image_size) == 2:
        size = tuple(image_size)
    else:
        raise ValueError(f"{name} must be an int or a pair (H, W), got {image_size!r}")
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"{name} must hold positive ints (H, W), got {image_size!r}")
    return int(size[0]), int(size[1])


def check_boxes(boxes: Any, image_size: Any, name: str = "boxes") -> Tensor:
    """Return ``boxes`` as a float32 tensor ``(..., 4)`` after checking they lie in the image.

    Raises ``ValueError`` naming ``name`` for a wrong shape, a non-finite value,
    ``x2 < x1`` or ``y2 < y1``, or a box outside ``[0, W] x [0, H]``.
    All-zero (padding) boxes pass.
    """
    H, W = _as_image_size(image_size)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4) as (x1, y1, x2, y2), got {tuple(boxes.shape)}")
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


# ---------------------------------------------------------------------------
# Location features (chapter 2; used by the embeddings of chapters 5 and 6)
# ---------------------------------------------------------------------------


def loc5(boxes: Tensor, image_size: Any) -> Tensor:
    """ViLBERT's 5-d box location ``[x1/W, y1/H, x2/W, y2/H, area/(W*H)]`` (chapter 2).

    ``boxes (..., 4)`` xyxy pixels inside an image of ``image_size = (H, W)``
    -> ``(..., 5)`` in ``[0, 1]``. Padding boxes (all zero) give all zeros.
    Normalised coordinates do not change when an image is resized, which is
    why the same model can take images of any size.
    """
    H, W = _as_image_size(image_size)
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
    H, W = _as_image_size(image_size)
    boxes = check_boxes(boxes, (H, W), "boxes")
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1 / W, y1 / H, x2 / W, y2 / H, w / W, h / H, (w * h) / (W * H)], dim=-1)


# ---------------------------------------------------------------------------
# Region proposals (chapter 2)
# ---------------------------------------------------------------------------


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
        H, W = _as_image_size(image_size)
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
        return _propose(boxes, (H, W), num_jitter, num_background, generator, min_jitter_iou,
                        max_background_iou, max_tries)


def _propose(boxes: Tensor, size: tuple[int, int], num_jitter: int, num_background: int,
             generator: torch.Generator, min_jitter_iou: float, max_background_iou: float,
             max_tries: int) -> tuple[Tensor, Tensor]:
    H, W = size
    num_objects = boxes.shape[0]
    parts = [boxes]
    owners = [torch.arange(num_objects)]
    if num_jitter > 0 and num_objects > 0:
        repeats = math.ceil(num_jitter / num_objects)
        source = torch.cat([torch.randperm(num_objects, generator=generator) for _ in range(repeats)])[:num_jitter]
        parts.append(_jitter_boxes(boxes, source, (H, W), generator, min_jitter_iou, max_tries))
        owners.append(source)
    if num_background > 0:
        parts.append(_background_boxes(boxes, num_background, (H, W), generator, max_background_iou, max_tries))
        owners.append(torch.full((num_background,), -1, dtype=torch.long))
    all_boxes = torch.cat(parts)
    all_owners = torch.cat(owners)
    order = torch.randperm(all_boxes.shape[0], generator=generator)
    return all_boxes[order], all_owners[order]


def _clip(boxes: Tensor, H: int, W: int) -> Tensor:
    return torch.stack(
        [boxes[..., 0].clamp(0, W), boxes[..., 1].clamp(0, H), boxes[..., 2].clamp(0, W), boxes[..., 3].clamp(0, H)],
        dim=-1,
    )


def _jitter_boxes(boxes: Tensor, source: Tensor, size: tuple[int, int], generator: torch.Generator,
                  min_iou: float, max_tries: int, candidates: int = 8) -> Tensor:
    """One jittered copy of ``boxes[source[j]]`` for each j (rejection sampling, vectorised)."""
    H, W = size
    out = torch.empty(len(source), 4)
    todo = torch.arange(len(source))
    for _ in range(max_tries):
        src = boxes[source[todo]]                                   # (J, 4)
        w = (src[:, 2] - src[:, 0]).clamp(min=1.0)[:, None]
        h = (src[:, 3] - src[:, 1]).clamp(min=1.0)[:, None]
        cx = (src[:, 0] + src[:, 2])[:, None] / 2
        cy = (src[:, 1] + src[:, 3])[:, None] / 2
        noise = torch.rand(len(todo), candidates, 4, generator=generator) * 2 - 1   # U(-1, 1)
        cx = cx + 0.25 * w * noise[..., 0]
        cy = cy + 0.25 * h * noise[..., 1]
        nw = w * torch.exp(0.35 * noise[..., 2])
        nh = h * torch.exp(0.35 * noise[..., 3])
        cand = _clip(torch.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], dim=-1), H, W)
        iou = box_iou(cand.reshape(-1, 4), boxes).reshape(len(todo), candidates, -1)   # (J, M, K)
        own = iou.gather(2, source[todo][:, None, None].expand(-1, candidates, 1)).squeeze(2)
        ok = (own >= min_iou) & (own >= iou.max(dim=2).values)
        found = ok.any(dim=1)
        first = ok.float().argmax(dim=1)                             # first valid candidate
        out[todo[found]] = cand[found, first[found]]
        todo = todo[~found]
        if len(todo) == 0:
            return out
    raise RuntimeError(f"could not jitter {len(todo)} boxes to IoU >= {min_iou} in {max_tries} tries")


def _background_boxes(boxes: Tensor, count: int, size: tuple[int, int], generator: torch.Generator,
                      max_iou: float, max_tries: int) -> Tensor:
    """``count`` boxes with IoU < ``max_iou`` against every object (rejection sampling)."""
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
    raise RuntimeError(f"could not place {count} background boxes with IoU < {max_iou} in {max_tries} tries")


# ---------------------------------------------------------------------------
# The detector (chapter 2)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that decides the detector and its region features (hashed into the cache key).

    The defaults reach 100% colour x shape accuracy on the default world's test
    split; training took ~17 s on 2 quiet CPU cores (loss ~0 after ~60 steps;
    ``python -m fusionlib.bench features`` measures it on your machine).
    """

    channels: tuple[int, ...] = (32, 64, 64)   # conv widths of the backbone
    strides: tuple[int, ...] = (2, 2, 1)       # 75 px -> 38 -> 19 -> 19 feature map
    feature_dim: int = 64                      # region feature size D
    roi_size: int = 4                          # roi_align output is roi_size x roi_size
    sampling_ratio: int = 2                    # bilinear samples per RoI bin side
    steps: int = 150                           # training steps (100% by ~60 on the default world)
    batch_size: int = 32                       # images per step (x ~10 regions each)
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    seed: int = 0                              # initialisation, training order and proposals
    num_jitter: int = 2                        # jittered object proposals per image
    num_background: int = 2                    # background proposals per image
    min_jitter_iou: float = 0.5
    max_background_iou: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "strides", tuple(self.strides))
        if not self.channels or any(not isinstance(c, int) or c <= 0 for c in self.channels):
            raise ValueError(f"channels must be positive ints, got {self.channels}")
        if len(self.strides) != len(self.channels) or any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"strides must be 1 or 2, one per conv layer ({len(self.channels)}), got {self.strides}")
        for name in ("feature_dim", "roi_size", "sampling_ratio", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("steps", "warmup_steps", "num_jitter", "num_background", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 < self.min_jitter_iou <= 1.0:
            raise ValueError(f"min_jitter_iou must be in (0, 1], got {self.min_jitter_iou}")
        if not 0.0 < self.max_background_iou <= 1.0:
            raise ValueError(f"max_background_iou must be in (0, 1], got {self.max_background_iou}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectorConfig":
        return cls(**d)

    def key(self) -> str:
        """Short stable hash of every field."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class RegionDetector(nn.Module):
    """CNN backbone + ``roi_align`` + box head + classifier (chapter 2).

    ``forward(images (B, 3, H, W) float, boxes: list of B tensors (n_b, 4))``
    -> ``feats (sum n_b, D)``, ``logits (sum n_b, C)``. The class list is the
    world's colour x shape classes followed by ``"background"`` (bottom-up
    attention's 1601 = 1600 Visual Genome classes + background works the same way).
    """

    def __init__(self, config: DetectorConfig, class_names: Sequence[str], image_size: Any):
        super().__init__()
        class_names = tuple(class_names)
        if len(class_names) < 2 or class_names[-1] != BACKGROUND or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be distinct and end with {BACKGROUND!r}, got {class_names}")
        self.config = config
        self.class_names = class_names
        self.image_size = _as_image_size(image_size)
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch, stride in zip(config.channels, config.strides):
            # BatchNorm folds into a per-channel affine at eval time: free at extraction.
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            in_ch = out_ch
        self.backbone = nn.Sequential(*layers)
        # Like Faster R-CNN's TwoMLPHead: the output of the second layer (after ReLU)
        # is the region feature that bottom-up attention saves.
        self.box_head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_ch * config.roi_size**2, config.feature_dim), nn.ReLU(inplace=True),
            nn.Linear(config.feature_dim, config.feature_dim), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(config.feature_dim, len(class_names))

    @property
    def stride(self) -> int:
        return math.prod(self.config.strides)

    @property
    def spatial_scale(self) -> float:
        """Feature-map cells per image pixel: ``1 / stride`` (1/4 by default).

        A stride-2, padding-1, 3x3 conv centres output cell i on input pixel 2i,
        so after total stride s, cell i sits over pixel s*i: the exact scale is
        1/s. (75 px -> 19 cells gives 19/75 = 0.253, the same to within a
        quarter cell; torchvision's MultiScaleRoIAlign also rounds to 1/s.)
        """
        return 1.0 / self.stride

    @property
    def background_index(self) -> int:
        return len(self.class_names) - 1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def images_to_tensor(self, images: Any) -> Tensor:
        """``(B, H, W, 3)`` uint8 (numpy or torch) -> ``(B, 3, H, W)`` float in ``[-0.5, 0.5]``."""
        x = torch.as_tensor(images)
        if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"images must be (B, H, W, 3) uint8, got {tuple(x.shape)} {x.dtype}")
        if tuple(x.shape[1:3]) != self.image_size:
            raise ValueError(f"images must be {self.image_size} pixels (H, W), got {tuple(x.shape[1:3])}")
        device = next(self.parameters()).device
        return x.to(device).permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5)

    def pool(self, feature_map: Tensor, boxes: list[Tensor]) -> Tensor:
        """``roi_align`` of ``boxes`` (image pixels) over ``feature_map (B, C, h, w)`` -> ``(sum n_b, C, r, r)``."""
        return roi_align(
            feature_map, boxes, output_size=self.config.roi_size, spatial_scale=self.spatial_scale,
            sampling_ratio=self.config.sampling_ratio, aligned=True,
        )

    def forward(self, images: Tensor, boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) float, got {tuple(images.shape)}")
        if len(boxes) != images.shape[0]:
            raise ValueError(f"boxes must be a list of {images.shape[0]} tensors (one per image), got {len(boxes)}")
        feats = self.box_head(self.pool(self.backbone(images), boxes))
        return feats, self.classifier(feats)

    # -- save / load (safetensors + config JSON) ----------------------------

    def save(self, directory: str | os.PathLike, history: dict[str, Any] | None = None) -> str:
        """Write ``model.safetensors`` and ``config.json`` (and ``history.json``) atomically."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"detector_config": self.config.to_dict(), "class_names": list(self.class_names),
                "image_size": list(self.image_size), "format_version": FEATURES_FORMAT_VERSION}
        _atomic_write(os.path.join(directory, "model.safetensors"), lambda p: save_file(state, p))
        _atomic_write_json(os.path.join(directory, "config.json"), meta)
        if history is not None:
            _atomic_write_json(os.path.join(directory, "history.json"), history)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "RegionDetector":
        directory = os.fspath(directory)
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            meta = json.load(f)
        model = cls(DetectorConfig.from_dict(meta["detector_config"]), meta["class_names"], tuple(meta["image_size"]))
        state = load_file(os.path.join(directory, "model.safetensors"), device=str(map_location))
        model.load_state_dict(state)
        return model.eval()


def save_detector(detector: RegionDetector, directory: str | os.PathLike,
                  history: dict[str, Any] | None = None) -> str:
    """Save ``detector`` (safetensors + config JSON) to ``directory``."""
    return detector.save(directory, history)


def load_detector(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> RegionDetector:
    """Load what :func:`save_detector` wrote, in eval mode."""
    return RegionDetector.load(directory, map_location)


def detector_class_names(world_config: Any) -> tuple[str, ...]:
    """The world's classes (colour-major, as ``shapes.class_names``) followed by ``"background"``."""
    from fusionlib.data.shapes import class_index, class_names

    names = tuple(class_names(world_config))
    for color in world_config.colors:
        for shape in world_config.shapes:
            if names[class_index(world_config, color, shape)] != f"{color} {shape}":
                raise ValueError(
                    f"shapes.class_names and class_index disagree for {color} {shape}: "
                    f"{names[class_index(world_config, color, shape)]!r}"
                )
    return names + (BACKGROUND,)


def _scene_boxes_and_labels(scene: Any, lookup: dict[str, int]) -> tuple[Tensor, Tensor]:
    boxes = torch.tensor([list(o.box) for o in scene.objects], dtype=torch.float32).reshape(-1, 4)
    try:
        labels = torch.tensor([lookup[f"{o.color} {o.shape}"] for o in scene.objects], dtype=torch.long)
    except KeyError as err:
        raise ValueError(f"scene {scene.index} has an object of class {err.args[0]!r} the detector does not know") from None
    return boxes, labels


def _stack_images(scenes: Sequence[Any]) -> Tensor:
    return torch.from_numpy(np.stack([np.asarray(s.image) for s in scenes]))


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_detector(
    world_config: Any,
    detector_config: DetectorConfig | None = None,
    scenes: Sequence[Any] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> tuple[RegionDetector, dict[str, Any]]:
    """Train a :class:`RegionDetector` on the world's training scenes (chapter 2).

    Each step takes ``batch_size`` random training images, draws fresh
    proposals for each (objects, jittered objects, background; see
    :func:`propose_regions`) and minimises cross-entropy over all regions:
    a jittered box is labelled as its object, a background box as
    ``background``. Uses AdamW with warm-up and cosine decay.

    Returns ``(detector, history)`` with the detector in eval mode on the CPU;
    ``history`` holds per-step ``loss`` and region ``accuracy``,
    ``train_seconds``, ``num_params`` and ``num_train_images``.
    """
    cfg = detector_config or DetectorConfig()
    if scenes is None:
        from fusionlib.data.shapes import generate_split

        scenes = generate_split(world_config, "train")
    if len(scenes) == 0:
        raise ValueError("scenes must hold at least one training scene, got none")
    dev = runtime.device(device) if device is not None else runtime.device()
    names = detector_class_names(world_config)
    lookup = {n: i for i, n in enumerate(names[:-1])}
    image_size = (world_config.image_size, world_config.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        detector = RegionDetector(cfg, names, image_size)
    detector.to(dev).train()
    images = _stack_images(scenes)
    targets = [_scene_boxes_and_labels(s, lookup) for s in scenes]
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _warmup_cosine(s, cfg.warmup_steps, cfg.steps))
    history: dict[str, Any] = {"loss": [], "accuracy": []}
    start = time.perf_counter()
    bar = runtime.progress(range(cfg.steps), desc="train detector", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(scenes), (cfg.batch_size,), generator=generator)
        boxes, labels = [], []
        for i in idx.tolist():
            obj_boxes, obj_labels = targets[i]
            b, owner = propose_regions(obj_boxes, image_size, cfg.num_jitter, cfg.num_background, generator,
                                       min_jitter_iou=cfg.min_jitter_iou,
                                       max_background_iou=cfg.max_background_iou)
            lab = torch.full_like(owner, detector.background_index)
            lab[owner >= 0] = obj_labels[owner[owner >= 0]]
            boxes.append(b.to(dev))
            labels.append(lab)
        target = torch.cat(labels).to(dev)
        _, logits = detector(detector.images_to_tensor(images[idx]), boxes)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        acc = (logits.argmax(1) == target).float().mean().item()
        history["loss"].append(loss.item())
        history["accuracy"].append(acc)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
    runtime.synchronize(dev)
    history["train_seconds"] = time.perf_counter() - start
    history["num_params"] = sum(p.numel() for p in detector.parameters())
    history["num_train_images"] = len(scenes)
    history["device"] = dev.type
    return detector.cpu().eval(), history


@torch.no_grad()
def classify_boxes(detector: RegionDetector, scenes: Sequence[Any], boxes: Sequence[Tensor],
                   batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Region features and class probabilities for given boxes, one ``(n_i, 4)`` tensor per scene.

    Returns ``feats (sum n_i, D)`` and ``probs (sum n_i, C)`` in the order of the boxes.
    """
    if len(boxes) != len(scenes):
        raise ValueError(f"boxes must hold one tensor per scene ({len(scenes)}), got {len(boxes)}")
    detector.eval()
    device = next(detector.parameters()).device
    feats, probs = [], []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        x = detector.images_to_tensor(_stack_images(chunk))
        f, logits = detector(x, [check_boxes(b, detector.image_size, "boxes").to(device)
                                 for b in boxes[start:start + batch_size]])
        feats.append(f.cpu())
        probs.append(logits.softmax(-1).cpu())
    return torch.cat(feats), torch.cat(probs)


@torch.no_grad()
def evaluate_detector(detector: RegionDetector, scenes: Sequence[Any], batch_size: int = 256) -> float:
    """Accuracy of the detector's argmax class (background included) on ground-truth object boxes."""
    lookup = {n: i for i, n in enumerate(detector.class_names[:-1])}
    pairs = [_scene_boxes_and_labels(s, lookup) for s in scenes]
    labels = torch.cat([lab for _, lab in pairs])
    if labels.numel() == 0:
        raise ValueError("scenes hold no objects to evaluate on")
    _, probs = classify_boxes(detector, scenes, [b for b, _ in pairs], batch_size)
    return (probs.argmax(1) == labels).float().mean().item()


# ---------------------------------------------------------------------------
# Region features (chapter 2)
# ---------------------------------------------------------------------------


@dataclass
class RegionFeatures:
    """Padded region features of ``N`` images with at most ``R`` regions each (chapter 2).

    Fields:
        feats ``(N, R, D)`` float32: box-head outputs (zeros at padding).
        boxes ``(N, R, 4)`` float32: xyxy pixels (zeros at padding).
        mask ``(N, R)`` bool: True where a region is real; real regions come first.
        soft_labels ``(N, R, C)`` float32: the detector's softmax over its classes,
            the MRC-kl target of ViLBERT/UNITER (rows of zeros at padding).
        region_object ``(N, R)`` long: index into ``scene.objects`` of the object
            the region covers, ``-1`` for background and padding. For evaluation
            and plots only; a model must never see it.
        image_feats ``(N, D)`` float32: the ``[IMG]`` feature, the mean of the real
            regions' features. ViLBERT prepends this as an ``[IMG]`` token with
            location ``[0, 0, 1, 1, 1]``: it summarises the whole image in the same
            space as the regions, so the same embedding layer takes it, and its
            output is what ITM pools on the visual side.
        indices ``(N,)`` long: the scene index of each row.
        image_size ``(H, W)``: the frame the boxes are in.
        class_names: the names of the ``C`` soft-label classes.

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

    def __post_init__(self) -> None:
        self.image_size = _as_image_size(self.image_size)
        self.class_names = tuple(self.class_names)
        if self.feats.dim() != 3:
            raise ValueError(f"feats must be (N, R, D), got {tuple(self.feats.shape)}")
        N, R, D = self.feats.shape
        expected = {
            "boxes": ((N, R, 4), torch.float32), "mask": ((N, R), torch.bool),
            "region_object": ((N, R), torch.long), "image_feats": ((N, D), torch.float32),
            "indices": ((N,), torch.long),
        }
        for name, (shape, dtype) in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name} must be {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")
        if self.soft_labels.dim() != 3 or tuple(self.soft_labels.shape[:2]) != (N, R):
            raise ValueError(f"soft_labels must be ({N}, {R}, C), got {tuple(self.soft_labels.shape)}")
        if self.class_names and len(self.class_names) != self.soft_labels.shape[2]:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.soft_labels.shape[2]} classes")
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
            self.feats[rows], self.boxes[rows], self.mask[rows], self.soft_labels[rows],
            self.region_object[rows], self.image_feats[rows], self.indices[rows], self.image_size, self.class_names)

    _TENSORS = ("feats", "boxes", "mask", "soft_labels", "region_object", "image_feats", "indices")

    def save(self, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> str:
        """Write one safetensors file (atomically); sizes and class names go in its metadata."""
        path = os.fspath(path)
        tensors = {name: getattr(self, name).contiguous() for name in self._TENSORS}
        metadata = {"image_size": json.dumps(list(self.image_size)), "class_names": json.dumps(list(self.class_names)),
                    "format_version": str(FEATURES_FORMAT_VERSION), **(extra_metadata or {})}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RegionFeatures":
        from safetensors import safe_open

        path = os.fspath(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format_version") != str(FEATURES_FORMAT_VERSION):
            raise ValueError(f"{path} has format_version {metadata.get('format_version')!r}, "
                             f"expected {FEATURES_FORMAT_VERSION}")
        tensors = load_file(path)
        missing = [n for n in cls._TENSORS if n not in tensors]
        if missing:
            raise ValueError(f"{path} lacks tensors {missing}")
        return cls(**{n: tensors[n] for n in cls._TENSORS},
                   image_size=tuple(json.loads(metadata["image_size"])),
                   class_names=tuple(json.loads(metadata["class_names"])))


def _proposal_seed(seed: int, scene_index: int) -> int:
    """A per-scene seed, so an image's proposals do not depend on which batch it is in."""
    digest = hashlib.blake2b(f"proposals:{seed}:{scene_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _pad_regions(
    per_image: Sequence[tuple[Tensor, Tensor]], feats: Tensor, probs: Tensor, indices: Tensor,
    image_size: tuple[int, int], max_regions: int | None, class_names: Sequence[str],
) -> RegionFeatures:
    """Scatter flat per-region outputs into padded ``(N, R, ...)`` tensors."""
    counts = torch.tensor([len(b) for b, _ in per_image], dtype=torch.long)
    N = len(per_image)
    R = int(counts.max().item()) if N else 0
    if max_regions is not None:
        if R > max_regions:
            raise ValueError(f"max_regions={max_regions} is smaller than an image's {R} regions")
        R = max_regions
    D, C = feats.shape[1], probs.shape[1]
    row = torch.repeat_interleave(torch.arange(N), counts)
    slot = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
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
    return RegionFeatures(out_feats, out_boxes, mask, out_probs, out_owner, image_feats, indices,
                          image_size, tuple(class_names))


@torch.no_grad()
def extract_region_features(
    detector: RegionDetector,
    scenes: Sequence[Any],
    config: DetectorConfig | None = None,
    *,
    max_regions: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> RegionFeatures:
    """Propose regions for every scene and run the detector over them (chapter 2).

    Proposals come from :func:`propose_regions` with ``config``'s counts and
    IoU limits (default: the detector's own config), seeded per scene from
    ``config.seed`` and the scene index, so the result does not depend on the
    batch size or on which other scenes are extracted alongside.
    ``max_regions`` fixes ``R`` (default: the most regions any scene has).
    """
    cfg = config or detector.config
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    detector.eval()
    device = next(detector.parameters()).device
    H, W = detector.image_size
    per_image = []
    for s in scenes:
        boxes = torch.tensor([list(o.box) for o in s.objects], dtype=torch.float32).reshape(-1, 4)
        gen = torch.Generator().manual_seed(_proposal_seed(cfg.seed, s.index))
        per_image.append(propose_regions(boxes, (H, W), cfg.num_jitter, cfg.num_background, gen,
                                         min_jitter_iou=cfg.min_jitter_iou,
                                         max_background_iou=cfg.max_background_iou))
    feats, probs = [], []
    for start in runtime.progress(range(0, len(scenes), batch_size), desc="region features", disable=not progress):
        chunk = scenes[start:start + batch_size]
        x = detector.images_to_tensor(_stack_images(chunk))
        f, logits = detector(x, [b.to(device) for b, _ in per_image[start:start + batch_size]])
        feats.append(f.cpu())
        probs.append(logits.softmax(-1).cpu())
    D = detector.config.feature_dim
    feats_t = torch.cat(feats) if feats else torch.zeros(0, D)
    probs_t = torch.cat(probs) if probs else torch.zeros(0, detector.num_classes)
    indices = torch.tensor([s.index for s in scenes], dtype=torch.long)
    return _pad_regions(per_image, feats_t, probs_t, indices, (H, W), max_regions, detector.class_names)


# ---------------------------------------------------------------------------
# Caching (chapter 2): atomic safetensors files keyed by a hash of both configs
# ---------------------------------------------------------------------------


def _atomic_write(path: str, write: Any) -> None:
    """Call ``write(tmp_path)`` on a temp file in ``path``'s directory, then ``os.replace`` it.

    A reader sees the old file or the new one, never half of one; a crash leaves
    no temp file behind (it is removed on any exception).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)          # mkstemp makes files private; a cache is shared like any output
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _atomic_write_json(path: str, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    _atomic_write(path, write)


def cache_key(world_config: Any, detector_config: DetectorConfig) -> str:
    """Hash of the world config, the detector config and the file format version."""
    blob = json.dumps({"world": world_config.key(), "detector": detector_config.key(),
                       "format_version": FEATURES_FORMAT_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def features_dir() -> str:
    """``runtime.cache_dir()/features``: where detectors and region features are cached."""
    return os.path.join(runtime.cache_dir(), "features")


def detector_cache_path(world_config: Any, detector_config: DetectorConfig) -> str:
    return os.path.join(features_dir(), f"detector-{cache_key(world_config, detector_config)}")


def features_cache_path(world_config: Any, detector_config: DetectorConfig, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return os.path.join(features_dir(), f"regions-{split}-{cache_key(world_config, detector_config)}.safetensors")


# What a damaged cache file can raise while being read back.
_CACHE_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, json.JSONDecodeError)


def load_or_train_detector(
    world_config: Any,
    detector_config: DetectorConfig | None = None,
    train_scenes: Sequence[Any] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> tuple[RegionDetector, dict[str, Any]]:
    """The cached detector for these configs, trained (and cached) first if missing or unreadable.

    Returns ``(detector, history)``; the history is the one saved when it was trained.
    """
    cfg = detector_config or DetectorConfig()
    directory = detector_cache_path(world_config, cfg)
    if os.path.exists(directory):
        try:
            detector = RegionDetector.load(directory)
            with open(os.path.join(directory, "history.json"), encoding="utf-8") as f:
                history = json.load(f)
            if detector.config != cfg:
                raise ValueError(f"cached detector config {detector.config} differs from {cfg}")
            return detector, history
        except _CACHE_ERRORS as err:
            warnings.warn(f"cached detector in {directory} is unreadable ({type(err).__name__}: {err}); retraining it",
                          stacklevel=2)
    detector, history = train_detector(world_config, cfg, train_scenes, progress=progress, device=device)
    detector.save(directory, history)
    return detector, history


def load_or_build_features(
    world_config: Any,
    detector_config: DetectorConfig | None = None,
    split: str = "train",
    scenes: Sequence[Any] | None = None,
    train_scenes: Sequence[Any] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> RegionFeatures:
    """Region features of a split, read from the cache or built (training the detector if needed).

    Files live in ``runtime.cache_dir()/features/`` under :func:`cache_key`, so any
    change to either config (or to the format) builds new ones. A file that
    cannot be read is rebuilt with a warning. ``scenes`` (the whole split) and
    ``train_scenes`` may be passed to avoid generating them again. ``R`` is
    ``num_objects + num_jitter + num_background`` for every split.
    """
    cfg = detector_config or DetectorConfig()
    path = features_cache_path(world_config, cfg, split)
    expected_n = getattr(world_config, f"num_{split}")
    if scenes is not None:
        # The cache holds whole splits; features of a subset come from extract_region_features.
        if len(scenes) != expected_n or any(s.split != split for s in scenes):
            raise ValueError(f"scenes must be the whole {split!r} split ({expected_n} scenes of that split), "
                             f"got {len(scenes)}; use extract_region_features for a subset")
    detector = None
    if os.path.exists(path):
        try:
            # Features are only valid with the detector that made them: two runs that
            # started on an empty cache at once may each have trained (and cached) one.
            detector, _ = load_or_train_detector(world_config, cfg, train_scenes, progress=progress, device=device)
            made_by = _file_metadata(path).get("detector_fingerprint")
            if made_by != detector_fingerprint(detector):
                raise ValueError("they were extracted by another detector than the cached one")
            features = RegionFeatures.load(path)
            if len(features) != expected_n:
                raise ValueError(f"holds {len(features)} images, expected {expected_n}")
            if scenes is not None and features.indices.tolist() != [s.index for s in scenes]:
                raise ValueError("its scene indices differ from the scenes given")
            return features
        except _CACHE_ERRORS as err:
            warnings.warn(f"cached region features {path} are unreadable ({type(err).__name__}: {err}); "
                          "rebuilding them", stacklevel=2)
    if split == "train" and train_scenes is None and scenes is not None:
        train_scenes = scenes
    if detector is None:
        detector, _ = load_or_train_detector(world_config, cfg, train_scenes, progress=progress, device=device)
    if scenes is None:
        from fusionlib.data.shapes import generate_split

        scenes = generate_split(world_config, split)
    if device is not None:
        detector.to(runtime.device(device))
    max_regions = world_config.num_objects + (cfg.num_jitter if world_config.num_objects > 0 else 0) + cfg.num_background
    features = extract_region_features(detector, scenes, cfg, max_regions=max_regions, progress=progress)
    features.save(path, {"cache_key": cache_key(world_config, cfg), "split": split,
                         "detector_fingerprint": detector_fingerprint(detector)})
    return features


def detector_fingerprint(detector: nn.Module) -> str:
    """A hash of the detector's weights: which detector produced a features file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(detector.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _file_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


# ---------------------------------------------------------------------------
# Real images (chapter 2, "from this world to real corpora"): opt-in, never downloads
# ---------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET18_FILE = "resnet18-f37072fd.pth"
RESNET18_URL = "https://download.pytorch.org/models/" + RESNET18_FILE
FASTER_RCNN_FILE = "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
FASTER_RCNN_URL = "https://download.pytorch.org/models/" + FASTER_RCNN_FILE


def grid_boxes(image_size: Any, grid: tuple[int, int] = (4, 4)) -> Tensor:
    """``rows x cols`` boxes tiling an ``(H, W)`` image, row-major: ``(rows * cols, 4)`` xyxy pixels.

    Grid regions are what "grid features" models (Pixel-BERT, and ViLT's
    patches in the limit) use instead of a detector's boxes.
    """
    H, W = _as_image_size(image_size)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and g > 0 for g in grid)):
        raise ValueError(f"grid must be a pair of positive ints (rows, cols), got {grid!r}")
    rows, cols = grid
    ys = torch.linspace(0, H, rows + 1)
    xs = torch.linspace(0, W, cols + 1)
    y1, x1 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y2, x2 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x1, y1, x2, y2], dim=-1).reshape(-1, 4)


def _load_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def resnet18_backbone(weights_path: str | os.PathLike | None = None, seed: int = 0) -> nn.Module:
    """A torchvision ResNet-18 for grid features, in eval mode.

    ``weights_path=None`` gives random weights (seeded): the pipeline runs, but
    the features mean nothing. For ImageNet features, download
    ``{RESNET18_URL}`` yourself and pass its path (a ``.pth`` state dict or a
    ``.safetensors`` file). Nothing is ever downloaded here.
    """
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.resnet18(weights=None)
    if weights_path is not None:
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights_path {path!r} does not exist; download {RESNET18_URL} and pass its path")
        model.load_state_dict(_load_state_dict(path))
    return model.eval()


def _pil_batch(images: Sequence[Any], size: tuple[int, int]) -> Tensor:
    """PIL images or ``(H, W, 3)`` uint8 arrays -> ``(B, 3, H, W)`` ImageNet-normalised, resized to ``size``."""
    from PIL import Image

    out = []
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"images[{i}] must be a PIL image or (H, W, 3) uint8 array, got {img.shape} {img.dtype}")
            img = Image.fromarray(img)
        if not isinstance(img, Image.Image):
            raise TypeError(f"images[{i}] must be a PIL image or a numpy array, got {type(img).__name__}")
        img = img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()))
    x = torch.stack(out).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def _imagenet_names(num: int) -> tuple[str, ...]:
    if num == 1000:
        from torchvision.models import ResNet18_Weights

        return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    return tuple(f"class_{i}" for i in range(num))


@torch.no_grad()
def extract_grid_features(
    images: Sequence[Any],
    backbone: nn.Module,
    grid: tuple[int, int] = (4, 4),
    image_size: int = 224,
    batch_size: int = 16,
) -> RegionFeatures:
    """Grid-region features of real images with a torchvision ResNet (chapter 2).

    Every image is resized to ``image_size x image_size`` (boxes are in that
    frame; :func:`loc5`/:func:`loc7` are normalised, so they equal those of the
    original image), run through the ResNet trunk (stride 32), and each of the
    ``grid`` cells is ``roi_align``-ed (2 x 2, mean-pooled) to a ``512``-d
    feature. ``soft_labels`` are the ResNet's ImageNet classifier applied to
    each region's feature, the grid analogue of the detector's class
    distribution. ``backbone``: e.g. :func:`resnet18_backbone`.
    """
    if len(images) == 0:
        raise ValueError("images must hold at least one image, got none")
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc"):
        if not hasattr(backbone, name):
            raise TypeError(f"backbone must be a torchvision ResNet (missing .{name}), got {type(backbone).__name__}")
    backbone.eval()
    trunk = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool,
                          backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
    device = next(backbone.parameters()).device
    size = _as_image_size(image_size)
    cells = grid_boxes(size, grid)
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = _pil_batch(images[start:start + batch_size], size).to(device)
        fmap = trunk(x)
        pooled = roi_align(fmap, [cells.to(device)] * x.shape[0], output_size=2,
                           spatial_scale=fmap.shape[-1] / size[1], sampling_ratio=2, aligned=True)
        f = pooled.mean(dim=(2, 3))
        feats.append(f.cpu())
        probs.append(backbone.fc(f).softmax(-1).cpu())
    feats_t, probs_t = torch.cat(feats), torch.cat(probs)
    per_image = [(cells, torch.full((len(cells),), -1, dtype=torch.long)) for _ in images]
    return _pad_regions(per_image, feats_t, probs_t, torch.arange(len(images)), size, None,
                        _imagenet_names(probs_t.shape[1]))


def faster_rcnn_weights_path(weights_path: str | os.PathLike | None = None) -> str:
    """The local Faster R-CNN weights file: ``weights_path``, else the torch hub cache.

    Raises ``FileNotFoundError`` saying what to download and where to put it.
    """
    if weights_path is not None:
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"weights_path {path!r} does not exist. Download {FASTER_RCNN_URL} and pass its path.")
        return path
    path = os.path.join(torch.hub.get_dir(), "checkpoints", FASTER_RCNN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Faster R-CNN weights not found at {path}. fusionlib never downloads: fetch {FASTER_RCNN_URL} "
            f"and save it as {path} (or pass weights_path=...). Grid features "
            f"(extract_grid_features) need no download."
        )
    return path


class FasterRCNNRegions:
    """Region features from torchvision's COCO Faster R-CNN (ResNet-50-FPN), bottom-up-attention style.

    Only with weights on disk (see :func:`faster_rcnn_weights_path`). For each
    image: RPN proposals, box-head features (1024-d) and class probabilities
    (91 COCO classes incl. background) for every proposal; NMS on the best
    non-background score; then the proposals scoring at least
    ``score_threshold``, at least ``min_regions`` and at most ``max_regions``
    (bottom-up attention keeps 10-36). As in bottom-up attention, the boxes are
    the proposals themselves, not the class-regressed boxes. Boxes are rescaled
    to a common ``frame x frame`` so one :class:`RegionFeatures` holds images
    of different sizes (normalised locations are unchanged by this).
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, *, min_regions: int = 10,
                 max_regions: int = 36, score_threshold: float = 0.2, nms_iou: float = 0.3,
                 frame: int = 224, device: str | torch.device | None = None, **model_kwargs: Any):
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        if not 0 < min_regions <= max_regions:
            raise ValueError(f"need 0 < min_regions <= max_regions, got {min_regions}, {max_regions}")
        path = faster_rcnn_weights_path(weights_path)
        self.model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, **model_kwargs)
        self.model.load_state_dict(_load_state_dict(path))
        self.device = runtime.device(device) if device is not None else torch.device("cpu")
        self.model.to(self.device).eval()
        self.min_regions, self.max_regions = min_regions, max_regions
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        self.frame = _as_image_size(frame)

    @torch.no_grad()
    def __call__(self, images: Sequence[Any]) -> RegionFeatures:
        from PIL import Image
        from torchvision.models.detection.transform import resize_boxes
        from torchvision.ops import nms

        model = self.model
        tensors, sizes = [], []
        for i, img in enumerate(images):
            if isinstance(img, np.ndarray):
                img = Image.fromarray(img)
            if not isinstance(img, Image.Image):
                raise TypeError(f"images[{i}] must be a PIL image or a numpy array, got {type(img).__name__}")
            arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
            tensors.append(arr.permute(2, 0, 1).float().div(255.0).to(self.device))
            sizes.append(tuple(arr.shape[:2]))
        image_list, _ = model.transform(tensors)
        fmaps = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, fmaps)
        pooled = model.roi_heads.box_roi_pool(fmaps, proposals, image_list.image_sizes)
        box_feats = model.roi_heads.box_head(pooled)
        class_logits, _ = model.roi_heads.box_predictor(box_feats)
        probs = class_logits.softmax(-1)
        per_image, feats, soft = [], [], []
        offset = 0
        for props, resized, original in zip(proposals, image_list.image_sizes, sizes):
            n = len(props)
            p, f = probs[offset:offset + n], box_feats[offset:offset + n]
            offset += n
            score = p[:, 1:].max(dim=1).values
            keep = nms(props, score, self.nms_iou)               # sorted by score, descending
            chosen = keep[score[keep] >= self.score_threshold][: self.max_regions]
            if len(chosen) < self.min_regions:
                chosen = keep[: self.min_regions]
            boxes = resize_boxes(props[chosen], resized, original)
            scale = torch.tensor([self.frame[1] / original[1], self.frame[0] / original[0]] * 2, device=boxes.device)
            boxes = _clip(boxes * scale, *self.frame)
            per_image.append((boxes.cpu(), torch.full((len(chosen),), -1, dtype=torch.long)))
            feats.append(f[chosen].cpu())
            soft.append(p[chosen].cpu())
        from torchvision.models import detection

        names = detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
        return _pad_regions(per_image, torch.cat(feats), torch.cat(soft), torch.arange(len(images)),
                            self.frame, self.max_regions, tuple(names))
