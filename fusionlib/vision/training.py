"""Training the region detector on the world's scenes, and measuring it (chapter 2, "Training the detector").

Each step of :func:`train_detector` takes ``batch_size`` random training
images, draws fresh proposals for each (:mod:`fusionlib.vision.proposals`)
and minimises cross-entropy over all their regions: a jittered box is
labelled as its object, a background box as ``"background"``, as Faster
R-CNN's box head is trained. :func:`evaluate_detector` scores the trained
detector on ground-truth object boxes.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fusionlib import runtime
from fusionlib.data.shapes import generate_split

from .boxes import check_boxes
from .detector import DetectorConfig, RegionDetector, detector_class_names
from .proposals import propose_regions
from .scenes import object_boxes, object_labels, stack_images

__all__ = ["train_detector", "classify_boxes", "evaluate_detector"]


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

    ``scenes`` defaults to the world's whole ``"train"`` split. Uses AdamW with
    linear warm-up and cosine decay; initialisation, image sampling and
    proposals all come from ``detector_config.seed``, and the global random
    state is left as it was.

    Returns ``(detector, history)`` with the detector in eval mode on the CPU;
    ``history`` holds per-step ``loss`` and region ``accuracy``,
    ``train_seconds``, ``num_params``, ``num_train_images`` and ``device``.
    """
    cfg = detector_config or DetectorConfig()
    if scenes is None:
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
    images = stack_images(scenes)  # (N, H, W, 3) uint8
    targets = [(object_boxes(s), object_labels(s, lookup)) for s in scenes]
    generator = torch.Generator().manual_seed(cfg.seed)
    # Not fusionlib.train.train: its optimizer leaves biases and BatchNorm undecayed, which trains a different
    # detector and so different region features, and every chapter's numbers come from this one's. It would
    # also reseed the global random state, which this loop leaves alone.
    optimizer = torch.optim.AdamW(detector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _warmup_cosine(s, cfg.warmup_steps, cfg.steps)
    )
    history: dict[str, Any] = {"loss": [], "accuracy": []}
    start = time.perf_counter()
    bar = runtime.progress(range(cfg.steps), desc="train detector", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(scenes), (cfg.batch_size,), generator=generator)
        boxes, labels = [], []
        for i in idx.tolist():
            obj_boxes, obj_labels = targets[i]
            b, owner = propose_regions(
                obj_boxes,
                image_size,
                cfg.num_jitter,
                cfg.num_background,
                generator,
                min_jitter_iou=cfg.min_jitter_iou,
                max_background_iou=cfg.max_background_iou,
            )
            lab = torch.full_like(owner, detector.background_index)
            lab[owner >= 0] = obj_labels[owner[owner >= 0]]
            boxes.append(b.to(dev))
            labels.append(lab)
        target = torch.cat(labels).to(dev)  # (sum n_b,)
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
def classify_boxes(
    detector: RegionDetector, scenes: Sequence[Any], boxes: Sequence[Tensor], batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Region features and class probabilities for given boxes, one ``(n_i, 4)`` tensor per scene.

    Returns ``feats (sum n_i, D)`` and ``probs (sum n_i, C)`` in the order of the boxes.
    """
    if len(boxes) != len(scenes):
        raise ValueError(f"boxes must hold one tensor per scene ({len(scenes)}), got {len(boxes)}")
    detector.eval()
    device = next(detector.parameters()).device
    feats, probs = [], []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        x = detector.images_to_tensor(stack_images(chunk))
        f, logits = detector(
            x,
            [
                check_boxes(b, detector.image_size, "boxes").to(device)
                for b in boxes[start : start + batch_size]
            ],
        )
        feats.append(f.cpu())
        probs.append(logits.softmax(-1).cpu())
    return torch.cat(feats), torch.cat(probs)


@torch.no_grad()
def evaluate_detector(
    detector: RegionDetector, scenes: Sequence[Any], batch_size: int = 256
) -> float:
    """Accuracy of the detector's argmax class (background included) on ground-truth object boxes."""
    lookup = {n: i for i, n in enumerate(detector.class_names[:-1])}
    labels = torch.cat([object_labels(s, lookup) for s in scenes])
    if labels.numel() == 0:
        raise ValueError("scenes hold no objects to evaluate on")
    _, probs = classify_boxes(detector, scenes, [object_boxes(s) for s in scenes], batch_size)
    return (probs.argmax(1) == labels).float().mean().item()
