"""Shared test fixtures: a tiny world with its detector features and tokenizer, built once per test module.

``book`` is the book's world bundle for the smoke profile, and
``empty_roots`` points the committed and cached checkpoint folders at a
fresh temporary folder (smoke profile, ``$FUSIONLIB_TRAIN`` unset).

A test module that defines ``WORLD`` (a ``WorldConfig``) and ``DET`` (a
``DetectorConfig``) gets the fixtures ``tiny``, ``scenes`` (the train split),
``features`` and ``tokenizer`` of that world; a module may still define
fixtures of the same names for itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest

from fusionlib import checkpoints

from fusionlib.data.shapes import WorldConfig, generate_split
from fusionlib.data.tokenizer import train_tokenizer
from fusionlib.experiments import load_book_world
from fusionlib.vision import DetectorConfig, extract_region_features, train_detector


class TinyWorld(NamedTuple):
    scenes: list  # the train split
    features: Any  # RegionFeatures of those scenes, from a detector trained one step
    tokenizer: Any  # WordPiece trained on their captions and questions


def tiny_world(world: WorldConfig, detector: DetectorConfig) -> TinyWorld:
    """The train split of ``world``, region features of a barely trained detector, and a tokenizer."""
    scenes = generate_split(world, "train")
    trained, _ = train_detector(world, detector, scenes, progress=False)
    features = extract_region_features(
        trained,
        scenes,
        max_regions=world.num_objects + detector.num_jitter + detector.num_background,
    )
    tokenizer = train_tokenizer(
        [c for s in scenes for c in s.captions] + [q.text for s in scenes for q in s.questions]
    )
    return TinyWorld(scenes, features, tokenizer)


@pytest.fixture(scope="module")
def tiny(request) -> TinyWorld:
    return tiny_world(request.module.WORLD, request.module.DET)


@pytest.fixture(scope="module")
def scenes(tiny):
    return tiny.scenes


@pytest.fixture(scope="module")
def features(tiny):
    return tiny.features


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny.tokenizer


@pytest.fixture(scope="module")
def book():
    return load_book_world("smoke")


@pytest.fixture
def empty_roots(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLIB_CHECKPOINTS", str(tmp_path / "committed"))
    monkeypatch.setattr(checkpoints, "cache_checkpoint_root", lambda: str(tmp_path / "cache"))
    monkeypatch.delenv(checkpoints.TRAIN_ENV, raising=False)
    monkeypatch.setenv("FUSIONLIB_PROFILE", "smoke")
    return tmp_path
