"""fusionlib.geometry: pairwise box geometry and the attention bias built from it (chapter 3)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from fusionlib.geometry import GeometryBias, box_centres, pairwise_geometry, pairwise_iou
from fusionlib.models import VQAConfig, build_model, load_pretrained


def two_boxes():
    # Box 0: 10 x 10 centred at (15, 25); box 1: 10 x 10 centred at (45, 65). Offset (30, 40) = 3, 4 box sizes.
    return torch.tensor([[[10.0, 20.0, 20.0, 30.0], [40.0, 60.0, 50.0, 70.0]]])


def random_boxes(B=3, R=7, seed=0, scale=75.0):
    g = torch.Generator().manual_seed(seed)
    x1y1 = torch.rand(B, R, 2, generator=g) * 0.7
    return torch.cat([x1y1, x1y1 + 0.05 + 0.25 * torch.rand(B, R, 2, generator=g)], -1) * scale


def test_centres_and_pairwise_geometry_by_hand():
    torch.testing.assert_close(
        box_centres(two_boxes()), torch.tensor([[[15.0, 25.0], [45.0, 65.0]]])
    )
    g = pairwise_geometry(two_boxes())
    assert g.shape == (1, 2, 2, 5)
    torch.testing.assert_close(g[0, 0, 1], torch.tensor([3.0, 4.0, 5.0, 0.0, 0.0]))  # from 0 to 1
    torch.testing.assert_close(
        g[0, 1, 0], torch.tensor([-3.0, -4.0, 5.0, 0.0, 0.0])
    )  # antisymmetric offsets
    torch.testing.assert_close(
        g[0, 0, 0], torch.tensor([0.0, 0.0, 1e-6, 1.0, 1.0])
    )  # self: IoU 1, flag 1


def test_geometry_does_not_change_when_the_image_is_scaled_or_shifted():
    boxes = random_boxes()
    torch.testing.assert_close(pairwise_geometry(boxes / 75.0), pairwise_geometry(boxes))
    torch.testing.assert_close(pairwise_geometry(boxes + 5.0), pairwise_geometry(boxes))


def test_batched_iou_matches_torchvision():
    boxes = random_boxes(B=4, R=9)
    boxes[0, :2] = boxes[0, 2:4] + 1.0  # some overlapping pairs
    expected = torch.stack([box_iou(b, b) for b in boxes])
    torch.testing.assert_close(pairwise_iou(boxes), expected)


def test_padding_boxes_give_finite_geometry():
    boxes = random_boxes(B=2, R=4)
    boxes[1, 2:] = 0.0  # two padding boxes
    boxes[0] = 0.0  # a sample with no regions at all
    g = pairwise_geometry(boxes)
    assert torch.isfinite(g).all()
    assert torch.all(pairwise_iou(boxes)[1, 2:, :] == 0)


def test_initial_biases():
    boxes = random_boxes(B=2, R=5)
    assert GeometryBias(num_heads=3, init="zero")(boxes).shape == (2, 3, 5, 5)
    assert torch.all(GeometryBias(num_heads=3, init="zero")(boxes) == 0)
    identity = GeometryBias(num_heads=3, self_logit=4.0)(boxes)  # the default init
    torch.testing.assert_close(identity, 4.0 * torch.eye(5).expand(2, 3, 5, 5))


def test_prior_heads_look_at_self_nearest_other_and_furthest():
    # Box 1 is a jittered copy of box 0 (IoU 0.68); box 2 is the nearest other object, box 3 the furthest.
    boxes = torch.tensor(
        [
            [
                [0.0, 0.0, 10.0, 10.0],
                [1.0, 1.0, 11.0, 11.0],
                [14.0, 0.0, 24.0, 10.0],
                [60.0, 60.0, 70.0, 70.0],
            ]
        ]
    )
    weights = GeometryBias(num_heads=4, init="prior")(boxes).softmax(dim=-1)  # (1, 4, R, R)
    assert weights[0, 0].argmax(-1).tolist() == [0, 1, 2, 3]  # identity head
    assert weights[0, 1, 0].argmax().item() == 2  # nearest other object of box 0
    assert weights[0, 2, 0].argmax().item() == 3  # furthest from box 0
    torch.testing.assert_close(weights[0, 3], torch.full((4, 4), 0.25))  # a plain head
    with pytest.raises(ValueError, match="init must be one of"):
        GeometryBias(num_heads=2, init="alibi")


def test_bias_is_linear_plus_mlp_of_the_geometry():
    torch.manual_seed(0)
    layer = GeometryBias(num_heads=2, hidden_size=8)
    torch.nn.init.normal_(layer.mlp[-1].weight)
    boxes = random_boxes(B=1, R=4)
    g = pairwise_geometry(boxes)
    by_hand = (g @ layer.linear.weight.T + layer.mlp(g)).permute(0, 3, 1, 2)
    torch.testing.assert_close(layer(boxes), by_hand)


def test_gradients_stay_finite_on_the_diagonal():
    boxes = random_boxes(B=2, R=4).requires_grad_(True)
    layer = GeometryBias(num_heads=2)
    torch.nn.init.normal_(layer.mlp[-1].weight)
    layer(boxes).sum().backward()
    assert torch.isfinite(boxes.grad).all() and boxes.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"region_boxes must be \(batch, regions, 4\)"):
        box_centres(torch.rand(2, 3))
    with pytest.raises(ValueError, match="region_boxes must be"):
        pairwise_geometry(torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="num_heads"):
        GeometryBias(num_heads=0)
    base = VQAConfig(vocab_size=20, num_answers=4)
    with pytest.raises(ValueError, match="region_layers >= 1"):
        dataclasses.replace(base, geometry_bias=True)
    with pytest.raises(ValueError, match="geometry_bias must be a bool"):
        dataclasses.replace(base, geometry_bias=1, region_layers=1)
    with pytest.raises(ValueError, match="geometry_hidden"):
        dataclasses.replace(base, geometry_hidden=0)
    with pytest.raises(ValueError, match="geometry_init"):
        dataclasses.replace(base, region_layers=1, geometry_bias=True, geometry_init="learned")
    model = build_model(
        "cross_attention",
        dataclasses.replace(base, region_dim=6, region_layers=1, geometry_bias=True),
    )
    batch = geometry_batch()
    with pytest.raises(ValueError, match="region_boxes"):
        model({k: v for k, v in batch.items() if k != "region_boxes"})
    with pytest.raises(ValueError, match=r"region_boxes'\] must be \(2, 4, 4\)"):
        model(dict(batch, region_boxes=batch["region_boxes"][:, :3]))


def test_a_biased_region_layer_gathers_the_nearest_other_region():
    """Set the bias by hand to -50 * distance - 1e4 * [self]: each region then looks at its nearest neighbour."""
    torch.manual_seed(0)
    config = VQAConfig(
        vocab_size=20,
        num_answers=4,
        region_dim=3,
        hidden_size=8,
        num_heads=1,
        region_layers=1,
        geometry_bias=True,
        geometry_hidden=2,
        geometry_init="zero",
        dropout=0.0,
    )
    encoder = build_model("cross_attention", config).regions
    layer, geometry = encoder.layers[0], encoder.geometry
    with torch.no_grad():
        first, last = geometry.mlp[0], geometry.mlp[-1]
        first.weight.zero_(), first.bias.zero_()
        first.weight[0, 2], first.weight[1, 4] = 1.0, 1.0  # hidden = (distance, same)
        last.weight.copy_(torch.tensor([[-50.0, -1e4]]))
    boxes = torch.tensor(
        [[[0.0, 0.0, 10.0, 10.0], [12.0, 0.0, 22.0, 10.0], [60.0, 60.0, 70.0, 70.0]]]
    )
    bias = geometry(boxes)
    weights = F.softmax(bias[0, 0], dim=-1)
    assert weights.argmax(-1).tolist() == [1, 0, 1]  # nearest other box, never itself
    assert weights[0, 0] < 1e-6
    # The layer really adds it to its logits: the same weights as computing them by hand.
    x = torch.randn(1, 3, 8)
    _, w = layer(x, torch.ones(1, 3, dtype=torch.bool), attn_mask=bias, need_weights=True)
    q, k, _ = F.linear(x, layer.attention.in_proj_weight, layer.attention.in_proj_bias).chunk(
        3, dim=-1
    )
    expected = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(8) + bias[0], dim=-1)
    torch.testing.assert_close(w[:, 0], expected)


def geometry_batch():
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(B=2, R=4)
    return {
        "input_ids": torch.randint(1, 20, (2, 5), generator=g),
        "attention_mask": torch.ones(2, 5, dtype=torch.bool),
        "region_feats": torch.randn(2, 4, 6, generator=g),
        "region_loc5": torch.rand(2, 4, 5, generator=g),
        "region_boxes": boxes,
        "region_mask": torch.ones(2, 4, dtype=torch.bool),
    }


def test_save_load_keeps_the_geometry(tmp_path):
    torch.manual_seed(0)
    config = VQAConfig(
        vocab_size=20,
        num_answers=4,
        region_dim=6,
        hidden_size=8,
        num_heads=2,
        region_layers=1,
        geometry_bias=True,
        dropout=0.0,
    )
    model = build_model("cross_attention", config).eval()
    torch.nn.init.normal_(model.regions.geometry.mlp[-1].weight)
    batch = geometry_batch()
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", map_location="cpu")
    assert loaded.config.geometry_bias
    torch.testing.assert_close(loaded(batch), model(batch), atol=0, rtol=0)
