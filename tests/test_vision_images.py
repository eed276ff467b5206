"""Tests for fusionlib.vision.images: grid features of real images, and Faster R-CNN without a download."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fusionlib import vision
from fusionlib.vision import extract_grid_features, grid_boxes


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
    images = [
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).convert("L"),
    ]
    backbone = vision.resnet18_backbone(seed=0)
    f = extract_grid_features(images, backbone, grid=(4, 4), image_size=64)
    assert f.feats.shape == (2, 16, 512) and f.soft_labels.shape == (2, 16, 1000)
    assert f.mask.all() and (f.region_object == -1).all() and f.image_size == (64, 64)
    assert torch.equal(f.boxes[0], grid_boxes(64, (4, 4)))
    torch.testing.assert_close(f.soft_labels.sum(-1), torch.ones(2, 16))
    assert not torch.allclose(f.feats[0], f.feats[1])
    # A local weights file is the opt-in path; it must load into the same architecture.
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in backbone.state_dict().items()},
        str(tmp_path / "r18.safetensors"),
    )
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
