"""Checks for chapter 3's exercises (cross-attention fusion and its baselines)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from fusionlib.attention import MultiHeadAttention
from fusionlib.exercises import call_student, expect_tensor, fail, passed
from fusionlib.layers import masked_mean
from fusionlib.models import RelationNetwork, VQAConfig


# --------------------------------------------------------------------------- exercise 1: masked mean


def _pooling_cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    B, R, H = 4, 6, 5
    mask = torch.tensor(
        [
            [True] * 6,
            [True] * 4 + [False] * 2,
            [True] + [False] * 5,
            [True, True, True, False, False, False],
        ]
    )
    regions = torch.randn(B, R, H, generator=g)
    garbage = (
        regions.masked_fill(~mask[..., None], 0.0) + (~mask[..., None]) * 100.0
    )  # pads hold junk
    zeroed = regions.masked_fill(~mask[..., None], 0.0)  # pads hold zeros
    return [(garbage, mask), (zeroed, mask)]


def check_masked_mean(fn: Callable) -> None:
    """Exercise 1: ``fn(regions (B, R, H), region_mask (B, R) bool) -> (B, H)``, the mean over real regions."""
    for regions, mask in _pooling_cases():
        got = expect_tensor(
            "your pooled vector",
            call_student(fn, regions.clone(), mask.clone()),
            (regions.shape[0], regions.shape[2]),
        )
        want = masked_mean(regions, mask)
        if torch.allclose(got, want, atol=1e-5):
            continue
        if torch.allclose(got, regions.mean(dim=1), atol=1e-5):
            fail(
                "you averaged over every region slot, padded ones included: padding holds whatever was "
                "there (here 100s), so the mean must only count the regions where region_mask is True"
            )
        by_slots = regions.masked_fill(~mask[..., None], 0.0).sum(dim=1) / regions.shape[1]
        if torch.allclose(got, by_slots, atol=1e-5):
            fail(
                "you summed the real regions but divided by R, the number of slots; divide by the number "
                "of real regions of each image, region_mask.sum(dim=1)"
            )
        if torch.allclose(got[0], want[0], atol=1e-5) and not torch.allclose(
            got[2], want[2], atol=1e-5
        ):
            fail(
                "the image with all 6 regions real is right, the ones with padding are not: the padded "
                "regions must neither add to the sum nor to the count"
            )
        fail(
            f"for an image with {int(mask[1].sum())} real regions of {mask.shape[1]} expected "
            f"{[round(v, 4) for v in want[1].tolist()]}, got {[round(v, 4) for v in got[1].tolist()]}"
        )
    # An image with no real region: no NaN, zeros (what fusionlib.layers.masked_mean returns).
    regions = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True, False, False], [False, False, False]])
    out = call_student(fn, regions.clone(), mask.clone())
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, 4):
        fail(
            f"your pooled vector should have shape (2, 4) for 2 images of width 4, got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    if not torch.isfinite(out).all():
        fail(
            "an image with no real region gave NaN or inf (0 / 0): clamp the count at 1, so the mean of "
            "nothing is a vector of zeros"
        )
    if not torch.allclose(out[1], torch.zeros(4), atol=1e-6):
        fail(f"an image with no real region should pool to zeros, got {out[1].tolist()}")
    passed(
        "your masked mean ignores padding, counts only real regions and is safe for empty images"
    )


# --------------------------------------------------------------------------- exercise 2: relation network cost


def check_rn_pairs(fn: Callable) -> None:
    """Exercise 2a: ``fn(region_mask (B, R) bool) -> (B,)`` how many pairs fusionlib's RN sums ``g_theta`` over."""
    mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4, [True] + [False] * 9, [False] * 10])
    got = call_student(fn, mask.clone())
    got = expect_tensor("your pair counts", torch.as_tensor(got), (4,))
    n = mask.sum(dim=1)
    want = n * n
    if torch.equal(got.long(), want):
        passed("every ordered pair of real regions, a region with itself included: n^2 per image")
        return
    if torch.equal(got.long(), n * (n - 1)):
        fail(
            "you left out the pairs (i, i) of a region with itself; fusionlib's RN, like the paper's, "
            "applies g_theta to every ordered pair, i = j included"
        )
    if torch.equal(got.long(), n * (n - 1) // 2) or torch.equal(got.long(), n * (n + 1) // 2):
        fail(
            "you counted unordered pairs; g_theta(o_i, o_j, q) and g_theta(o_j, o_i, q) are two different "
            "inputs (the concatenation is ordered), and both are computed"
        )
    if torch.equal(got.long(), torch.full((4,), mask.shape[1] ** 2)):
        fail(
            "you counted padded regions too: a pair counts only when both regions are real "
            "(region_mask[:, i] & region_mask[:, j])"
        )
    fail(f"for {n.tolist()} real regions expected {want.tolist()} pairs, got {got.tolist()}")


def _rn_g_macs(num_regions: int, hidden: int, g_hidden: int, g_layers: int) -> int:
    """Multiply-adds of ``g_theta`` for one image, counted from the modules of a real RelationNetwork."""
    config = VQAConfig(
        vocab_size=8,
        num_answers=4,
        region_dim=4,
        hidden_size=hidden,
        num_heads=1,
        rn_hidden=g_hidden,
        rn_g_layers=g_layers,
    )
    model = RelationNetwork(config)
    per_pair = sum(m.in_features * m.out_features for m in model.g if isinstance(m, nn.Linear))
    return num_regions**2 * per_pair


def check_rn_macs(fn: Callable) -> None:
    """Exercise 2b: ``fn(num_regions, hidden, g_hidden, g_layers) -> int`` multiply-adds of ``g_theta`` per image."""
    for R, H, G, L in [(10, 128, 256, 4), (36, 64, 128, 2), (6, 16, 32, 1)]:
        got = call_student(fn, R, H, G, L)
        try:
            got = int(got)
        except (TypeError, ValueError):
            fail(f"return a number (the multiply-adds), got {type(got).__name__}")
        want = _rn_g_macs(R, H, G, L)
        if got == want:
            continue
        first, rest = 3 * H * G, (L - 1) * G * G
        if got == R * R * (2 * H * G + rest):
            fail(
                "the first layer of g_theta reads [o_i; o_j; q], three vectors of width hidden: 3*hidden "
                "inputs, not 2*hidden"
            )
        if got == R * (R - 1) * (first + rest):
            fail("the pairs (i, i) count too: R^2 pairs per image")
        if got == R * R * L * G * G or got == R * R * first * L:
            fail(
                "only the first layer maps 3*hidden -> g_hidden; the other g_layers - 1 layers map "
                "g_hidden -> g_hidden"
            )
        if got == first + rest:
            fail("that is the cost of one pair; g_theta runs on all R^2 pairs of the image")
        fail(
            f"for R={R}, hidden={H}, g_hidden={G}, g_layers={L} expected {want:,} multiply-adds, got {got:,}"
        )
    passed(
        "R^2 * (3*hidden*g_hidden + (g_layers - 1)*g_hidden^2), as counted from fusionlib's RelationNetwork"
    )


# --------------------------------------------------------------------------- exercise 3: one cross-attention step


def _reference_cross_attention(tokens, regions, region_mask, w_q, w_k, w_v):
    """The same step through fusionlib's MultiHeadAttention: one head, no biases, identity output projection."""
    H = tokens.shape[-1]
    mha = MultiHeadAttention(H, 1, bias=False)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([w_q.T, w_k.T, w_v.T]))  # F.linear(x, W) = x @ W.T
        mha.out_proj.weight.copy_(torch.eye(H))
    out, weights = mha(
        tokens[None], regions[None], regions[None], key_mask=region_mask[None], need_weights=True
    )
    return out[0].detach(), weights[0, 0].detach()


