"""Tests for fusionlib.vision.boxes: the box convention, box checks and the location features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from fusionlib.data.shapes import WorldConfig, generate_split
from fusionlib.vision import check_boxes, loc5, loc7, propose_regions


def test_loc5_and_loc7_on_a_hand_computed_box():
    box = torch.tensor([10.0, 20.0, 40.0, 50.0])  # w = h = 30
    size = (100, 200)  # H, W
    expected5 = torch.tensor([10 / 200, 20 / 100, 40 / 200, 50 / 100, 900 / 20000])
    expected7 = torch.tensor([0.05, 0.2, 0.2, 0.5, 30 / 200, 30 / 100, 900 / 20000])
    torch.testing.assert_close(loc5(box, size), expected5)
    torch.testing.assert_close(loc7(box, size), expected7)
    batch = box.expand(2, 3, 4)
    assert loc5(batch, size).shape == (2, 3, 5)
    assert loc7(batch, size).shape == (2, 3, 7)
    assert torch.equal(loc5(torch.zeros(4), size), torch.zeros(5))  # padding box


@pytest.mark.parametrize(
    "box", [[-1, 0, 5, 5], [0, 0, 76, 5], [0, 0, 5, 75.5], [5, 0, 4, 5], [0, float("nan"), 5, 5]]
)
def test_boxes_outside_the_image_raise_naming_the_argument(box):
    with pytest.raises(ValueError, match="boxes"):
        loc5(torch.tensor([box]), 75)
    with pytest.raises(ValueError, match="boxes"):
        loc7(torch.tensor([box]), 75)
    with pytest.raises(ValueError, match="object_boxes"):
        propose_regions(
            torch.tensor([box], dtype=torch.float32), 75, 1, 1, torch.Generator().manual_seed(0)
        )


def test_box_shape_and_image_size_are_checked():
    with pytest.raises(ValueError, match=r"boxes must have shape \(\.\.\., 4\)"):
        check_boxes(torch.zeros(3, 5), 75)
    with pytest.raises(ValueError, match="image_size"):
        loc5(torch.zeros(4), (75, 0))


def test_box_convention_matches_the_rendered_pixels():
    """roi_align(aligned=True) over a square's box on the raw image returns the square's colour."""
    scenes = generate_split(WorldConfig(num_train=64, num_val=16, num_test=16), "test")
    scene = next(s for s in scenes if any(o.shape == "square" for o in s.objects))
    obj = next(o for o in scene.objects if o.shape == "square")
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float()[None]
    x1, y1, x2, y2 = obj.box
    inside = roi_align(
        image, [torch.tensor([obj.box], dtype=torch.float32)], 4, 1.0, 2, aligned=True
    )[0]
    colour = torch.from_numpy(scene.image[(y1 + y2) // 2, (x1 + x2) // 2].astype(np.float32))
    torch.testing.assert_close(inside.permute(1, 2, 0), colour.expand(4, 4, 3))
    # Shifted by half a box, most bins leave the square.
    shifted = torch.tensor([[x1 + (x2 - x1) / 2, y1, x2 + (x2 - x1) / 2, y2]], dtype=torch.float32)
    outside = roi_align(image, [shifted.clamp(max=75)], 4, 1.0, 2, aligned=True)[0]
    assert not torch.allclose(outside.permute(1, 2, 0), colour.expand(4, 4, 3))
