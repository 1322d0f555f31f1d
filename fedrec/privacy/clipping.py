"""Clip each user's whole adapter update to one L2 bound (user-level sensitivity).

`clip_scales` is the one rule; the per-user engine applies it to one update's dict
(`clip_update`), the vectorized engine to a vector of users' norms at once.
"""

from __future__ import annotations

import torch

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
