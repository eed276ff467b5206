"""Tests for fusionlib.vision: proposals, the detector, region features, locations, caching, real-image paths."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou, roi_align

from fusionlib import vision
from fusionlib.data.shapes import WorldConfig, generate_split
from fusionlib.vision import (
    DetectorConfig,
    RegionFeatures,
    check_boxes,
    extract_grid_features,
    extract_region_features,
    grid_boxes,
    load_or_build_features,
    loc5,
    loc7,
    propose_regions,
)

WORLD = WorldConfig(num_train=64, num_val=16, num_test=16)
TINY = DetectorConfig(steps=3, batch_size=8)


@pytest.fixture(scope="module")
def train_scenes():
    return generate_split(WORLD, "train")


@pytest.fixture(scope="module")
def test_scenes():
    return generate_split(WORLD, "test")


@pytest.fixture(scope="module")
def detector(train_scenes):
    det, history = vision.train_detector(WORLD, TINY, train_scenes, progress=False)
    assert len(history["loss"]) == TINY.steps and history["train_seconds"] > 0
    return det


def _object_boxes(scene) -> torch.Tensor:
    return torch.tensor([list(o.box) for o in scene.objects], dtype=torch.float32)


# -- location features ---------------------------------------------------------


def test_loc5_and_loc7_on_a_hand_computed_box():
    box = torch.tensor([10.0, 20.0, 40.0, 50.0])            # w = h = 30
    size = (100, 200)                                        # H, W
    expected5 = torch.tensor([10 / 200, 20 / 100, 40 / 200, 50 / 100, 900 / 20000])
    expected7 = torch.tensor([0.05, 0.2, 0.2, 0.5, 30 / 200, 30 / 100, 900 / 20000])
    torch.testing.assert_close(loc5(box, size), expected5)
    torch.testing.assert_close(loc7(box, size), expected7)
    batch = box.expand(2, 3, 4)
    assert loc5(batch, size).shape == (2, 3, 5)
    assert loc7(batch, size).shape == (2, 3, 7)
    assert torch.equal(loc5(torch.zeros(4), size), torch.zeros(5))   # padding box


@pytest.mark.parametrize("box", [[-1, 0, 5, 5], [0, 0, 76, 5], [0, 0, 5, 75.5], [5, 0, 4, 5], [0, float("nan"), 5, 5]])
def test_boxes_outside_the_image_raise_naming_the_argument(box):
    with pytest.raises(ValueError, match="boxes"):
        loc5(torch.tensor([box]), 75)
    with pytest.raises(ValueError, match="boxes"):
        loc7(torch.tensor([box]), 75)
    with pytest.raises(ValueError, match="object_boxes"):
        propose_regions(torch.tensor([box], dtype=torch.float32), 75, 1, 1, torch.Generator().manual_seed(0))


def test_box_shape_and_image_size_are_checked():
    with pytest.raises(ValueError, match=r"boxes must have shape \(\.\.\., 4\)"):
        check_boxes(torch.zeros(3, 5), 75)
    with pytest.raises(ValueError, match="image_size"):
        loc5(torch.zeros(4), (75, 0))


# -- proposals -----------------------------------------------------------------


def test_proposals_have_the_iou_properties_of_a_detector(train_scenes):
    gen = torch.Generator().manual_seed(0)
    first_slots = set()
    for scene in train_scenes[:40]:
        objects = _object_boxes(scene)
        boxes, owner = propose_regions(objects, 75, 3, 2, gen)
        assert boxes.shape == (len(objects) + 5, 4) and owner.shape == (len(objects) + 5,)
        check_boxes(boxes, 75)                                          # inside the image
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        iou = box_iou(boxes, objects)
        # every object appears as its exact box, owned by itself
        exact = [(boxes == objects[k]).all(1).nonzero().flatten().tolist() for k in range(len(objects))]
        assert all(len(e) >= 1 for e in exact)
        assert all(owner[e[0]] == k for k, e in enumerate(exact))
        assert int((owner >= 0).sum()) == len(objects) + 3                # objects + 3 jittered copies
        fg = owner >= 0
        own_iou = iou[fg].gather(1, owner[fg][:, None]).squeeze(1)
        assert (own_iou >= 0.5).all()                                    # jittered copies keep IoU >= 0.5
        assert (own_iou >= iou[fg].max(1).values).all()                  # ... and overlap their own object most
        bg = owner == -1
        assert int(bg.sum()) == 2
        assert (iou[bg].max(1).values < 0.3).all()                       # background is background
        first_slots.add(int(owner[0]))
    assert len(first_slots) > 3, "regions must be shuffled, not object 0 first"


def test_proposals_are_deterministic_in_the_generator(train_scenes):
    objects = _object_boxes(train_scenes[0])
    a = propose_regions(objects, 75, 2, 2, torch.Generator().manual_seed(7))
    b = propose_regions(objects, 75, 2, 2, torch.Generator().manual_seed(7))
    c = propose_regions(objects, 75, 2, 2, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_proposals_without_objects_are_all_background():
    boxes, owner = propose_regions(torch.zeros(0, 4), 75, 2, 3, torch.Generator().manual_seed(0))
    assert boxes.shape == (3, 4) and (owner == -1).all()


# -- the detector and roi_align --------------------------------------------------


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
        pooled = roi_align(fmap, [boxes], output_size=(4, 4), spatial_scale=0.25, sampling_ratio=2, aligned=True)
        expected = detector.box_head(pooled)
        torch.testing.assert_close(detector.pool(fmap, [boxes]), pooled)
    torch.testing.assert_close(feats.feats[1, :n], expected, rtol=1e-4, atol=1e-5)


def test_box_convention_matches_the_rendered_pixels(test_scenes):
    """roi_align(aligned=True) over a square's box on the raw image returns the square's colour."""
    scene = next(s for s in test_scenes if any(o.shape == "square" for o in s.objects))
    obj = next(o for o in scene.objects if o.shape == "square")
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float()[None]
    x1, y1, x2, y2 = obj.box
    inside = roi_align(image, [torch.tensor([obj.box], dtype=torch.float32)], 4, 1.0, 2, aligned=True)[0]
    colour = torch.from_numpy(scene.image[(y1 + y2) // 2, (x1 + x2) // 2].astype(np.float32))
    torch.testing.assert_close(inside.permute(1, 2, 0), colour.expand(4, 4, 3))
    # Shifted by half a box, most bins leave the square.
    shifted = torch.tensor([[x1 + (x2 - x1) / 2, y1, x2 + (x2 - x1) / 2, y2]], dtype=torch.float32)
    outside = roi_align(image, [shifted.clamp(max=75)], 4, 1.0, 2, aligned=True)[0]
    assert not torch.allclose(outside.permute(1, 2, 0), colour.expand(4, 4, 3))


def test_training_lowers_the_loss_and_evaluation_matches_a_manual_count(train_scenes, test_scenes):
    det, history = vision.train_detector(WORLD, DetectorConfig(steps=25, batch_size=8, warmup_steps=5),
                                         train_scenes, progress=False)
    assert np.mean(history["loss"][-5:]) < np.mean(history["loss"][:5])
    acc = vision.evaluate_detector(det, test_scenes)
    names = {n: i for i, n in enumerate(det.class_names)}
    labels = torch.tensor([names[f"{o.color} {o.shape}"] for s in test_scenes for o in s.objects])
    _, probs = vision.classify_boxes(det, test_scenes, [_object_boxes(s) for s in test_scenes])
    assert acc == pytest.approx((probs.argmax(1) == labels).float().mean().item())


def test_detector_save_and_load_round_trip(detector, test_scenes, tmp_path):
    detector.save(tmp_path / "det")
    assert sorted(os.listdir(tmp_path / "det")) == ["config.json", "model.safetensors"]
    loaded = vision.load_detector(tmp_path / "det")
    assert loaded.config == detector.config and loaded.class_names == detector.class_names
    a = extract_region_features(detector, test_scenes[:4])
    b = extract_region_features(loaded, test_scenes[:4])
    assert torch.equal(a.feats, b.feats)


# -- RegionFeatures --------------------------------------------------------------


def test_region_features_fields(detector, test_scenes):
    scenes = test_scenes[:6]
    f = extract_region_features(detector, scenes, max_regions=12)
    N, R, D, C = 6, 12, TINY.feature_dim, detector.num_classes
    assert (f.feats.shape, f.boxes.shape, f.mask.shape) == ((N, R, D), (N, R, 4), (N, R))
    assert f.soft_labels.shape == (N, R, C) and f.region_object.shape == (N, R) and f.image_feats.shape == (N, D)
    assert (f.mask.dtype, f.region_object.dtype, f.indices.dtype) == (torch.bool, torch.long, torch.long)
    assert f.indices.tolist() == [s.index for s in scenes] and f.image_size == (75, 75)
    assert f.loc5.shape == (N, R, 5) and f.loc7.shape == (N, R, 7)
    torch.testing.assert_close(f.loc5, loc5(f.boxes, (75, 75)))
    for i, s in enumerate(scenes):
        n = len(s.objects) + TINY.num_jitter + TINY.num_background
        assert f.mask[i].tolist() == [True] * n + [False] * (R - n)        # real regions first, then padding
        assert (f.feats[i, n:] == 0).all() and (f.boxes[i, n:] == 0).all() and (f.region_object[i, n:] == -1).all()
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
    assert torch.equal(sub.feats, whole.feats[5:7]) and sub.indices.tolist() == whole.indices[5:7].tolist()


def test_a_variable_object_count_is_padded_to_a_fixed_number_of_regions(detector):
    world = WorldConfig(num_objects=4, min_objects=2, num_train=12, num_val=2, num_test=2)
    scenes = generate_split(world, "train")
    assert len({len(s.objects) for s in scenes}) > 1
    f = extract_region_features(detector, scenes, max_regions=4 + TINY.num_jitter + TINY.num_background)
    counts = f.mask.sum(1).tolist()
    assert counts == [len(s.objects) + TINY.num_jitter + TINY.num_background for s in scenes]
    torch.testing.assert_close(f.image_feats, (f.feats * f.mask[..., None]).sum(1) / f.mask.sum(1, keepdim=True))


def test_region_features_reject_inconsistent_fields():
    N, R, D = 2, 3, 4
    good = dict(feats=torch.zeros(N, R, D), boxes=torch.zeros(N, R, 4), mask=torch.zeros(N, R, dtype=torch.bool),
                soft_labels=torch.zeros(N, R, 5), region_object=torch.full((N, R), -1),
                image_feats=torch.zeros(N, D), indices=torch.arange(N), image_size=(75, 75))
    RegionFeatures(**good)
    with pytest.raises(ValueError, match="mask"):
        RegionFeatures(**{**good, "mask": torch.zeros(N, R)})
    with pytest.raises(ValueError, match="boxes"):
        RegionFeatures(**{**good, "boxes": torch.full((N, R, 4), 80.0)})


# -- caching -------------------------------------------------------------------


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_cache_builds_once_then_loads(tmp_path, monkeypatch, train_scenes, test_scenes):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    built = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    files = _files(tmp_path)
    assert not [f for f in files if ".tmp" in f], "atomic writes leave no temp files"
    key = vision.cache_key(WORLD, TINY)
    assert f"features/regions-test-{key}.safetensors" in files
    assert f"features/detector-{key}/model.safetensors" in files
    assert len(built) == len(test_scenes) and built.num_regions == 6 + TINY.num_jitter + TINY.num_background

    def fail(*args, **kwargs):
        raise AssertionError("must load from the cache, not rebuild")

    monkeypatch.setattr(vision, "train_detector", fail)
    monkeypatch.setattr(vision, "extract_region_features", fail)
    loaded = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    assert torch.equal(loaded.feats, built.feats) and torch.equal(loaded.mask, built.mask)
    assert loaded.class_names == built.class_names and loaded.image_size == built.image_size


def test_cache_is_rebuilt_after_a_config_change(tmp_path, monkeypatch, train_scenes, test_scenes):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    a = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    changed = DetectorConfig(steps=3, batch_size=8, seed=1)
    assert vision.cache_key(WORLD, changed) != vision.cache_key(WORLD, TINY)
    assert vision.cache_key(WorldConfig(num_train=64, num_val=16, num_test=16, seed=1), TINY) != \
        vision.cache_key(WORLD, TINY)
    b = load_or_build_features(WORLD, changed, "test", test_scenes, train_scenes, progress=False)
    detectors = [f for f in _files(tmp_path) if f.endswith("model.safetensors")]
    assert len(detectors) == 2                       # a second detector was trained for the new config
    assert not torch.equal(a.feats, b.feats)


def test_corrupt_cache_files_are_rebuilt_with_a_warning(tmp_path, monkeypatch, train_scenes, test_scenes):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    first = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    path = vision.features_cache_path(WORLD, TINY, "test")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:                     # truncate: a crash mid-copy, a full disk
        f.truncate(size // 2)
    with pytest.warns(UserWarning, match="rebuilding"):
        again = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    assert os.path.getsize(path) == size
    torch.testing.assert_close(again.feats, first.feats)
    # Garbage in the cached detector: retrained (with a warning), then features rebuilt from it.
    with open(os.path.join(vision.detector_cache_path(WORLD, TINY), "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    os.remove(path)
    with pytest.warns(UserWarning, match="retraining"):
        rebuilt = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    torch.testing.assert_close(rebuilt.feats, first.feats)   # training is deterministic in the seed
    assert not [f for f in _files(tmp_path) if ".tmp" in f]


def test_atomic_write_leaves_the_old_file_and_no_temp_file_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def broken(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        vision._atomic_write(str(target), broken)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_unknown_split_or_partial_split_raises(tmp_path, monkeypatch, test_scenes):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        vision.features_cache_path(WORLD, TINY, "dev")
    with pytest.raises(ValueError, match="whole 'test' split"):
        load_or_build_features(WORLD, TINY, "test", test_scenes[:5], progress=False)


# -- real images: grid features, Faster R-CNN weights ------------------------------


def test_grid_boxes_tile_the_image():
    boxes = grid_boxes((30, 40), (2, 4))
    assert boxes.shape == (8, 4)
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 0.0, 10.0, 15.0]))
    torch.testing.assert_close(boxes[-1], torch.tensor([30.0, 15.0, 40.0, 30.0]))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert float(areas.sum()) == pytest.approx(30 * 40)
    with pytest.raises(ValueError, match="grid"):
        grid_boxes(30, (0, 2))


def test_grid_features_of_two_small_pil_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).convert("L")]
    backbone = vision.resnet18_backbone(seed=0)
    f = extract_grid_features(images, backbone, grid=(4, 4), image_size=64)
    assert f.feats.shape == (2, 16, 512) and f.soft_labels.shape == (2, 16, 1000)
    assert f.mask.all() and (f.region_object == -1).all() and f.image_size == (64, 64)
    assert torch.equal(f.boxes[0], grid_boxes(64, (4, 4)))
    torch.testing.assert_close(f.soft_labels.sum(-1), torch.ones(2, 16))
    assert not torch.allclose(f.feats[0], f.feats[1])
    # A local weights file is the opt-in path; it must load into the same architecture.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    again = vision.resnet18_backbone(tmp_path / "r18.safetensors", seed=1)
    torch.testing.assert_close(extract_grid_features(images, again, image_size=64).feats, f.feats)
    with pytest.raises(FileNotFoundError, match="resnet18"):
        vision.resnet18_backbone(tmp_path / "missing.pth")


def test_faster_rcnn_without_local_weights_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        vision.FasterRCNNRegions()
    message = str(err.value)
    assert vision.FASTER_RCNN_URL in message
    assert os.path.join(str(tmp_path), "hub", "checkpoints", vision.FASTER_RCNN_FILE) in message
    with pytest.raises(FileNotFoundError, match="weights_path"):
        vision.FasterRCNNRegions(weights_path=tmp_path / "nope.pth")


def test_features_made_by_another_detector_are_rebuilt(tmp_path, monkeypatch, train_scenes, test_scenes):
    """Two runs racing on an empty cache can each train a detector; features must match the cached one."""
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    detector_dir = vision.detector_cache_path(WORLD, TINY)
    detector = vision.load_detector(detector_dir)
    with torch.no_grad():
        for p in detector.parameters():
            p.add_(0.01)                                 # "another" detector replaces the cached one
    detector.save(detector_dir)
    with pytest.warns(UserWarning, match="another detector"):
        rebuilt = load_or_build_features(WORLD, TINY, "test", test_scenes, train_scenes, progress=False)
    expected = vision.extract_region_features(detector, test_scenes, TINY, max_regions=rebuilt.num_regions)
    torch.testing.assert_close(rebuilt.feats, expected.feats)
    assert oct(os.stat(vision.features_cache_path(WORLD, TINY, "test")).st_mode & 0o777) == "0o644"
