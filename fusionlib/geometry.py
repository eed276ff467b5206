"""Relative geometry as an attention bias: regions that know where the others are (chapter 3).

"What is the shape of the object closest to the red one?" needs a
*distance*, and plain attention cannot rank regions by distance. With a
linear location embedding the score ``q . k_j`` is linear in region ``j``'s
coordinates, so for any query the highest score goes to an object at an
*extreme* of the image (left-most, top-most, ...), never to the one nearest
an arbitrary anchor. An MLP location embedding could in principle learn
``-|c_i - c_j|^2`` inside a dot product, but has to discover it from answers
alone (chapter 3 measures how slowly).

The fix detection models use is to hand attention the pairwise geometry
directly. Relation Networks for object detection (Hu et al., 2018) add a
term computed from the relative box geometry of every pair of objects to
their attention logits; Swin Transformer V2 (Liu et al., 2022) computes a
per-head bias with a small MLP from relative coordinates (its "continuous
position bias"). :class:`GeometryBias` does the same for regions::

    g_ij  = (dx_ij, dy_ij, |c_i - c_j|, IoU(box_i, box_j), [i == j])   # (B, R, R, 5)
    bias  = Linear(g_ij) + MLP(g_ij)                                   # (B, R, R, heads)
    score_ij = q_i . k_j / sqrt(d) + bias_ij[head]

where ``c_i`` is the centre of box ``i`` and offsets are in units of box
size. The geometry is read from the raw boxes (``region_boxes``), not from
the location the embedding takes: that one may be standardised per
coordinate (chapter 3), which distorts widths and overlaps. A head whose bias falls with
distance gathers each region's neighbours ("closest"), one whose bias rises
gathers the far ones ("furthest"); the ``[i == j]`` input lets a head leave a
region itself out, which a smooth function of the distance alone could only
do with very large weights, and the overlap (IoU) lets it leave out other
proposals of the *same* object: a detector's proposals overlap, distinct
objects on Sort-of-CLEVR never do. Regions then carry "my nearest neighbour is a
blue square" in their own vector, and a question reads it with one
cross-attention hop to the anchor.

The bias is added to the logits of the region self-attention layers of
:class:`fusionlib.models.baselines.RegionEncoder` (``geometry_bias=True``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["box_centres", "pairwise_iou", "pairwise_geometry", "GeometryBias"]

GEOMETRY_FEATURES = 5  # dx, dy, distance (in box sizes), IoU, same region


def _check_boxes(boxes: Tensor) -> Tensor:
    if not isinstance(boxes, Tensor) or boxes.dim() != 3 or boxes.shape[-1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"region_boxes must be (batch, regions, 4) xyxy, got {got}")
    return boxes


def box_centres(boxes: Tensor) -> Tensor:
    """``(B, R, 4)`` xyxy boxes -> centres ``(B, R, 2)``."""
    x1, y1, x2, y2 = _check_boxes(boxes).unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2], dim=-1)


def pairwise_iou(boxes: Tensor) -> Tensor:
    """``(B, R, 4)`` xyxy boxes -> ``(B, R, R)`` intersection over union of every pair.

    :func:`torchvision.ops.box_iou` for a batch of box sets at once (tested
    against it). Boxes of zero area (padding) get IoU 0 with everything.
    """
    boxes = _check_boxes(boxes)
    top_left = torch.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])  # (B, R, R, 2)
    bottom_right = torch.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)  # (B, R, R)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)  # (B, R)
    union = area[..., :, None] + area[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def pairwise_geometry(boxes: Tensor) -> Tensor:
    """``(B, R, 4)`` xyxy boxes -> ``(B, R, R, 5)``: ``dx, dy, distance, IoU, [i == j]`` from box i to box j.

    Offsets and distances are measured in units of the two boxes' mean size
    (``(w + h) / 2``), as Hu et al. (2018) measure them relative to box size:
    the features do not change when the image is scaled, so pixels and
    normalised coordinates give the same geometry. Padding boxes (all zero)
    give finite values; the attention's key mask ignores them.
    """
    boxes = _check_boxes(boxes)
    centres = box_centres(boxes)  # (B, R, 2)
    size = ((boxes[..., 2] - boxes[..., 0]) + (boxes[..., 3] - boxes[..., 1])).clamp(
        min=0
    ) / 2  # (B, R)
    unit = (
        ((size[..., :, None] + size[..., None, :]) / 2).clamp(min=1e-6).unsqueeze(-1)
    )  # (B, R, R, 1)
    offset = (centres.unsqueeze(1) - centres.unsqueeze(2)) / unit  # (B, R, R, 2): c_j - c_i
    # sqrt has an infinite gradient at 0 (the diagonal); the epsilon keeps it finite.
    distance = (offset.pow(2).sum(-1, keepdim=True) + 1e-12).sqrt()  # (B, R, R, 1)
    R = boxes.shape[1]
    same = torch.eye(R, dtype=boxes.dtype, device=boxes.device).expand(boxes.shape[0], R, R)
    iou = pairwise_iou(boxes).unsqueeze(-1)  # (B, R, R, 1)
    return torch.cat([offset, distance, iou, same.unsqueeze(-1)], dim=-1)


# Linear weights of the prior heads on (dx, dy, distance, IoU, same): a head that looks at the nearest
# *other* object (distance down; the region itself and other proposals of the same object far down), and
# one that looks at the furthest (distance up). ALiBi-style slopes, but learnable.
NEAREST_PRIOR = (0.0, 0.0, -2.0, -6.0, -6.0)
FURTHEST_PRIOR = (0.0, 0.0, 1.0, 0.0, 0.0)
GEOMETRY_INITS = ("zero", "identity", "prior")


class GeometryBias(nn.Module):
    """A per-head attention bias from the relative geometry of every pair of regions (chapter 3).

    ``forward(region_boxes (B, R, 4) xyxy)`` -> ``bias (B, heads, R, R)``, float,
    to be passed as ``attn_mask`` to a region self-attention layer (a float
    mask is *added* to the logits). Padded regions are left to the layer's
    ``key_mask``: whatever bias they get, they receive zero weight.

    ``bias = Linear(g) + MLP(g)`` per pair, with ``g`` from
    :func:`pairwise_geometry`. ``hidden_size`` is the width of the two-layer
    MLP (Swin V2 uses 512 for image patches; a few dozen is plenty for a
    handful of regions); its last layer starts at zero. The linear part
    starts from ``init``:

    - ``"zero"``: no bias at all, plain self-attention at initialisation;
    - ``"identity"``: ``self_logit`` on the diagonal of every head, so each
      region starts by looking mostly at itself and the layer starts close to
      the identity instead of averaging all regions (which blurs the colours
      the words will look for);
    - ``"prior"``: heads in turn get the identity start, a nearest-other-object
      slope, a furthest-object slope and nothing, so the layer starts out
      able to gather neighbours and the rest is learned.
    """

    def __init__(
        self, num_heads: int, hidden_size: int = 32, self_logit: float = 4.0, init: str = "identity"
    ):
        super().__init__()
        for name, value in (("num_heads", num_heads), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if init not in GEOMETRY_INITS:
            raise ValueError(f"init must be one of {GEOMETRY_INITS}, got {init!r}")
        self.num_heads = num_heads
        self.linear = nn.Linear(GEOMETRY_FEATURES, num_heads, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(GEOMETRY_FEATURES, hidden_size), nn.ReLU(), nn.Linear(hidden_size, num_heads)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        identity = (0.0, 0.0, 0.0, 0.0, float(self_logit))
        if init == "zero":
            rows = [(0.0,) * GEOMETRY_FEATURES] * num_heads
        elif init == "identity":
            rows = [identity] * num_heads
        else:
            cycle = (identity, NEAREST_PRIOR, FURTHEST_PRIOR, (0.0,) * GEOMETRY_FEATURES)
            rows = [cycle[h % len(cycle)] for h in range(num_heads)]
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(rows))

    def forward(self, region_boxes: Tensor) -> Tensor:
        geometry = pairwise_geometry(region_boxes)  # (B, R, R, 5)
        bias = self.linear(geometry) + self.mlp(geometry)  # (B, R, R, heads)
        return bias.permute(0, 3, 1, 2)  # (B, heads, R, R)
