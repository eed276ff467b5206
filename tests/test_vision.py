"""Tests for fusionlib.vision on a tiny world: the package's names, the detector, region features and the cache.

The parts that need no trained detector have their own files: test_vision_boxes,
test_vision_proposals and test_vision_images.
"""

from __future__ import annotations

import importlib
import os
import shutil

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

import fusionlib.vision as vision
from fusionlib.data.shapes import WorldConfig, generate_split
from fusionlib.vision import (
    DetectorConfig,
    RegionFeatures,
    cache_key,
    classify_boxes,
    detector_cache_path,
    evaluate_detector,
    extract_region_features,
    features_cache_path,
    load_detector,
    load_or_build_features,
    load_or_train_detector,
    loc5,
    train_detector,
)
from fusionlib.vision import cache as cache_module
from fusionlib.vision import regions as regions_module
from fusionlib.vision.scenes import object_boxes

WORLD = WorldConfig(num_train=64, num_val=16, num_test=16)
TINY = DetectorConfig(steps=3, batch_size=8)

# Names imported from fusionlib.vision by the notebooks, scripts, tests and the rest of fusionlib.
BOOK_NAMES = [
    "DetectorConfig",
    "RegionDetector",
    "RegionFeatures",
    "cache_key",
    "check_boxes",
    "classify_boxes",
    "commit_detector",
    "committed_detector_path",
    "detector_cache_path",
    "detector_class_names",
    "evaluate_detector",
    "extract_grid_features",
    "extract_region_features",
    "faster_rcnn_weights_path",
    "features_cache_path",
    "grid_boxes",
    "load_detector",
    "load_or_build_features",
    "load_or_train_detector",
    "loc5",
    "loc7",
    "propose_regions",
    "resnet18_backbone",
    "train_detector",
    "FasterRCNNRegions",
    "FASTER_RCNN_URL",
    "FASTER_RCNN_FILE",
]


@pytest.fixture(scope="module")
def train_scenes():
    return generate_split(WORLD, "train")


@pytest.fixture(scope="module")
def test_scenes():
    return generate_split(WORLD, "test")


@pytest.fixture(scope="module")
def detector(train_scenes):
    det, history = train_detector(WORLD, TINY, train_scenes, progress=False)
    assert len(history["loss"]) == TINY.steps and history["train_seconds"] > 0
    return det


# -- the package -------------------------------------------------------------------


@pytest.mark.parametrize("name", BOOK_NAMES)
def test_every_name_the_book_imports_is_in_the_package(name):
    assert name in vision.__all__ and hasattr(vision, name)


def test_every_exported_name_is_the_object_its_module_defines():
    for name in vision.__all__:
        obj = getattr(vision, name)
        module = getattr(obj, "__module__", None)
        if module is not None and module.startswith("fusionlib.vision."):
            assert getattr(importlib.import_module(module), name) is obj, name


# -- the detector and its training (fusionlib.vision.detector, .training) -----------


def test_backbone_geometry_and_parameter_count(detector):
    x = detector.images_to_tensor(np.zeros((1, 75, 75, 3), dtype=np.uint8))
    assert detector.backbone(x).shape == (1, 64, 19, 19)
    assert detector.spatial_scale == 0.25
    assert detector.class_names[-1] == "background" and detector.num_classes == 6 * 2 + 1
    assert 80_000 < sum(p.numel() for p in detector.parameters()) < 200_000


def test_region_features_are_torchvision_roi_align_of_the_backbone(detector, test_scenes):
    """Recompute one image's features with torchvision.ops.roi_align called directly."""
    feats = extract_region_features(detector, test_scenes[:3])
    scene = test_scenes[1]
    n = int(feats.mask[1].sum())
    boxes = feats.boxes[1, :n]
    with torch.no_grad():
        fmap = detector.backbone(detector.images_to_tensor(scene.image[None]))
        pooled = roi_align(
            fmap, [boxes], output_size=(4, 4), spatial_scale=0.25, sampling_ratio=2, aligned=True
        )
        expected = detector.box_head(pooled)
        torch.testing.assert_close(detector.pool(fmap, [boxes]), pooled)
    torch.testing.assert_close(feats.feats[1, :n], expected, rtol=1e-4, atol=1e-5)