def check_cross_attention_step(fn: Callable) -> None:
    """Exercise 3: one head of cross-attention for one question.

    ``fn(tokens (T, H), regions (R, H), region_mask (R,), w_q, w_k, w_v) -> (out (T, H), weights (T, R))``.
    """
    g = torch.Generator().manual_seed(3)
    T, R, H = 5, 7, 8
    tokens, regions = torch.randn(T, H, generator=g), torch.randn(R, H, generator=g)
    w_q, w_k, w_v = (torch.randn(H, H, generator=g) / math.sqrt(H) * 2 for _ in range(3))
    region_mask = torch.tensor([True, True, True, True, True, False, False])
    regions[~region_mask] = 50.0  # padding holds junk
    result = call_student(fn, tokens.clone(), regions.clone(), region_mask.clone(), w_q, w_k, w_v)
    if not isinstance(result, tuple) or len(result) != 2:
        fail(f"return a pair (output (T, H), weights (T, R)), got {type(result).__name__}")
    for name, value, shape in (
        ("your output", result[0], (T, H)),
        ("your weights", result[1], (T, R)),
    ):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            fail(f"{name} should have shape {shape}, got {got}")
    real_columns = result[1][:, region_mask]
    if torch.allclose(real_columns.sum(dim=0), torch.ones(int(region_mask.sum())), atol=1e-5):
        fail(
            "each token's weights over the regions should sum to 1: take the softmax over the regions "
            "(dim=-1), not over the tokens"
        )
    out = expect_tensor("your output", result[0], (T, H))
    weights = expect_tensor("your weights", result[1], (T, R))
    want_out, want_w = _reference_cross_attention(tokens, regions, region_mask, w_q, w_k, w_v)
    if torch.allclose(weights, want_w, atol=1e-5) and torch.allclose(out, want_out, atol=1e-4):
        passed("your cross-attention step matches fusionlib's MultiHeadAttention (one head)")
        return
    if weights[:, ~region_mask].abs().max() > 1e-6:
        if weights[:, region_mask].abs().max() < 1e-6:
            fail(
                "all the weight went to the padded regions: region_mask is True at REAL regions, so block "
                "where it is False"
            )
        fail(
            "padded regions get attention weight: set their scores to -inf before the softmax "
            "(scores.masked_fill(~region_mask, float('-inf')))"
        )
    if not torch.allclose(weights.sum(dim=1), torch.ones(T), atol=1e-5):
        fail(
            "each token's weights over the regions should sum to 1: take the softmax over the regions "
            "(dim=-1), not over the tokens"
        )
    q, k = tokens @ w_q, regions @ w_k
    unscaled = torch.softmax((q @ k.T).masked_fill(~region_mask, float("-inf")), dim=-1)
    if torch.allclose(weights, unscaled, atol=1e-5):
        fail(
            "you forgot to divide the scores by sqrt(d) (here sqrt(8)): without it the softmax is too "
            "peaked, and more so the wider the model"
        )
    if torch.allclose(weights, want_w, atol=1e-5):
        fail(
            "the weights are right but the output is not: the output is weights @ (regions @ w_v), the "
            "values projected with w_v"
        )
    fail(
        "the weights differ from softmax((tokens @ w_q) (regions @ w_k)^T / sqrt(d)) with padded regions "
        "masked; check which side each projection is applied to"
    )


