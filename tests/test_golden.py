"""Golden tests: every committed checkpoint loads into today's code and scores what its manifest records.

A change to a model, a recipe or the data that breaks a checkpoint fails
here until the checkpoint is retrained (``scripts/train_book.py --only
NAME``) or the change is fixed. The metrics are recomputed on the full test
split (4,000 questions for chapter 3) and must agree within 0.5 points.
"""

import functools
import json
import os

import pytest

from fusionlib import checkpoints, runtime, vision
from fusionlib.experiments import (
    BOOK_EXPERIMENTS,
    book_world_configs,
    experiment,
    load_book_world,
)

RECORDS = checkpoints.read_manifest(runtime.checkpoint_root())
TOLERANCE = 0.005


@functools.lru_cache(maxsize=None)
def book(recipe):
    return load_book_world(runtime.RECIPE_PROFILE[recipe])


_data = {}


def data_for(exp, recipe):
    key = (exp.data.__code__, recipe)
    if key not in _data:
        _data[key] = exp.data(book(recipe), recipe, "cpu")
    return _data[key]


def test_every_committed_checkpoint_belongs_to_the_book():
    names = {e.name for e in BOOK_EXPERIMENTS}
    assert set(RECORDS) <= names, (
        f"the manifest lists checkpoints no experiment defines: {set(RECORDS) - names}"
    )
    root = runtime.checkpoint_root()
    for name in RECORDS:
        assert os.path.isfile(os.path.join(root, name, "model.safetensors")), name


def test_the_book_world_reads_the_committed_detector():
    """Every checkpoint here read this detector's features; one trained on another machine differs."""
    world, detector_config = book_world_configs("cpu")
    path = vision.committed_detector_path(world, detector_config)
    assert os.path.isdir(path), (
        f"{path} is missing: the checkpoints need the detector they were trained on"
    )
    detector, _ = vision.load_or_train_detector(world, detector_config)  # checks the sha256
    with open(os.path.join(path, "record.json"), encoding="utf-8") as f:
        record = json.load(f)
    assert vision.detector_fingerprint(detector) == record["detector_fingerprint"]
    assert record["cache_key"] == vision.cache_key(world, detector_config)


def test_checkpoints_folder_stays_small():
    root = runtime.checkpoint_root()
    total = sum(
        os.path.getsize(os.path.join(folder, f))
        for folder, _, files in os.walk(root)
        for f in files
    )
    # float16 weights, about 2.6 MB per model of chapters 5 and 6: their 24 VQA fine-tunes (two
    # models, two label settings, pretrained and from scratch, three seeds) are most of it.
    assert total < 110e6, (
        f"checkpoints/ holds {total / 1e6:.1f} MB; keep it under 110 MB (store float16)"
    )


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_checkpoint_reproduces_its_recorded_metrics(name):
    record = RECORDS[name]
    exp = experiment(name)
    world = book(record.recipe)
    spec = exp.spec(world, record.recipe)
    assert checkpoints.fingerprint(spec) == record.fingerprint, (
        f"{name}: today's {record.recipe} recipe or data differ from what it was trained with "
        f"(data now {spec['data']}, then {record.spec['data']}); retrain it with "
        f"`python scripts/train_book.py --recipe {record.recipe} --only {name}` or undo the change"
    )
    model, _, _ = checkpoints.load_checkpoint(name)
    metrics = exp.evaluate(model, data_for(exp, record.recipe), record.recipe)
    for key in exp.golden:
        assert abs(metrics[key] - record.metrics[key]) <= TOLERANCE, (
            f"{name}: {key} {metrics[key]:.4f} today, {record.metrics[key]:.4f} recorded (more than 0.5 points apart)"
        )