def test_training_lowers_the_loss_and_evaluation_matches_a_manual_count(train_scenes, test_scenes):
    det, history = train_detector(
        WORLD, DetectorConfig(steps=25, batch_size=8, warmup_steps=5), train_scenes, progress=False
    )
    assert np.mean(history["loss"][-5:]) < np.mean(history["loss"][:5])
    acc = evaluate_detector(det, test_scenes)
    names = {n: i for i, n in enumerate(det.class_names)}
    labels = torch.tensor([names[f"{o.color} {o.shape}"] for s in test_scenes for o in s.objects])
    _, probs = classify_boxes(det, test_scenes, [object_boxes(s) for s in test_scenes])
    assert acc == pytest.approx((probs.argmax(1) == labels).float().mean().item())


def test_training_is_deterministic_and_leaves_the_global_random_state_alone(train_scenes):
    """The cached features of every chapter rest on this: the same config trains the same weights."""
    state = torch.random.get_rng_state()
    a, _ = train_detector(WORLD, TINY, train_scenes, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = train_detector(WORLD, TINY, train_scenes, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_detector_save_and_load_round_trip(detector, test_scenes, tmp_path):
    detector.save(tmp_path / "det", history={"loss": [1.0]})
    files = sorted(os.listdir(tmp_path / "det"))
    assert files == ["config.json", "history.json", "model.safetensors"]
    # Readable by every user, like the rest of a shared cache (temporary files start private).
    assert {oct(os.stat(tmp_path / "det" / f).st_mode & 0o777) for f in files} == {"0o644"}
    loaded = load_detector(tmp_path / "det")
    assert loaded.config == detector.config and loaded.class_names == detector.class_names
    a = extract_region_features(detector, test_scenes[:4])
    b = extract_region_features(loaded, test_scenes[:4])
    assert torch.equal(a.feats, b.feats)


# -- region features and their extraction (fusionlib.vision.regions, .extraction) --


def test_region_features_fields(detector, test_scenes):
    scenes = test_scenes[:6]
    f = extract_region_features(detector, scenes, max_regions=12)
    N, R, D, C = 6, 12, TINY.feature_dim, detector.num_classes
    assert (f.feats.shape, f.boxes.shape, f.mask.shape) == ((N, R, D), (N, R, 4), (N, R))
    assert (
        f.soft_labels.shape == (N, R, C)
        and f.region_object.shape == (N, R)
        and f.image_feats.shape == (N, D)
    )
    assert (f.mask.dtype, f.region_object.dtype, f.indices.dtype) == (
        torch.bool,
        torch.long,
        torch.long,
    )
    assert f.indices.tolist() == [s.index for s in scenes] and f.image_size == (75, 75)
    assert f.loc5.shape == (N, R, 5) and f.loc7.shape == (N, R, 7)
    torch.testing.assert_close(f.loc5, loc5(f.boxes, (75, 75)))
    for i, s in enumerate(scenes):
        n = len(s.objects) + TINY.num_jitter + TINY.num_background
        assert f.mask[i].tolist() == [True] * n + [False] * (
            R - n
        )  # real regions first, then padding
        assert (
            (f.feats[i, n:] == 0).all()
            and (f.boxes[i, n:] == 0).all()
            and (f.region_object[i, n:] == -1).all()
        )
        torch.testing.assert_close(f.soft_labels[i, :n].sum(-1), torch.ones(n))
        torch.testing.assert_close(f.image_feats[i], f.feats[i, :n].mean(0))
        owners = f.region_object[i, :n]
        assert set(owners[owners >= 0].tolist()) == set(range(len(s.objects)))
        assert int((owners == -1).sum()) == TINY.num_background
    with pytest.raises(ValueError, match="max_regions"):
        extract_region_features(detector, scenes, max_regions=3)


def test_extraction_does_not_depend_on_batching(detector, test_scenes):
    whole = extract_region_features(detector, test_scenes[:8], batch_size=256)
    small = extract_region_features(detector, test_scenes[:8], batch_size=3)
    part = extract_region_features(detector, test_scenes[4:8], max_regions=whole.num_regions)
    assert torch.equal(whole.boxes, small.boxes)
    torch.testing.assert_close(whole.feats, small.feats, rtol=1e-4, atol=1e-5)
    assert torch.equal(part.boxes, whole.boxes[4:8])
    assert whole.row(test_scenes[5].index) == 5
    sub = whole.select([5, 6])
    assert (
        torch.equal(sub.feats, whole.feats[5:7])
        and sub.indices.tolist() == whole.indices[5:7].tolist()
    )


def test_a_variable_object_count_is_padded_to_a_fixed_number_of_regions(detector):
    world = WorldConfig(num_objects=4, min_objects=2, num_train=12, num_val=2, num_test=2)
    scenes = generate_split(world, "train")
    assert len({len(s.objects) for s in scenes}) > 1
    f = extract_region_features(
        detector, scenes, max_regions=4 + TINY.num_jitter + TINY.num_background
    )
    counts = f.mask.sum(1).tolist()
    assert counts == [len(s.objects) + TINY.num_jitter + TINY.num_background for s in scenes]
    torch.testing.assert_close(
        f.image_feats, (f.feats * f.mask[..., None]).sum(1) / f.mask.sum(1, keepdim=True)
    )


def test_region_features_reject_inconsistent_fields():
    N, R, D = 2, 3, 4
    good = dict(
        feats=torch.zeros(N, R, D),
        boxes=torch.zeros(N, R, 4),
        mask=torch.zeros(N, R, dtype=torch.bool),
        soft_labels=torch.zeros(N, R, 5),
        region_object=torch.full((N, R), -1),
        image_feats=torch.zeros(N, D),
        indices=torch.arange(N),
        image_size=(75, 75),
    )
    RegionFeatures(**good)
    with pytest.raises(ValueError, match="mask"):
        RegionFeatures(**{**good, "mask": torch.zeros(N, R)})
    with pytest.raises(ValueError, match="boxes"):
        RegionFeatures(**{**good, "boxes": torch.full((N, R, 4), 80.0)})


def test_save_and_load_round_trip_and_a_failed_save_keeps_the_old_file(
    detector, test_scenes, tmp_path, monkeypatch
):
    features = extract_region_features(detector, test_scenes[:3])
    path = features.save(tmp_path / "regions.safetensors", {"split": "test"})
    loaded = RegionFeatures.load(path)
    for name in RegionFeatures._TENSORS:
        assert torch.equal(getattr(loaded, name), getattr(features, name)), name
    assert (loaded.image_size, loaded.class_names) == (features.image_size, features.class_names)
    before = open(path, "rb").read()

    def broken(tensors, tmp, metadata=None):  # a full disk halfway through the file
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(regions_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        features.select([0]).save(path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["regions.safetensors"]


# -- the cache (fusionlib.vision.cache) ---------------------------------------------


def _files(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


def test_cache_builds_once_then_loads(tmp_path, monkeypatch, train_scenes, test_scenes):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    built = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    files = _files(tmp_path)
    assert not [f for f in files if ".tmp" in f], "atomic writes leave no temp files"
    key = cache_key(WORLD, TINY)
    assert f"features/regions-test-{key}.safetensors" in files
    assert f"features/detector-{key}/model.safetensors" in files
    assert (
        len(built) == len(test_scenes)
        and built.num_regions == 6 + TINY.num_jitter + TINY.num_background
    )

    def fail(*args, **kwargs):
        raise AssertionError("must load from the cache, not rebuild")

    monkeypatch.setattr(cache_module, "train_detector", fail)
    monkeypatch.setattr(cache_module, "extract_region_features", fail)
    loaded = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    assert torch.equal(loaded.feats, built.feats) and torch.equal(loaded.mask, built.mask)
    assert loaded.class_names == built.class_names and loaded.image_size == built.image_size


def test_the_cache_key_of_the_default_configs_never_changes():
    """The book's cached features are found by this key: a change would rebuild them for every reader."""
    assert cache_key(WorldConfig(), DetectorConfig()) == "1b0477c30b4a5a33"
    assert (
        cache_key(WorldConfig(num_train=200, num_val=50, num_test=50), DetectorConfig(steps=20))
        == "8ac5a0942bb680e2"
    )  # the smoke profile's


def test_cache_is_rebuilt_after_a_config_change(tmp_path, monkeypatch, train_scenes, test_scenes):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    a = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    changed = DetectorConfig(steps=3, batch_size=8, seed=1)
    assert cache_key(WORLD, changed) != cache_key(WORLD, TINY)
    assert cache_key(WorldConfig(num_train=64, num_val=16, num_test=16, seed=1), TINY) != cache_key(
        WORLD, TINY
    )
    b = load_or_build_features(WORLD, changed, "test", test_scenes, train_scenes, progress=False)
    detectors = [f for f in _files(tmp_path) if f.endswith("model.safetensors")]
    assert len(detectors) == 2  # a second detector was trained for the new config
    assert not torch.equal(a.feats, b.feats)


def test_corrupt_cache_files_are_rebuilt_with_a_warning(
    tmp_path, monkeypatch, train_scenes, test_scenes
):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    first = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    path = features_cache_path(WORLD, TINY, "test")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # truncate: a crash mid-copy, a full disk
        f.truncate(size // 2)
    with pytest.warns(UserWarning, match="rebuilding"):
        again = load_or_build_features(
            WORLD, TINY, "test", test_scenes, train_scenes, progress=False
        )
    assert os.path.getsize(path) == size
    torch.testing.assert_close(again.feats, first.feats)
    # Garbage in the cached detector: retrained (with a warning), then features rebuilt from it.
    with open(os.path.join(detector_cache_path(WORLD, TINY), "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    os.remove(path)
    with pytest.warns(UserWarning, match="retraining"):
        rebuilt = load_or_build_features(
            WORLD, TINY, "test", test_scenes, train_scenes, progress=False
        )
    torch.testing.assert_close(rebuilt.feats, first.feats)  # training is deterministic in the seed
    assert not [f for f in _files(tmp_path) if ".tmp" in f]


def test_unknown_split_or_partial_split_raises(tmp_path, monkeypatch, test_scenes):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        features_cache_path(WORLD, TINY, "dev")
    with pytest.raises(ValueError, match="whole 'test' split"):
        load_or_build_features(WORLD, TINY, "test", test_scenes[:5], progress=False)


def test_features_made_by_another_detector_are_rebuilt(
    tmp_path, monkeypatch, train_scenes, test_scenes
):
    """Two runs racing on an empty cache can each train a detector; features must match the cached one."""
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    detector_dir = detector_cache_path(WORLD, TINY)
    detector = load_detector(detector_dir)
    with torch.no_grad():
        for p in detector.parameters():
            p.add_(0.01)  # "another" detector replaces the cached one
    detector.save(detector_dir)
    with pytest.warns(UserWarning, match="another detector"):
        rebuilt = load_or_build_features(
            WORLD, TINY, "test", test_scenes, train_scenes, progress=False
        )
    expected = extract_region_features(detector, test_scenes, TINY, max_regions=rebuilt.num_regions)
    torch.testing.assert_close(rebuilt.feats, expected.feats)
    assert oct(os.stat(features_cache_path(WORLD, TINY, "test")).st_mode & 0o777) == "0o644"


# -- the committed detector (checkpoints/world/) ------------------------------------


def test_a_committed_detector_is_loaded_before_the_cache_and_never_retrained(
    tmp_path, monkeypatch, train_scenes, test_scenes
):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FUSIONLIB_CHECKPOINTS", str(tmp_path / "checkpoints"))
    built = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    target = vision.commit_detector(WORLD, TINY, train_scenes, progress=False)
    assert target == vision.committed_detector_path(WORLD, TINY)
    assert target.startswith(str(tmp_path / "checkpoints" / "world"))
    assert sorted(os.listdir(target)) == [
        "config.json",
        "history.json",
        "model.safetensors",
        "record.json",
    ]
    before = os.path.getmtime(os.path.join(target, "model.safetensors"))
    assert vision.commit_detector(WORLD, TINY, progress=False) == target  # left alone
    assert os.path.getmtime(os.path.join(target, "model.safetensors")) == before
    # train_book.py --out: the same folder layout under another root.
    elsewhere = vision.commit_detector(WORLD, TINY, progress=False, root=tmp_path / "out")
    assert elsewhere == vision.committed_detector_path(WORLD, TINY, tmp_path / "out")
    assert elsewhere.startswith(str(tmp_path / "out" / "world"))
    assert sorted(os.listdir(elsewhere)) == sorted(os.listdir(target))

    # A reader's machine: an empty cache. The committed weights are read, nothing is trained.
    shutil.rmtree(tmp_path / "cache")

    def fail(*args, **kwargs):
        raise AssertionError("a committed detector must be loaded, not retrained")

    monkeypatch.setattr(cache_module, "train_detector", fail)
    again = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    torch.testing.assert_close(again.feats, built.feats)
    assert not os.path.exists(detector_cache_path(WORLD, TINY))


def test_a_damaged_committed_detector_raises_instead_of_retraining(
    tmp_path, monkeypatch, train_scenes
):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FUSIONLIB_CHECKPOINTS", str(tmp_path / "checkpoints"))
    target = vision.commit_detector(WORLD, TINY, train_scenes, progress=False)
    weights = os.path.join(target, "model.safetensors")
    with open(weights, "r+b") as f:  # one flipped byte near the end: the weights, not the header
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(RuntimeError, match=r"model\.safetensors has sha256 .* records"):
        load_or_train_detector(WORLD, TINY, train_scenes, progress=False)
