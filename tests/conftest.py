"""Shared test fixtures: a tiny world with its detector features and tokenizer, built once per test module.

A test module that defines ``WORLD`` (a ``WorldConfig``) and ``DET`` (a
``DetectorConfig``) gets the fixtures ``tiny``, ``scenes`` (the train split),
``features`` and ``tokenizer`` of that world; a module may still define
fixtures of the same names for itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest

from fusionlib.data.shapes import WorldConfig, generate_split
from fusionlib.data.tokenizer import train_tokenizer
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
