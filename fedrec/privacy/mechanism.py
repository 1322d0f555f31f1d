"""User-level DP-FedAvg on the sum of clipped updates (McMahan et al., ICLR 2018).

The plan fixes, before round 1, everything the privacy claim rests on: how the cohort is
drawn, the noise multiplier (given, or calibrated to a target ε), the clip, δ, and the
data-independent denominator of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrec.cohort import sample_cohort, sample_poisson
from fedrec.config import FedRecConfig
from fedrec.model.lora import AdapterState
from fedrec.privacy.accountant import RoundEvent, UserLevelAccountant, calibrate_noise
from fedrec.privacy.noise import add_gaussian_noise


@dataclass
class PrivacyPlan:
    sampling: str
    population: int
    expected_users: int
    noise_multiplier: float
    clipping_norm: float
    delta: float
    accountant: UserLevelAccountant | None
    adaptive: bool = False
    clip_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_stddev: float = 0.0
    update_noise_multiplier: float = 0.0
    _next: tuple[tuple[int, int], float] | None = None

    @property
    def q(self) -> float:
        return min(1.0, self.expected_users / self.population)

    @property
    def enabled(self) -> bool:
        return self.accountant is not None

    def draw(self, users: np.ndarray, seed: int, round_: int) -> np.ndarray:
        if self.sampling == "poisson":
            return sample_poisson(users, self.q, seed, round_)
        return sample_cohort(users, self.expected_users, seed, round_)

    def event(self, round_: int) -> RoundEvent:
        return RoundEvent(round_, self.q, self.noise_multiplier, self.clipping_norm, self.expected_users)

    def epsilon_after_next(self, round_: int) -> float:
        """ε once one more round of the plan has run (memoized: composing costs ~0.3 s)."""
        assert self.accountant is not None
        key = (len(self.accountant.events), round_)
        if self._next is None or self._next[0] != key:
            self._next = (key, self.accountant.epsilon([*self.accountant.events, self.event(round_)]))
        return self._next[1]

    def private_mean(self, total: AdapterState, seed: int, round_: int) -> AdapterState:
        """(Σ clipped + N(0, z_Δ²C_t²)) / expected cohort size; records the round.

        C_t is the clip this round's updates were clipped with: the noise follows the clip
        that was applied, never the one adaptive clipping picks for the next round.
        """
        assert self.accountant is not None
        noised = add_gaussian_noise(total, self.update_noise_multiplier * self.clipping_norm, seed, round_)
        self.accountant.record(self.event(round_), self.epsilon_after_next(round_))
        return {k: v / self.expected_users for k, v in noised.items()}

    def adapt_clip(self, unclipped: int, num_users: int, seed: int, round_: int) -> None:
        """Geometric quantile update of C (Andrew et al., NeurIPS 2021, Alg. 1).

        Under DP the count of unclipped users is itself noised (σ_b) and divided by the
        expected cohort size; without DP the exact fraction is used.
        """
        if not self.adaptive:
            return
        if self.enabled:
            gen = np.random.default_rng([seed, round_, 0xC11B])
            fraction = (unclipped + gen.normal(0.0, self.count_stddev)) / self.expected_users
        elif num_users:
            fraction = unclipped / num_users
        else:
            return
        self.clipping_norm *= float(np.exp(-self.clip_learning_rate * (fraction - self.clip_quantile)))


def make_plan(cfg: FedRecConfig, population: int, log=print) -> PrivacyPlan:
    expected = min(cfg.cohort_size, population)
    delta = cfg.target_delta or 1.0 / population
    plan = PrivacyPlan(
        cfg.sampling, population, expected, cfg.noise_multiplier, cfg.clipping_norm, delta, None,
        adaptive=cfg.adaptive_clipping, clip_quantile=cfg.clip_quantile, clip_learning_rate=cfg.clip_learning_rate,
    )  # fmt: skip
    if not cfg.dp_enabled:
        return plan

    def new_accountant() -> UserLevelAccountant:
        return UserLevelAccountant(cfg.accountant, cfg.sampling, population, delta)

    if cfg.target_epsilon > 0:
        plan.noise_multiplier = calibrate_noise(cfg.target_epsilon, cfg.num_rounds, new_accountant, plan.q, expected)
        log(f"privacy: noise multiplier {plan.noise_multiplier:.4f} calibrated for ε={cfg.target_epsilon} "
            f"at δ={delta:.3g} after {cfg.num_rounds} rounds")  # fmt: skip
    plan.update_noise_multiplier = plan.noise_multiplier
    if plan.adaptive:
        plan.count_stddev = cfg.clip_count_stddev or expected / 20  # Andrew et al.'s default
        if 2 * plan.count_stddev <= plan.noise_multiplier:
            raise ValueError(
                f"adaptive clipping: count noise {plan.count_stddev:.3g} leaves no budget for the update at "
                f"z={plan.noise_multiplier:.3g}; raise clip-count-stddev or the cohort size"
            )
        # The update and the count are one Gaussian query of multiplier z together:
        # z^-2 = z_Δ^-2 + (2σ_b)^-2 (Andrew et al., Thm. 1), so the update gets z_Δ > z.
        plan.update_noise_multiplier = (plan.noise_multiplier**-2 - (2 * plan.count_stddev) ** -2) ** -0.5
    plan.accountant = new_accountant()
    log(
        f"privacy: user-level DP, {plan.accountant.kind} accountant, {cfg.sampling} sampling q={plan.q:.4g}, "
        f"z={plan.noise_multiplier:.4g}, C={cfg.clipping_norm}"
        + (f" (adaptive, quantile {cfg.clip_quantile}, count σ={plan.count_stddev:.3g}, update z={plan.update_noise_multiplier:.4g})"
           if plan.adaptive else "")
        + f", δ={delta:.3g}"
    )  # fmt: skip
    return plan
