"""Reading the batch dicts of :mod:`fusionlib.data.datasets`, with errors that name the key.

Every model (chapters 3, 5, 6) reads the same keys; this is the one place
that checks them.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor


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


def text_inputs(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """``input_ids (B, T) long`` and ``attention_mask (B, T) bool`` (True = real token), checked."""
    ids, mask = get_tensor(batch, "input_ids"), get_tensor(batch, "attention_mask")
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(f"batch['input_ids'] must be long (batch, seq), got {ids.dtype} {tuple(ids.shape)}")
    if mask.dtype != torch.bool or mask.shape != ids.shape:
        raise ValueError(f"batch['attention_mask'] must be bool {tuple(ids.shape)} (True = real token), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return ids, mask
