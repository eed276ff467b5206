"""The on-disk cache of detectors and region features (chapter 2, "Region features, and the cache").

Every chapter reads the same region features, so they are built once: the
detector goes to ``<cache>/features/detector-<key>/`` and each split's
features to ``<cache>/features/regions-<split>-<key>.safetensors``, where
``<cache>`` is :func:`fusionlib.runtime.cache_dir` (``$FUSIONLIB_CACHE``, by
default ``.cache/`` in the repository) and ``<key>`` (:func:`cache_key`)
hashes the world config, the detector config and the file format, so any
change to either builds new files. Files are written atomically; one that
cannot be read, or features made by another detector than the cached one,
are rebuilt with a warning.

The detector of the book's default world is *committed*, under
``checkpoints/world/detector-<key>/`` (:func:`committed_detector_path`),
and loaded from there before the cache is looked at. Training it is not
reproducible across machines: 150 steps of AdamW amplify the last bits by
which one CPU's matrix products differ from another's (or 1 thread's from 2),
and every model of the book was trained on the features of one detector. With
the weights committed, only the forward pass runs on the reader's machine,
whose differences stay at float32 rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open

from fusionlib import runtime
from fusionlib.data.shapes import SPLITS, generate_split
from fusionlib.fileio import atomic_write_json, sha256_file

from .detector import DetectorConfig, RegionDetector, detector_fingerprint
from .extraction import extract_region_features
from .regions import FEATURES_FORMAT_VERSION, RegionFeatures
from .training import train_detector

__all__ = [
    "SPLITS",
    "cache_key",
    "commit_detector",
    "committed_detector_path",
    "features_dir",
    "detector_cache_path",
    "features_cache_path",
    "load_or_train_detector",
    "load_or_build_features",
]

# What a damaged cache file can raise while being read back.
_CACHE_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    SafetensorError,
    json.JSONDecodeError,
)


def cache_key(world_config: Any, detector_config: DetectorConfig) -> str:
    """Hash of the world config, the detector config and the file format version."""
    blob = json.dumps(
        {
            "world": world_config.key(),
            "detector": detector_config.key(),
            "format_version": FEATURES_FORMAT_VERSION,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def features_dir() -> str:
    """``runtime.cache_dir()/features``: where detectors and region features are cached."""
    return os.path.join(runtime.cache_dir(), "features")


def detector_cache_path(world_config: Any, detector_config: DetectorConfig) -> str:
    """The folder the detector for these configs is cached in."""
    return os.path.join(features_dir(), f"detector-{cache_key(world_config, detector_config)}")


def features_cache_path(world_config: Any, detector_config: DetectorConfig, split: str) -> str:
    """The safetensors file the region features of ``split`` are cached in."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return os.path.join(
        features_dir(), f"regions-{split}-{cache_key(world_config, detector_config)}.safetensors"
    )


def committed_detector_path(
    world_config: Any, detector_config: DetectorConfig, root: str | os.PathLike | None = None
) -> str:
    """``<root>/world/detector-<key>``: where the repository keeps the detector for these configs.

    ``root`` defaults to ``checkpoints/`` (:func:`fusionlib.runtime.checkpoint_root`).
    """
    root = runtime.checkpoint_root() if root is None else os.fspath(root)
    return os.path.join(root, "world", f"detector-{cache_key(world_config, detector_config)}")


# Next to the weights: what they must hash to, so a damaged file is never used in silence.
_RECORD = "record.json"


def _load_committed_detector(
    directory: str, cfg: DetectorConfig
) -> tuple[RegionDetector, dict[str, Any]]:
    with open(os.path.join(directory, _RECORD), encoding="utf-8") as f:
        record = json.load(f)
    weights = os.path.join(directory, "model.safetensors")
    digest = sha256_file(weights)
    if digest != record["sha256"]:
        # Not retrained in its place: every committed model was trained on this detector's features.
        raise RuntimeError(
            f"{weights} has sha256 {digest}, its {_RECORD} records {record['sha256']}: the committed "
            "detector is damaged; restore it (git checkout -- checkpoints/world)"
        )
    detector = RegionDetector.load(directory)
    if detector.config != cfg:
        raise ValueError(
            f"committed detector in {directory} has config {detector.config}, not {cfg}"
        )
    with open(os.path.join(directory, "history.json"), encoding="utf-8") as f:
        history = json.load(f)
    return detector, history


