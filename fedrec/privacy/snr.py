"""The signal-to-noise meter: what a round's users agree on, against the noise on their mean.

Every quantity is in units of the round's clip C, so rounds with different clips compare.

- `mean-norm`: ‖Σ_u w_u·clip(Δ_u) / Σ_u w_u‖ / C, the norm of the mean clipped update.
- `agreed`: an estimate of ‖E[clip(Δ_u)]‖ / C, the part of the mean that users share.
  m updates in unrelated directions also leave a mean of norm ≈ 1/√m (their norms do
  not cancel), so the mean's norm alone overstates agreement. With S = Σ w_u·u_u,
  ‖S‖² = Σ w_u²‖u_u‖² + Σ_{u≠v} w_u w_v u_u·u_v: the cross terms are the agreement. For
  users drawn independently from one distribution, E[u_u·u_v] = ‖E u‖², so
  (‖S‖² − Σ w_u²‖u_u‖²) / ((Σ w_u)² − Σ w_u²) is an unbiased estimate of ‖E u‖²
  (a U-statistic; it can come out negative when nothing is shared, then reads 0).
- `noise`: the norm of the noise the mechanism puts on that round's mean, z·√d/m for the
  independent Gaussian mechanism (`Mechanism.noise_on_mean`); 0 without DP.
- `ratio`: agreed / noise for the round.
- `run`: the signal summed over the rounds so far (a direction that persists adds up
  linearly) against the noise on the sum of the means so far (`Mechanism.noise_on_sum`:
  independent noise adds up as √t; correlated noise less). Above 1 the run's accumulated
  step points where the users agree more than where the noise pushes it.
"""

from __future__ import annotations

import math

from fedrec.aggregate import UpdateSum

KEYS = ("snr-mean-norm", "snr-agreed", "snr-noise", "snr-ratio", "snr-run")


def sum_norm2(total: UpdateSum) -> float:
    return float(sum((v.double() ** 2).sum() for v in total.delta.values())) if total.delta else 0.0


def agreement(total: UpdateSum, clip: float) -> tuple[float, float | None]:
    """(‖mean‖/C, agreed/C) of a round's clipped sum; agreed is None where the users'
    squared norms are unknown (SecAgg+) or fewer than two users reported."""
    if clip <= 0 or total.num_users == 0 or total.weight <= 0:
        return math.nan, None
    s2 = sum_norm2(total)
    mean_norm = math.sqrt(s2) / total.weight / clip
    pairs = total.weight**2 - total.sq_weight_sum
    if not math.isfinite(total.sq_norm_sum) or not math.isfinite(pairs) or pairs <= 1e-12 * total.weight**2:
        return mean_norm, None
    return mean_norm, math.sqrt(max(0.0, (s2 - total.sq_norm_sum) / pairs)) / clip


class Meter:
    """The meter's running sums over a run's rounds (checkpointed with the run)."""

    def __init__(self) -> None:
        self.signal = 0.0  # Σ over rounds of agreed/C

    def round(self, total: UpdateSum, clip: float, noise: float, noise_sum: float) -> dict[str, float]:
        """The row for `metrics.jsonl`; `noise` and `noise_sum` (in units of C) from the mechanism."""
        mean_norm, agreed = agreement(total, clip)
        row = {"snr-mean-norm": mean_norm, "snr-noise": noise}
        if agreed is not None:
            self.signal += agreed
            row["snr-agreed"] = agreed
            if noise > 0:
                row["snr-ratio"] = agreed / noise
            if noise_sum > 0:
                row["snr-run"] = self.signal / noise_sum
        return {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}

    def state_dict(self) -> dict:
        return {"signal": self.signal}

    def load_state_dict(self, state: dict) -> None:
        self.signal = float(state.get("signal", 0.0))


def predicted_run_snr(agreed: float, noise_multiplier: float, dimension: int, users: float, rounds: int,
                      noise_on_sum: float | None = None) -> float:  # fmt: skip
    """The meter's `run` ratio a plan would reach after `rounds`, if users kept agreeing on
    `agreed`·C per round: rounds·agreed against the noise on the sum of the means
    (`noise_on_sum`, in units of C; default independent Gaussian noise z·√d/m per round)."""
    noise = noise_on_sum if noise_on_sum is not None else noise_multiplier * math.sqrt(dimension * rounds) / users
    return math.inf if noise == 0 else rounds * agreed / noise

