"""Clip one user's whole adapter update to an L2 bound (user-level sensitivity)."""

from __future__ import annotations

import torch

from fedrec.model.lora import AdapterState

# One float32 ulp below 1: a float64 scale shaved by it keeps the float32 result within the bound.
CLIP_SHAVE = 1.0 - 2.0**-23


def update_norm(update: AdapterState) -> float:
    """Global L2 norm over all tensors of an update, in float64 to make the bound exact."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.values())))


def clip_update(update: AdapterState, bound: float) -> tuple[AdapterState, float]:
    """Scale the update so its global norm is at most `bound`; bound <= 0 means no clipping.

    Returns the clipped update and the norm before clipping. The scale is computed in
    float64 and shaved by one float32 ulp so the float32 result never exceeds the bound.
    """
    norm = update_norm(update)
    if bound <= 0 or norm <= bound:
        return update, norm
    scale = (bound / norm) * CLIP_SHAVE
    return {k: v * scale for k, v in update.items()}, norm
