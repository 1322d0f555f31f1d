"""Clipping and accumulation for a stacked group: which users count, their coefficients, the sum.

Both vectorized paths (the general stacked step and the shared table) end the same way:
each user's update norm decides their clip scale, a non-finite user is left out, and the
kept users' updates enter the group's sum times their coefficient, clip scale × weight.
"""

from __future__ import annotations

import torch

from fedrec.aggregate import NON_FINITE, UpdateSum
from fedrec.privacy.clipping import clip_scales


def update_norms(delta: dict[str, torch.Tensor]) -> torch.Tensor:
    """‖Δ_u‖ per user (row) over all of `delta`'s tensors, in float64."""
    return torch.sqrt(sum((d.double() ** 2).flatten(1).sum(1) for d in delta.values()))


def weighted_sum(coef: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ_u coef_u · rows_u."""
    return torch.einsum("u,u...->...", coef, rows)


def finite_users(norm: torch.Tensor, loss: torch.Tensor, own: list[torch.Tensor], rows: list[torch.Tensor],
                 total: UpdateSum) -> torch.Tensor:  # fmt: skip
    """Which users' updates are finite. The others (NaN or Inf: a diverging step) are counted
    as rejected and their rows of `rows` zeroed in place, as a 0 coefficient times NaN is NaN."""
    ok = torch.isfinite(norm) & torch.isfinite(loss.to(norm.device).double())
    for t in own:  # tensors a user keeps (never summed) must be finite too
        ok &= torch.isfinite(t.detach().flatten(1)).all(1).to(ok.device)
    if not bool(ok.all()):
        total.reject(NON_FINITE, int((~ok).sum()))
        for t in rows:
            t[~ok.to(t.device)] = 0
    return ok


def clip_and_count(total: UpdateSum, norm: torch.Tensor, first_loss: torch.Tensor, n_targets: torch.Tensor,
                   ok: torch.Tensor, clipping_norm: float, user_weighting: str) -> torch.Tensor:  # fmt: skip
    """Each user's coefficient in the sum: the clip scale (`fedrec.privacy.clipping.clip_scales`)
    times their weight, 0 for users left out (`ok` false). The kept users' counts and the
    meter's Σ (w·‖clipped Δ‖)² and Σ w² (coef = w·scale) are added to `total`."""
    clipped, scale = clip_scales(norm, clipping_norm)
    weight = torch.ones_like(norm) if user_weighting == "uniform" else n_targets.double()
    coef = torch.where(ok, scale * weight, 0.0).to(torch.float32)
    total.num_users += int(ok.sum())
    total.weight += float(weight[ok].sum())
    total.loss_sum += float(first_loss[ok].sum())
    total.norm_sum += float(norm[ok].sum())
    total.sq_norm_sum += float(((coef.double() * norm)[ok] ** 2).sum())
    total.sq_weight_sum += float((weight[ok].double() ** 2).sum())
    total.num_clipped += int(clipped[ok].sum())
    return coef
