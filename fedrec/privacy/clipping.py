"""Clip each user's whole adapter update to one L2 bound (user-level sensitivity).

`clip_scales` is the one rule; the per-user engine applies it to one update's dict
(`clip_update`), the vectorized engine to a vector of users' norms at once.
"""

from __future__ import annotations

import torch

from fedrec.aggregate import NON_FINITE
from fedrec.model.types import AdapterState

# One float32 ulp below 1: a float64 scale shaved by it keeps the float32 result within the bound.
CLIP_SHAVE = 1.0 - 2.0**-23


def update_norm(update: AdapterState) -> float:
    """Global L2 norm over all tensors of an update, in float64 to make the bound exact."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.values())))


def clip_scales(norms: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped?, scale) for float64 update norms: scale = bound/norm, shaved by one float32
    ulp, where norm > bound, else 1; bound <= 0 means no clipping."""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    clipped = (norms > bound) if bound > 0 else torch.zeros_like(norms, dtype=torch.bool)
    return clipped, torch.where(clipped, bound / norms * CLIP_SHAVE, torch.ones_like(norms))


def clip_update(update: AdapterState, bound: float) -> tuple[AdapterState, float]:
    """Scale the update so its global norm is at most `bound`; returns it and the norm before."""
    norm = update_norm(update)
    clipped, scale = clip_scales(torch.tensor(norm, dtype=torch.float64), bound)
    if not bool(clipped):
        return update, norm
    s = float(scale)
    return {k: v * s for k, v in update.items()}, norm


def reply_fault(delta: AdapterState, weight: float, expected: AdapterState, clipping_norm: float) -> str | None:
    """Why a reply's summed update cannot join the round's sum, or None if it can.

    `expected` holds a tensor of each key users send, in the shape and dtype they must have.
    A sum of clipped, weighted updates has norm at most Σw·C (the triangle inequality); a
    device's reply is one user's, so there the bound is the user's own clip.
    """
    if delta.keys() != expected.keys():
        return "keys"
    for k, v in delta.items():
        if v.shape != expected[k].shape:
            return "shape"
        if v.dtype != expected[k].dtype:
            return "dtype"
    if not all(bool(torch.isfinite(v).all()) for v in delta.values()):
        return NON_FINITE
    if clipping_norm > 0:
        if update_norm(delta) > weight * clipping_norm * (1 + 1e-5):  # float32 sums of clipped updates: a little slack
            return "norm"
    return None
