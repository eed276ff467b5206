"""The book's data as one bundle: world, detector, region features, tokenizer and answers (chapters 2-3).

Every experiment chapter starts from the same things: the scenes of each
split, their region features from the trained detector, the WordPiece
tokenizer and the answer vocabulary. :func:`load_book_world` builds them once
for the active profile (a 300-image world under ``smoke``, the default
world otherwise), and :meth:`BookWorld.data_spec` names them for a
checkpoint's fingerprint, so a model is only ever loaded onto the data it
was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from fusionlib import runtime
from fusionlib.data.shapes import SPLITS, WorldConfig, answer_vocab, generate_split
from fusionlib.data.tokenizer import world_tokenizer
from fusionlib.vision import DetectorConfig, load_or_build_features

__all__ = ["BookWorld", "book_world_configs", "load_book_world", "tokenizer_digest"]


def book_world_configs(profile_name: str | None = None) -> tuple[WorldConfig, DetectorConfig]:
    """The world and detector of a profile: tiny and quick for ``smoke``, the default world otherwise."""
    name = profile_name or runtime.profile()
    if name == "smoke":
        return WorldConfig(num_train=200, num_val=50, num_test=50), DetectorConfig(steps=20)
    return WorldConfig(), DetectorConfig()


def tokenizer_digest(tokenizer: Any) -> str:
    """16 hex digits naming a tokenizer's vocabulary (token -> id): a model's embedding rows depend on it."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass
class BookWorld:
    """Scenes, region features, tokenizer and answers of one world (built by :func:`load_book_world`)."""

    world: WorldConfig
    detector: DetectorConfig
    scenes: dict[str, list]  # split -> list[Scene]
    features: dict[str, Any]  # split -> RegionFeatures
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    answers: list[str]
    seconds: float  # wall time to build or load all of it

    def data_spec(self) -> dict[str, str]:
        """What a trained model's weights depend on in the data: the world, the detector, the vocabulary."""
        return {
            "world": self.world.key(),
            "detector": self.detector.key(),
            "tokenizer": tokenizer_digest(self.tokenizer),
        }

    @property
    def region_dim(self) -> int:
        return self.features["train"].feature_dim

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s} {len(v):,}" for s, v in self.scenes.items())
        return (
            f"BookWorld(images: {sizes} | {self.features['train'].num_regions} regions x {self.region_dim} "
            f"features | vocabulary {len(self.tokenizer)} | {len(self.answers)} answers)"
        )


def load_book_world(profile_name: str | None = None, progress: bool = False) -> BookWorld:
    """Build (or read from the cache) the world of a profile: scenes, features, tokenizer, answers."""
    world, detector = book_world_configs(profile_name)
    with runtime.Timer("book world", verbose=False) as timer:
        scenes = {split: generate_split(world, split) for split in SPLITS}
        features = {
            split: load_or_build_features(
                world, detector, split, scenes=scenes[split], progress=progress
            )
            for split in SPLITS
        }
        tokenizer = world_tokenizer(world)
    return BookWorld(
        world, detector, scenes, features, tokenizer, answer_vocab(world), timer.seconds
    )
