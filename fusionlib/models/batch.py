"""Reading the batch dicts of :mod:`fusionlib.data.datasets`, with errors that name the key.

Every model (chapters 3, 5, 6) reads the same keys; this is the one place
that checks them. Each reader raises ``ValueError`` naming the key, the shape
and dtype it expects, and what it got.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["LOCATION_KEYS", "get_tensor", "text_inputs", "region_inputs", "optional_bool"]

# The batch key of each kind of box location: ViLBERT's 5-d [x1/W, y1/H, x2/W, y2/H, area] and UNITER's 7-d
# [x1, y1, x2, y2, w, h, w*h] (fusionlib.vision.loc5 / loc7, chapter 2).
LOCATION_KEYS = {5: "region_loc5", 7: "region_loc7"}


def get_tensor(batch: Mapping[str, Any], key: str, why: str = "", what: str = "batch") -> Tensor:
    """``batch[key]`` as a tensor; a missing key or a non-tensor raises naming ``key`` (and ``why``)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"{what} must be a dict of tensors, got {type(batch).__name__}")
    if key not in batch:
        raise ValueError(f"{what} has no {key!r}{why}; it has {sorted(batch)}")
    value = batch[key]
    if not isinstance(value, Tensor):
        raise TypeError(f"{what}[{key!r}] must be a tensor, got {type(value).__name__}")
    return value


def _described(t: Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)}"


def text_inputs(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """``input_ids (B, T) long`` and ``attention_mask (B, T) bool`` (True = real token), checked."""
    ids, mask = get_tensor(batch, "input_ids"), get_tensor(batch, "attention_mask")
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(f"batch['input_ids'] must be long (batch, seq), got {_described(ids)}")
    if mask.dtype != torch.bool or mask.shape != ids.shape:
        raise ValueError(
            f"batch['attention_mask'] must be bool {tuple(ids.shape)} like input_ids (True = real "
            f"token), got {_described(mask)}"
        )
    return ids, mask


def region_inputs(
    batch: Mapping[str, Any], batch_size: int, region_dim: int, location_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``region_feats (B, R, region_dim)`` float, the locations ``(B, R, location_dim)`` float (the key of
    :data:`LOCATION_KEYS`) and ``region_mask (B, R)`` bool (True = real region), checked.

    ``batch_size`` is ``B`` of the text, so that a batch whose images and
    captions disagree fails here rather than inside attention.
    """
    if location_dim not in LOCATION_KEYS:
        raise ValueError(
            f"location_dim must be one of {sorted(LOCATION_KEYS)}, got {location_dim!r}"
        )
    loc_key = LOCATION_KEYS[location_dim]
    feats, loc, mask = (get_tensor(batch, k) for k in ("region_feats", loc_key, "region_mask"))
    if (
        feats.dim() != 3
        or feats.shape[0] != batch_size
        or feats.shape[2] != region_dim
        or not feats.is_floating_point()
    ):
        raise ValueError(
            f"batch['region_feats'] must be float ({batch_size}, regions, {region_dim}) = (batch of "
            f"input_ids, regions, region_dim of the config), got {_described(feats)}"
        )
    R = feats.shape[1]
    if tuple(loc.shape) != (batch_size, R, location_dim) or not loc.is_floating_point():
        raise ValueError(
            f"batch[{loc_key!r}] must be float ({batch_size}, {R}, {location_dim}) like region_feats, "
            f"got {_described(loc)}"
        )
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch_size, R):
        raise ValueError(
            f"batch['region_mask'] must be bool ({batch_size}, {R}) (True = real region), "
            f"got {_described(mask)}"
        )
    return feats, loc, mask


def optional_bool(
    batch: Mapping[str, Any], key: str, shape: tuple[int, ...], why: str = ""
) -> Tensor | None:
    """``batch[key]``, a bool tensor of ``shape``, or None when the batch has no such key (or holds None)."""
    if batch.get(key) is None:
        return None
    value = get_tensor(batch, key, why)
    if value.dtype != torch.bool or tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"batch[{key!r}] must be bool {tuple(shape)}{why}, got {_described(value)}"
        )
    return value