def commit_detector(
    world_config: Any,
    detector_config: DetectorConfig | None = None,
    train_scenes: Sequence[Any] | None = None,
    progress: bool = True,
    root: str | os.PathLike | None = None,
) -> str:
    """Copy the detector for these configs (trained first if missing) into :func:`committed_detector_path`.

    ``scripts/train_book.py --recipe full`` calls it, so the committed models
    and the committed detector whose features they read always go together.
    ``root`` replaces ``checkpoints/`` (``train_book.py --out``). Returns the
    folder; one already there is left alone.
    """
    cfg = detector_config or DetectorConfig()
    target = committed_detector_path(world_config, cfg, root)
    if os.path.isdir(target):
        return target
    detector, history = load_or_train_detector(world_config, cfg, train_scenes, progress=progress)
    detector.cpu().save(target, history)
    atomic_write_json(
        os.path.join(target, _RECORD),
        {
            "cache_key": cache_key(world_config, cfg),
            "detector_fingerprint": detector_fingerprint(detector),
            "sha256": sha256_file(os.path.join(target, "model.safetensors")),
        },
    )
    return target


def load_or_train_detector(
    world_config: Any,
    detector_config: DetectorConfig | None = None,
    train_scenes: Sequence[Any] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> tuple[RegionDetector, dict[str, Any]]:
    """The committed detector for these configs, else the cached one, trained (and cached) first if missing.

    Returns ``(detector, history)``; the history is the one saved when it was
    trained. A committed detector whose weights do not match its record
    raises; an unreadable cached one is retrained with a warning.
    """
    cfg = detector_config or DetectorConfig()
    committed = committed_detector_path(world_config, cfg)
    if os.path.isdir(committed):
        return _load_committed_detector(committed, cfg)  # on the CPU, like a cached one
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
            warnings.warn(
                f"cached detector in {directory} is unreadable ({type(err).__name__}: {err}); retraining it",
                stacklevel=2,
            )
    detector, history = train_detector(
        world_config, cfg, train_scenes, progress=progress, device=device
    )
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
            raise ValueError(
                f"scenes must be the whole {split!r} split ({expected_n} scenes of that split), "
                f"got {len(scenes)}; use extract_region_features for a subset"
            )
    detector = None
    if os.path.exists(path):
        try:
            # Features are only valid with the detector that made them: two runs that
            # started on an empty cache at once may each have trained (and cached) one.
            detector, _ = load_or_train_detector(
                world_config, cfg, train_scenes, progress=progress, device=device
            )
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
            warnings.warn(
                f"cached region features {path} are unreadable ({type(err).__name__}: {err}); "
                "rebuilding them",
                stacklevel=2,
            )
    if split == "train" and train_scenes is None and scenes is not None:
        train_scenes = scenes
    if detector is None:
        detector, _ = load_or_train_detector(
            world_config, cfg, train_scenes, progress=progress, device=device
        )
    if scenes is None:
        scenes = generate_split(world_config, split)
    if device is not None:
        detector.to(runtime.device(device))
    jitter = (
        cfg.num_jitter if world_config.num_objects > 0 else 0
    )  # nothing to jitter in an empty world
    max_regions = world_config.num_objects + jitter + cfg.num_background
    features = extract_region_features(
        detector, scenes, cfg, max_regions=max_regions, progress=progress
    )
    features.save(
        path,
        {
            "cache_key": cache_key(world_config, cfg),
            "split": split,
            "detector_fingerprint": detector_fingerprint(detector),
        },
    )
    return features


def _file_metadata(path: str) -> dict[str, str]:
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}
