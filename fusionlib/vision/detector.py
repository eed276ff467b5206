"""The region detector: a small Faster R-CNN box head over a CNN (chapter 2, "Training the detector").

Bottom-up attention (Anderson et al., 2018) takes region features from a
Faster R-CNN trained on Visual Genome: RoI-pooled CNN features of each box,
passed through the box head, whose output is saved as the region's feature,
and a classifier over 1600 classes plus background. :class:`RegionDetector`
is the same machine at the scale of the synthetic world: a 3-layer CNN,
``torchvision.ops.roi_align`` over the boxes, a two-layer MLP box head and a
linear classifier over the world's colour x shape classes plus
``"background"``. :class:`DetectorConfig` holds everything that decides it
(and is hashed into the feature cache's key); a detector saves itself as
``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchvision.ops import roi_align

from fusionlib.data import shapes
from fusionlib.fileio import atomic_write, atomic_write_json

from .boxes import as_image_size
from .regions import FEATURES_FORMAT_VERSION

__all__ = [
    "BACKGROUND",
    "DetectorConfig",
    "RegionDetector",
    "save_detector",
    "load_detector",
    "detector_class_names",
    "detector_fingerprint",
]

BACKGROUND = "background"


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that decides the detector and its region features (hashed into the cache key).

    The defaults reach 100% colour x shape accuracy on the default world's test
    split; training took ~17 s on 2 quiet CPU cores (loss ~0 after ~60 steps;
    ``python -m fusionlib.bench features`` measures it on your machine).
    """

    channels: tuple[int, ...] = (32, 64, 64)  # conv widths of the backbone
    strides: tuple[int, ...] = (2, 2, 1)  # 75 px -> 38 -> 19 -> 19 feature map
    feature_dim: int = 64  # region feature size D
    roi_size: int = 4  # roi_align output is roi_size x roi_size
    sampling_ratio: int = 2  # bilinear samples per RoI bin side
    steps: int = 150  # training steps (100% by ~60 on the default world)
    batch_size: int = 32  # images per step (x ~10 regions each)
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    seed: int = 0  # initialisation, training order and proposals
    num_jitter: int = 2  # jittered object proposals per image
    num_background: int = 2  # background proposals per image
    min_jitter_iou: float = 0.5
    max_background_iou: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "strides", tuple(self.strides))
        if not self.channels or any(not isinstance(c, int) or c <= 0 for c in self.channels):
            raise ValueError(f"channels must be positive ints, got {self.channels}")
        if len(self.strides) != len(self.channels) or any(s not in (1, 2) for s in self.strides):
            raise ValueError(
                f"strides must be 1 or 2, one per conv layer ({len(self.channels)}), got {self.strides}"
            )
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
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

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
        if (
            len(class_names) < 2
            or class_names[-1] != BACKGROUND
            or len(set(class_names)) != len(class_names)
        ):
            raise ValueError(
                f"class_names must be distinct and end with {BACKGROUND!r}, got {class_names}"
            )
        self.config = config
        self.class_names = class_names
        self.image_size = as_image_size(image_size)
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch, stride in zip(config.channels, config.strides):
            # BatchNorm folds into a per-channel affine at eval time: free at extraction.
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        self.backbone = nn.Sequential(*layers)
        # Like Faster R-CNN's TwoMLPHead: the output of the second layer (after ReLU)
        # is the region feature that bottom-up attention saves.
        self.box_head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_ch * config.roi_size**2, config.feature_dim),
            nn.ReLU(inplace=True),
            nn.Linear(config.feature_dim, config.feature_dim),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(config.feature_dim, len(class_names))

    @property
    def stride(self) -> int:
        return math.prod(self.config.strides)

    @property
    def spatial_scale(self) -> float:
        """Feature-map cells per image pixel, ``1 / stride`` (1/4 by default).

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
            raise ValueError(
                f"images must be {self.image_size} pixels (H, W), got {tuple(x.shape[1:3])}"
            )
        device = next(self.parameters()).device
        return x.to(device).permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5)

    def pool(self, feature_map: Tensor, boxes: list[Tensor]) -> Tensor:
        """``roi_align`` of ``boxes`` (image pixels) over ``feature_map (B, C, h, w)`` -> ``(sum n_b, C, r, r)``."""
        return roi_align(
            feature_map,
            boxes,
            output_size=self.config.roi_size,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.config.sampling_ratio,
            aligned=True,
        )

    def forward(self, images: Tensor, boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) float, got {tuple(images.shape)}")
        if len(boxes) != images.shape[0]:
            raise ValueError(
                f"boxes must be a list of {images.shape[0]} tensors (one per image), got {len(boxes)}"
            )
        feats = self.box_head(self.pool(self.backbone(images), boxes))
        return feats, self.classifier(feats)

    def save(self, directory: str | os.PathLike, history: dict[str, Any] | None = None) -> str:
        """Write ``model.safetensors`` and ``config.json`` (and ``history.json``) atomically into ``directory``."""
        directory = os.fspath(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {
            "detector_config": self.config.to_dict(),
            "class_names": list(self.class_names),
            "image_size": list(self.image_size),
            "format_version": FEATURES_FORMAT_VERSION,
        }
        atomic_write(os.path.join(directory, "model.safetensors"), lambda p: save_file(state, p))
        atomic_write_json(os.path.join(directory, "config.json"), meta)
        if history is not None:
            atomic_write_json(os.path.join(directory, "history.json"), history)
        return directory

    @classmethod
    def load(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> "RegionDetector":
        """What :meth:`save` wrote, in eval mode on ``map_location``."""
        directory = os.fspath(directory)
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            meta = json.load(f)
        model = cls(
            DetectorConfig.from_dict(meta["detector_config"]),
            meta["class_names"],
            tuple(meta["image_size"]),
        )
        state = load_file(os.path.join(directory, "model.safetensors"), device=str(map_location))
        model.load_state_dict(state)
        return model.eval()


def save_detector(
    detector: RegionDetector, directory: str | os.PathLike, history: dict[str, Any] | None = None
) -> str:
    """Save ``detector`` (safetensors + config JSON) to ``directory``."""
    return detector.save(directory, history)


def load_detector(
    directory: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> RegionDetector:
    """Load what :func:`save_detector` wrote, in eval mode."""
    return RegionDetector.load(directory, map_location)


def detector_class_names(world_config: Any) -> tuple[str, ...]:
    """The world's classes (colour-major, as ``shapes.class_names``) followed by ``"background"``."""
    names = tuple(shapes.class_names(world_config))
    # The detector's labels are looked up by name, the world's by class_index: the two must agree.
    for color in world_config.colors:
        for shape in world_config.shapes:
            if names[shapes.class_index(world_config, color, shape)] != f"{color} {shape}":
                raise ValueError(
                    f"shapes.class_names and class_index disagree for {color} {shape}: "
                    f"{names[shapes.class_index(world_config, color, shape)]!r}"
                )
    return names + (BACKGROUND,)


def detector_fingerprint(detector: nn.Module) -> str:
    """A hash of the detector's weights: which detector produced a features file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(detector.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