# --------------------------------------------------------------------------- exercise 4: box overlap


def _overlap_cases() -> torch.Tensor:
    """Three images of four boxes (pixels): overlapping, disjoint, touching, nested and padding boxes."""
    return torch.tensor(
        [
            [
                [0.0, 0.0, 10.0, 10.0],
                [5.0, 5.0, 15.0, 15.0],
                [20.0, 0.0, 30.0, 10.0],
                [10.0, 0.0, 20.0, 10.0],
            ],
            [
                [0.0, 0.0, 20.0, 20.0],
                [5.0, 5.0, 10.0, 10.0],
                [40.0, 40.0, 50.0, 60.0],
                [0.0, 0.0, 0.0, 0.0],
            ],
            [
                [3.0, 4.0, 13.0, 14.0],
                [4.0, 4.0, 14.0, 15.0],
                [0.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0],
            ],
        ]
    )


def check_pairwise_iou(fn: Callable) -> None:
    """Exercise 4: ``fn(boxes (B, R, 4) xyxy) -> (B, R, R)`` IoU of every pair, 0 for padding (zero-area) boxes."""
    from torchvision.ops import box_iou

    boxes = _overlap_cases()
    B, R, _ = boxes.shape
    got = expect_tensor("your IoU", call_student(fn, boxes.clone()), (B, R, R))
    real = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])  # (B, R)
    want = torch.zeros(B, R, R)
    for b in range(B):
        n = int(real[b].sum())
        want[b, :n, :n] = box_iou(boxes[b, :n], boxes[b, :n])
    if not torch.isfinite(got).all():
        fail(
            "two padding boxes (all zeros) have union 0 and gave 0 / 0 = NaN: where the union is 0 the "
            "IoU must be 0 (torch.where(union > 0, inter / union, 0))"
        )
    if torch.allclose(got, want, atol=1e-5):
        passed("your batched IoU matches torchvision.ops.box_iou, image by image")
        return
    if torch.allclose(got[0, 0, 3], torch.tensor(1 / 19), atol=1e-5) or got[0, 0, 3] > 1e-6:
        fail(
            "boxes [0, 0, 10, 10] and [10, 0, 20, 10] only touch: their intersection has width 0, so their "
            "IoU is 0. Clamp the intersection's width and height at 0, and do not add 1 to widths "
            "(continuous coordinates, as torchvision uses)"
        )
    if (got < -1e-6).any():
        fail(
            "a negative IoU: two disjoint boxes give a negative width or height for the intersection; "
            "clamp each at 0 before multiplying"
        )
    inter_over_min = got[1, 0, 1]
    if torch.allclose(inter_over_min, torch.tensor(1.0), atol=1e-5):
        fail(
            "the small box inside the big one got IoU 1: divide the intersection by the union "
            "(area_i + area_j - intersection), not by the smaller area"
        )
    fail(
        f"for boxes {boxes[0, 0].tolist()} and {boxes[0, 1].tolist()} expected IoU "
        f"{want[0, 0, 1].item():.4f}, got {got[0, 0, 1].item():.4f}"
    )
