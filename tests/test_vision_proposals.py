"""Tests for fusionlib.vision.proposals: the IoU rules of a detector's proposals, and their determinism."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from fusionlib.data.shapes import WorldConfig, generate_split
from fusionlib.vision import check_boxes, propose_regions
from fusionlib.vision.scenes import object_boxes


@pytest.fixture(scope="module")
def train_scenes():
    return generate_split(WorldConfig(num_train=64, num_val=16, num_test=16), "train")


def test_proposals_have_the_iou_properties_of_a_detector(train_scenes):
    gen = torch.Generator().manual_seed(0)
    first_slots = set()
    for scene in train_scenes[:40]:
        objects = object_boxes(scene)
        boxes, owner = propose_regions(objects, 75, 3, 2, gen)
        assert boxes.shape == (len(objects) + 5, 4) and owner.shape == (len(objects) + 5,)
        check_boxes(boxes, 75)  # inside the image
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        iou = box_iou(boxes, objects)
        # every object appears as its exact box, owned by itself
        exact = [
            (boxes == objects[k]).all(1).nonzero().flatten().tolist() for k in range(len(objects))
        ]
        assert all(len(e) >= 1 for e in exact)
        assert all(owner[e[0]] == k for k, e in enumerate(exact))
        assert int((owner >= 0).sum()) == len(objects) + 3  # objects + 3 jittered copies
        fg = owner >= 0
        own_iou = iou[fg].gather(1, owner[fg][:, None]).squeeze(1)
        assert (own_iou >= 0.5).all()  # jittered copies keep IoU >= 0.5
        assert (own_iou >= iou[fg].max(1).values).all()  # ... and overlap their own object most
        bg = owner == -1
        assert int(bg.sum()) == 2
        assert (iou[bg].max(1).values < 0.3).all()  # background is background
        first_slots.add(int(owner[0]))
    assert len(first_slots) > 3, "regions must be shuffled, not object 0 first"


def test_proposals_are_deterministic_in_the_generator(train_scenes):
    objects = object_boxes(train_scenes[0])
    a = propose_regions(objects, 75, 2, 2, torch.Generator().manual_seed(7))
    b = propose_regions(objects, 75, 2, 2, torch.Generator().manual_seed(7))
    c = propose_regions(objects, 75, 2, 2, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_proposals_without_objects_are_all_background():
    boxes, owner = propose_regions(torch.zeros(0, 4), 75, 2, 3, torch.Generator().manual_seed(0))
    assert boxes.shape == (3, 4) and (owner == -1).all()
