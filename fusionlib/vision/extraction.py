"""Region features of the world's scenes, extracted by the detector (chapter 2, "Region features, and the cache").

:func:`extract_region_features` proposes regions for every scene, runs the
detector's backbone, ``roi_align`` and box head over them, and packs the box
head's outputs and the classifier's softmax (the soft labels, MRC-kl's target
in chapters 4-6) into a :class:`~fusionlib.vision.regions.RegionFeatures`.
A scene's proposals are seeded by the scene's index, so its features are the
same whatever batch or subset it is extracted with.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from fusionlib import runtime

from .detector import DetectorConfig, RegionDetector
from .proposals import propose_regions
from .regions import RegionFeatures, pad_regions
from .scenes import object_boxes, stack_images

__all__ = ["extract_region_features"]


def _proposal_seed(seed: int, scene_index: int) -> int:
    """A per-scene seed, so an image's proposals do not depend on which batch it is in."""
    digest = hashlib.blake2b(f"proposals:{seed}:{scene_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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

    Proposals come from :func:`~fusionlib.vision.proposals.propose_regions` with
    ``config``'s counts and IoU limits (default: the detector's own config),
    seeded per scene from ``config.seed`` and the scene index, so the result
    does not depend on the batch size or on which other scenes are extracted
    alongside. ``max_regions`` fixes ``R`` (default: the most regions any scene
    has). Returns ``N = len(scenes)`` rows of ``R`` regions with ``D =
    detector.config.feature_dim`` features and ``C = detector.num_classes``
    soft-label classes.
    """
    cfg = config or detector.config
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    detector.eval()
    device = next(detector.parameters()).device
    H, W = detector.image_size
    per_image = []
    for s in scenes:
        gen = torch.Generator().manual_seed(_proposal_seed(cfg.seed, s.index))
        per_image.append(
            propose_regions(
                object_boxes(s),
                (H, W),
                cfg.num_jitter,
                cfg.num_background,
                gen,
                min_jitter_iou=cfg.min_jitter_iou,
                max_background_iou=cfg.max_background_iou,
            )
        )
    feats, probs = [], []
    for start in runtime.progress(
        range(0, len(scenes), batch_size), desc="region features", disable=not progress
    ):
        chunk = scenes[start : start + batch_size]
        x = detector.images_to_tensor(stack_images(chunk))
        f, logits = detector(x, [b.to(device) for b, _ in per_image[start : start + batch_size]])
        feats.append(f.cpu())
        probs.append(logits.softmax(-1).cpu())
    D = detector.config.feature_dim
    feats_t = torch.cat(feats) if feats else torch.zeros(0, D)  # (sum n_i, D)
    probs_t = torch.cat(probs) if probs else torch.zeros(0, detector.num_classes)  # (sum n_i, C)
    indices = torch.tensor([s.index for s in scenes], dtype=torch.long)
    return pad_regions(
        per_image, feats_t, probs_t, indices, (H, W), max_regions, detector.class_names
    )
