"""Region features of real images, never downloading (chapter 2, "From this world to real images and real detectors").

The same :class:`~fusionlib.vision.regions.RegionFeatures` the synthetic
world gives, from photographs: grid regions over a torchvision ResNet-18
(:func:`grid_boxes`, :func:`extract_grid_features`; what Pixel-BERT-style
"grid feature" models use) or, with its weights on disk, torchvision's COCO
Faster R-CNN picking regions the bottom-up-attention way
(:class:`FasterRCNNRegions`). Nothing here fetches weights: without a local
file a ResNet is random (the pipeline runs, the features mean nothing) and
Faster R-CNN raises an error that says what to download and where to put it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image, roi_align

from fusionlib import runtime

from .boxes import as_image_size
from .regions import RegionFeatures, pad_regions

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESNET18_FILE",
    "RESNET18_URL",
    "FASTER_RCNN_FILE",
    "FASTER_RCNN_URL",
    "grid_boxes",
    "resnet18_backbone",
    "extract_grid_features",
    "faster_rcnn_weights_path",
    "FasterRCNNRegions",
]

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
    H, W = as_image_size(image_size)
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and g > 0 for g in grid)
    ):
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
            raise FileNotFoundError(
                f"weights_path {path!r} does not exist; download {RESNET18_URL} and pass its path"
            )
        model.load_state_dict(_load_state_dict(path))
    return model.eval()


def _pil_batch(images: Sequence[Any], size: tuple[int, int]) -> Tensor:
    """PIL images or ``(H, W, 3)`` uint8 arrays -> ``(B, 3, H, W)`` ImageNet-normalised, resized to ``size``."""
    from PIL import Image

    out = []
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(
                    f"images[{i}] must be a PIL image or (H, W, 3) uint8 array, "
                    f"got {img.shape} {img.dtype}"
                )
            img = Image.fromarray(img)
        if not isinstance(img, Image.Image):
            raise TypeError(
                f"images[{i}] must be a PIL image or a numpy array, got {type(img).__name__}"
            )
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
    frame; ``loc5``/``loc7`` are normalised, so they equal those of the
    original image), run through the ResNet trunk (stride 32), and each of the
    ``grid`` cells is ``roi_align``-ed (2 x 2, mean-pooled) to a ``512``-d
    feature. ``soft_labels`` are the ResNet's ImageNet classifier applied to
    each region's feature, the grid analogue of the detector's class
    distribution. ``backbone``: e.g. :func:`resnet18_backbone`. Returns
    ``N = len(images)`` rows of ``R = rows * cols`` regions, ``D = 512``.
    """
    if len(images) == 0:
        raise ValueError("images must hold at least one image, got none")
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc"):
        if not hasattr(backbone, name):
            raise TypeError(
                f"backbone must be a torchvision ResNet (missing .{name}), got {type(backbone).__name__}"
            )
    backbone.eval()
    trunk = nn.Sequential(
        backbone.conv1,
        backbone.bn1,
        backbone.relu,
        backbone.maxpool,
        backbone.layer1,
        backbone.layer2,
        backbone.layer3,
        backbone.layer4,
    )
    device = next(backbone.parameters()).device
    size = as_image_size(image_size)
    cells = grid_boxes(size, grid)
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = _pil_batch(images[start : start + batch_size], size).to(device)
        fmap = trunk(x)
        pooled = roi_align(
            fmap,
            [cells.to(device)] * x.shape[0],
            output_size=2,
            spatial_scale=fmap.shape[-1] / size[1],
            sampling_ratio=2,
            aligned=True,
        )
        f = pooled.mean(dim=(2, 3))
        feats.append(f.cpu())
        probs.append(backbone.fc(f).softmax(-1).cpu())
    feats_t, probs_t = torch.cat(feats), torch.cat(probs)
    per_image = [(cells, torch.full((len(cells),), -1, dtype=torch.long)) for _ in images]
    return pad_regions(
        per_image,
        feats_t,
        probs_t,
        torch.arange(len(images)),
        size,
        None,
        _imagenet_names(probs_t.shape[1]),
    )


def faster_rcnn_weights_path(weights_path: str | os.PathLike | None = None) -> str:
    """The local Faster R-CNN weights file: ``weights_path``, else the torch hub cache.

    Raises ``FileNotFoundError`` saying what to download and where to put it.
    """
    if weights_path is not None:
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"weights_path {path!r} does not exist. Download {FASTER_RCNN_URL} and pass its path."
            )
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

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        *,
        min_regions: int = 10,
        max_regions: int = 36,
        score_threshold: float = 0.2,
        nms_iou: float = 0.3,
        frame: int = 224,
        device: str | torch.device | None = None,
        **model_kwargs: Any,
    ):
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        if not 0 < min_regions <= max_regions:
            raise ValueError(
                f"need 0 < min_regions <= max_regions, got {min_regions}, {max_regions}"
            )
        path = faster_rcnn_weights_path(weights_path)
        self.model = fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=91, **model_kwargs
        )
        self.model.load_state_dict(_load_state_dict(path))
        self.device = runtime.device(device) if device is not None else torch.device("cpu")
        self.model.to(self.device).eval()
        self.min_regions, self.max_regions = min_regions, max_regions
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        self.frame = as_image_size(frame)

    @torch.no_grad()
    def __call__(self, images: Sequence[Any]) -> RegionFeatures:
        """``N`` PIL images or ``(H, W, 3)`` uint8 arrays -> ``N`` rows of ``R = max_regions`` regions, ``D = 1024``."""
        from PIL import Image
        from torchvision.models import detection
        from torchvision.models.detection.transform import resize_boxes
        from torchvision.ops import nms

        model = self.model
        tensors, sizes = [], []
        for i, img in enumerate(images):
            if isinstance(img, np.ndarray):
                img = Image.fromarray(img)
            if not isinstance(img, Image.Image):
                raise TypeError(
                    f"images[{i}] must be a PIL image or a numpy array, got {type(img).__name__}"
                )
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
            p, f = probs[offset : offset + n], box_feats[offset : offset + n]
            offset += n
            score = p[:, 1:].max(dim=1).values
            keep = nms(props, score, self.nms_iou)  # sorted by score, descending
            chosen = keep[score[keep] >= self.score_threshold][: self.max_regions]
            if len(chosen) < self.min_regions:
                chosen = keep[: self.min_regions]
            boxes = resize_boxes(props[chosen], resized, original)
            scale = torch.tensor(
                [self.frame[1] / original[1], self.frame[0] / original[0]] * 2, device=boxes.device
            )
            boxes = clip_boxes_to_image(boxes * scale, self.frame)
            per_image.append((boxes.cpu(), torch.full((len(chosen),), -1, dtype=torch.long)))
            feats.append(f[chosen].cpu())
            soft.append(p[chosen].cpu())
        names = detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
        return pad_regions(
            per_image,
            torch.cat(feats),
            torch.cat(soft),
            torch.arange(len(images)),
            self.frame,
            self.max_regions,
            tuple(names),
        )
