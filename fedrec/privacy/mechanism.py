"""What the server does to a round's sum of clipped updates before its optimizer step.

One interface, `Mechanism`: `privatize(total, round)` turns the cohort's sum into the mean
update the server optimizer takes, and moves the clip for the next round. Two mechanisms:
- `NoPrivacy`: the weighted mean, as FedAvg takes it;
- `GaussianUserLevel`: user-level DP-FedAvg (McMahan et al., ICLR 2018): Gaussian noise on
  the sum, a data-independent denominator, every round recorded by an accountant.
Adaptive clipping (`AdaptiveClip`) is a part either one may hold. Everything the privacy
claim rests on (z, C, δ, q, m) is fixed when the mechanism is built, before round 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedrec.aggregate import UpdateSum, mean_update
from fedrec.model.types import AdapterState
from fedrec.privacy.accountant import RoundEvent, UserLevelAccountant, calibrate_noise, make_accountant, stored_calibration


# A deliberately broken mechanism for the audit's detection tests only: the noise is scaled by
# this factor while the accountant still books the configured z. Never set outside tests.
_TEST_NOISE_FACTOR = 1.0


def noise_seed(seed: int, round_: int) -> int:
    return int(np.random.SeedSequence([seed, round_, 0x9015E]).generate_state(1)[0])


def add_gaussian_noise(total: AdapterState, std: float, seed: int, round_: int) -> AdapterState:
    """total + N(0, std²) per coordinate, once per round, from the run's seed.

    Keys are visited in sorted order so the draw does not depend on dict order.
    """
    gen = torch.Generator().manual_seed(noise_seed(seed, round_))
    out = {}
    for k in sorted(total):
        v = total[k]
        out[k] = v + torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype) * std
    return out


@dataclass(frozen=True)
class PrivacyReport:
    """What a run's ε rests on, as `summary.json` states it (all None without DP)."""

    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    sampling_rate: float | None = None
    noise_to_signal: float | None = None  # z·√d/m: noise norm over a fully agreeing mean update


class Mechanism(Protocol):
    enabled: bool  # whether the run's output carries a DP guarantee
    clipping_norm: float  # the bound users clip to in the next round

    def privatize(self, total: UpdateSum, template: AdapterState, round_: int) -> AdapterState | None:
        """The mean update for the server optimizer (None: no step), then the next clip."""

    def would_exceed(self, round_: int, max_epsilon: float) -> bool:
        """Whether running `round_` would take ε past `max_epsilon` (0 = no limit)."""

    def prepare(self, rounds: range) -> None:
        """Called once before round 1 with the rounds the run plans."""

    def report(self, dimension: int) -> PrivacyReport:
        """ε, δ, z, q and the noise-to-signal ratio over an adapter of `dimension` parameters."""

    def privacy_record(self) -> dict:
        """What privacy.json holds: the accountant's ledger and what ε rests on."""

    def noise_on_mean(self, dimension: int, round_: int) -> float:
        """Norm of the noise on round `round_`'s mean update, in units of the clip (0 without DP)."""

    def noise_on_sum(self, dimension: int, round_: int) -> float:
        """Norm of the noise on the sum of the means of rounds 1..round_, in units of the clip."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class AdaptiveClip:
    """Geometric quantile update of the clip (Andrew et al., NeurIPS 2021, Alg. 1).

    Under DP the count of unclipped users is itself noised (σ_b) and divided by the
    expected cohort size; without DP the exact fraction is used.
    """

    quantile: float
    learning_rate: float
    count_stddev: float = 0.0

    def next_clip(self, clip: float, total: UpdateSum, expected_users: int | None, seed: int, round_: int) -> float:
        unclipped = total.num_users - total.num_clipped
        if expected_users is not None:
            gen = np.random.default_rng([seed, round_, 0xC11B])
            fraction = (unclipped + gen.normal(0.0, self.count_stddev)) / expected_users
        elif total.num_users:
            fraction = unclipped / total.num_users
        else:
            return clip
        return clip * float(np.exp(-self.learning_rate * (fraction - self.quantile)))


class NoPrivacy:
    """The weighted mean of the cohort's clipped updates; no noise, no ε."""

    enabled = False

    def __init__(self, clipping_norm: float, adaptive: AdaptiveClip | None = None) -> None:
        self.clipping_norm = clipping_norm
        self.adaptive = adaptive

    def privatize(self, total: UpdateSum, template: AdapterState, round_: int) -> AdapterState | None:
        mean = mean_update(total) if total.num_users else None
        if self.adaptive is not None:
            self.clipping_norm = self.adaptive.next_clip(self.clipping_norm, total, None, 0, round_)
        return mean

    def would_exceed(self, round_: int, max_epsilon: float) -> bool:
        return False

    def prepare(self, rounds: range) -> None:
        pass

    def report(self, dimension: int) -> PrivacyReport:
        return PrivacyReport()

    def privacy_record(self) -> dict:
        return {"accountant": None, "epsilon": None}

    def noise_on_mean(self, dimension: int, round_: int) -> float:
        return 0.0

    def noise_on_sum(self, dimension: int, round_: int) -> float:
        return 0.0

    def state_dict(self) -> dict:
        return {"clipping_norm": self.clipping_norm}

    def load_state_dict(self, state: dict) -> None:
        self.clipping_norm = float(state["clipping_norm"])


class GaussianUserLevel:
    """(Σ clipped + N(0, z_Δ²C_t²)) / m, with m the expected cohort size; each round recorded.

    C_t is the clip this round's updates were clipped with: the noise follows the clip that
    was applied, never the one adaptive clipping picks for the next round. With adaptive
    clipping the update and the clip count are one Gaussian query of multiplier z together:
    z^-2 = z_Δ^-2 + (2σ_b)^-2 (Andrew et al., Thm. 1), so the update gets z_Δ > z.
    """

    enabled = True

    def __init__(
        self, noise_multiplier: float, clipping_norm: float, q: float, expected_users: int,
        accountant: UserLevelAccountant, seed: int, adaptive: AdaptiveClip | None = None,
        whatif: dict | None = None,
    ) -> None:  # fmt: skip
        """`whatif`: {"population": N′, "cohort": m′, "trained_cohort": m} where q, m and the
        accountant are N′'s, while the sum is over the data at hand's m users: its noise is
        scaled by m/m′ and it is divided by m, so the mean carries N′'s noise z·C/m′."""
        self.noise_multiplier, self.clipping_norm, self.q = noise_multiplier, clipping_norm, q
        self.expected_users, self.accountant, self.seed, self.adaptive = expected_users, accountant, seed, adaptive
        self.whatif = whatif
        self.divisor = int(whatif["trained_cohort"]) if whatif else expected_users
        self.update_noise_multiplier = noise_multiplier
        if adaptive is not None:
            if 2 * adaptive.count_stddev <= noise_multiplier:
                raise ValueError(
                    f"adaptive clipping: count noise {adaptive.count_stddev:.3g} leaves no budget for the update at "
                    f"z={noise_multiplier:.3g}; raise clip-count-stddev or the cohort size"
                )
            self.update_noise_multiplier = (noise_multiplier**-2 - (2 * adaptive.count_stddev) ** -2) ** -0.5
        self._next: tuple[tuple[int, int], float] | None = None

    @property
    def delta(self) -> float:
        return self.accountant.delta

    def event(self, round_: int) -> RoundEvent:
        return RoundEvent(round_, self.q, self.noise_multiplier, self.clipping_norm, self.expected_users)

    def epsilon_after_next(self, round_: int) -> float:
        """ε once one more round has run (memoized: composing takes a noticeable fraction of a second)."""
        key = (len(self.accountant.events), round_)
        if self._next is None or self._next[0] != key:
            self._next = (key, self.accountant.epsilon([*self.accountant.events, self.event(round_)]))
        return self._next[1]

    def privatize(self, total: UpdateSum, template: AdapterState, round_: int) -> AdapterState | None:
        # Noise goes on even when Poisson sampling drew nobody: the output must not reveal the cohort size.
        summed = total.delta or {k: torch.zeros_like(v) for k, v in template.items()}
        std = self.update_noise_multiplier * self.clipping_norm * _TEST_NOISE_FACTOR * self.divisor / self.expected_users
        noised = add_gaussian_noise(summed, std, self.seed, round_)
        self.accountant.record(self.event(round_), self.epsilon_after_next(round_))
        if self.adaptive is not None:
            self.clipping_norm = self.adaptive.next_clip(self.clipping_norm, total, self.expected_users, self.seed, round_)
        return {k: v / self.divisor for k, v in noised.items()}

    def would_exceed(self, round_: int, max_epsilon: float) -> bool:
        return bool(max_epsilon and self.epsilon_after_next(round_) > max_epsilon)

    def prepare(self, rounds: range) -> None:
        self.accountant.compose_ahead([self.event(r) for r in rounds])  # composed while the clients train

    def report(self, dimension: int) -> PrivacyReport:
        # z_Δ·√d/m (z_Δ = z without adaptive clipping).
        return PrivacyReport(self.accountant.spent, self.delta, self.noise_multiplier, self.q,
                             self.update_noise_multiplier * dimension**0.5 / self.expected_users)  # fmt: skip

    def privacy_record(self) -> dict:
        return self.accountant.to_dict() | ({"whatif": whatif_label(self.whatif)} if self.whatif else {})

    def noise_on_mean(self, dimension: int, round_: int) -> float:
        return self.update_noise_multiplier * dimension**0.5 / self.expected_users

    def noise_on_sum(self, dimension: int, round_: int) -> float:
        return self.update_noise_multiplier * (dimension * max(round_, 1)) ** 0.5 / self.expected_users

    def state_dict(self) -> dict:
        # z as it was calibrated: a resumed run that extends num-rounds keeps the noise it ran with.
        return {"clipping_norm": self.clipping_norm, "noise_multiplier": self.noise_multiplier,
                "update_noise_multiplier": self.update_noise_multiplier, "accountant": self.accountant.to_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.clipping_norm = float(state["clipping_norm"])
        self.noise_multiplier = float(state["noise_multiplier"])
        self.update_noise_multiplier = float(state["update_noise_multiplier"])
        self.accountant.load_state_dict(state["accountant"])
        self._next = None


def whatif_label(whatif: dict) -> dict:
    """How every output of a what-if run names what its ε is."""
    n, m = int(whatif["population"]), int(whatif["cohort"])
    return {"population": n, "cohort_size": m, "trained_population": int(whatif["trained_population"]),
            "trained_cohort_size": int(whatif["trained_cohort"]),
            "label": f"simulated: ε for a population of {n:,} with cohorts of {m:,}, not this run's own guarantee"}  # fmt: skip


def user_level_gaussian(
    *, noise_multiplier: float, target_epsilon: float, rounds: int, clipping_norm: float, q: float,
    expected_users: int, population: int, sampling: str, accountant: str, delta: float, seed: int,
    adaptive: AdaptiveClip | None, log: Callable[[str], None] = print, whatif: dict | None = None,
    calibrations: Path | None = None,
) -> GaussianUserLevel:  # fmt: skip
    """The Gaussian mechanism with z given, or calibrated so `rounds` rounds spend `target_epsilon`.
    With `whatif`, `q`, `expected_users`, `population` and `delta` are the stated population's;
    `calibrations`: the file of earlier calibrations (`fedrec.privacy.accountant.calibrate_noise`)."""

    def new_accountant() -> UserLevelAccountant:
        return make_accountant(accountant, sampling, population, delta)

    if target_epsilon > 0:
        noise_multiplier = calibrate_noise(target_epsilon, rounds, new_accountant, q, expected_users, store=calibrations)
        stored = stored_calibration(target_epsilon, rounds, new_accountant, q, expected_users)
        log(f"privacy: noise multiplier {noise_multiplier:.4f} calibrated for ε={target_epsilon} "
            f"at δ={delta:.3g} after {rounds} rounds" + (f" (read from {calibrations}: an earlier run's, same inputs)" if stored else ""))  # fmt: skip
    mech = GaussianUserLevel(noise_multiplier, clipping_norm, q, expected_users, new_accountant(), seed, adaptive, whatif)
    if whatif:
        log(f"privacy: WHAT-IF, {whatif_label(whatif)['label']}: trained on {whatif['trained_population']:,} users, "
            f"~{whatif['trained_cohort']:,} a round, with the noise on each mean that {expected_users:,} would get")  # fmt: skip
    log(
        f"privacy: user-level DP, {mech.accountant.kind} accountant, {sampling} sampling q={q:.4g}, "
        f"z={noise_multiplier:.4g}, C={clipping_norm}"
        + (f" (adaptive, quantile {adaptive.quantile}, count σ={adaptive.count_stddev:.3g}, "
           f"update z={mech.update_noise_multiplier:.4g})" if adaptive else "")
        + f", δ={delta:.3g}"
    )  # fmt: skip
    return mech


class BandedMatrixFactorization:
    """DP-FTRL-style correlated noise for full or cyclic participation (no sampling).

    Round t's sum gets w_t = ζ_t − Σ_{k≥1} c_k·w_{t−k}, ζ_t ~ N(0, (z·s_T·C)²) drawn exactly
    as `add_gaussian_noise` draws today's noise, with s_T the sensitivity of C·x over the
    planned T rounds for the participation run (`fedrec.privacy.factorization`). Coefficients
    c = [1] (one band) are the identity: independent noise, every round with multiplier
    z·√(rounds a user takes part in), the Gaussian mechanism composed without amplification.
    The whole run is one Gaussian mechanism of multiplier z on the sensitivity s_T, so
    after t rounds ε is that mechanism's at multiplier z·s_T/s_t (the rows released so
    far), from `fedrec.privacy.accountant.gaussian_epsilon`.
    """

    enabled = True

    def __init__(self, coefficients: np.ndarray, noise_multiplier: float, clipping_norm: float, rounds: int,
                 participation: str, groups: int, users_per_round: float, population: int, delta: float,
                 seed: int) -> None:  # fmt: skip
        from fedrec.privacy import factorization as mf

        self.c = np.asarray(coefficients, dtype=np.float64)
        self.noise_multiplier, self.clipping_norm, self.rounds = noise_multiplier, clipping_norm, rounds
        self.participation, self.groups, self.users_per_round = participation, groups, users_per_round
        self.population, self.delta, self.seed = population, delta, seed
        self.sens = mf.sensitivity(self.c, rounds, participation, groups)
        self.q = 1.0 if participation == "all" else 1.0 / groups
        self.recent: list[AdapterState] = []  # w_{t-1}, w_{t-2}, ... (b-1 of them): the noise state
        self.epsilons: list[tuple[int, float]] = []
        self._round_noise = mf.round_noise(self.c, rounds)
        self._prefix_noise = mf.prefix_noise(self.c, rounds)

    @property
    def bands(self) -> int:
        return len(self.c)

    def epsilon_at(self, round_: int) -> float:
        """ε once rounds 1..round_ have been released."""
        from fedrec.privacy import factorization as mf
        from fedrec.privacy.accountant import gaussian_epsilon

        # A resumed run may extend num-rounds: the same noise, over more released rows.
        released = mf.sensitivity(self.c, max(self.rounds, round_), self.participation, self.groups, released=round_)
        return gaussian_epsilon(self.noise_multiplier * self.sens / released, self.delta)

    def privatize(self, total: UpdateSum, template: AdapterState, round_: int) -> AdapterState | None:
        summed = total.delta or {k: torch.zeros_like(v) for k, v in template.items()}
        std = self.noise_multiplier * self.sens * self.clipping_norm * _TEST_NOISE_FACTOR
        zeta = add_gaussian_noise({k: torch.zeros_like(v) for k, v in summed.items()}, std, self.seed, round_)
        noise = zeta
        if len(self.c) > 1:
            noise = {k: v.double() for k, v in zeta.items()}
            for ck, past in zip(self.c[1:], self.recent):
                for k in noise:
                    noise[k] -= ck * past[k]
            self.recent = [noise, *self.recent][: len(self.c) - 1]
            noise = {k: v.to(summed[k].dtype) for k, v in noise.items()}
        self.epsilons.append((round_, self.epsilon_at(round_)))
        return {k: (summed[k] + noise[k]) / self.users_per_round for k in summed}

    def would_exceed(self, round_: int, max_epsilon: float) -> bool:
        return bool(max_epsilon and self.epsilon_at(round_) > max_epsilon)

    def prepare(self, rounds: range) -> None:
        pass

    def noise_on_mean(self, dimension: int, round_: int) -> float:
        """Norm of round `round_`'s noise on the mean, in units of C."""
        t = min(max(round_, 1), self.rounds) - 1
        return self.noise_multiplier * self.sens * self._round_noise[t] * dimension**0.5 / self.users_per_round

    def noise_on_sum(self, dimension: int, round_: int) -> float:
        """Norm of the noise on the sum of the means of rounds 1..round_, in units of C."""
        t = min(max(round_, 1), self.rounds) - 1
        return self.noise_multiplier * self.sens * self._prefix_noise[t] * dimension**0.5 / self.users_per_round

    def report(self, dimension: int) -> PrivacyReport:
        # noise_to_signal: the last round's noise on the mean (cf. z·√d/m).
        return PrivacyReport(self.epsilons[-1][1] if self.epsilons else 0.0, self.delta, self.noise_multiplier, self.q,
                             self.noise_on_mean(dimension, self.rounds))  # fmt: skip

    def privacy_record(self) -> dict:
        return {
            "accountant": "gaussian (pld), matrix factorization",
            "mechanism": "banded-mf" if len(self.c) > 1 else "gaussian, no sampling",
            "participation": self.participation,
            "groups": self.groups,
            "population": self.population,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "coefficients": [float(x) for x in self.c],
            "sensitivity": self.sens,
            "planned_rounds": self.rounds,
            "rounds": [{"round": r, "epsilon": e, "clipping_norm": self.clipping_norm} for r, e in self.epsilons],
        }

    def state_dict(self) -> dict:
        return {"clipping_norm": self.clipping_norm, "noise_multiplier": self.noise_multiplier,
                "coefficients": self.c.tolist(), "recent": self.recent, "epsilons": self.epsilons}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if [float(x) for x in state["coefficients"]] != self.c.tolist():
            raise ValueError("checkpoint: the matrix factorization's coefficients differ from this run's")
        self.clipping_norm = float(state["clipping_norm"])
        self.noise_multiplier = float(state["noise_multiplier"])
        self.recent = [{k: v.clone() for k, v in w.items()} for w in state["recent"]]
        self.epsilons = [(int(r), float(e)) for r, e in state["epsilons"]]


def banded_mf(
    *, noise_multiplier: float, target_epsilon: float, rounds: int, bands: int, clipping_norm: float,
    participation: str, groups: int, users_per_round: float, population: int, delta: float, seed: int,
    log: Callable[[str], None] = print,
) -> BandedMatrixFactorization:  # fmt: skip
    """The factorization for this run's rounds and participation, z given or calibrated."""
    from fedrec.privacy import factorization as mf
    from fedrec.privacy.accountant import calibrate_gaussian

    c = mf.optimal_bands(rounds, bands, participation, groups)
    if target_epsilon > 0:
        noise_multiplier = calibrate_gaussian(target_epsilon, delta)
    mech = BandedMatrixFactorization(c, noise_multiplier, clipping_norm, rounds, participation, groups,
                                     users_per_round, population, delta, seed)  # fmt: skip
    gain = mf.loss(c, rounds, participation, groups) / mf.loss(np.ones(1), rounds, participation, groups)
    who = "every user in every round" if participation == "all" else f"{groups} cyclic groups, a user every {groups} rounds"
    log(f"privacy: user-level DP, {who} (no sampling), {len(c)}-band Toeplitz factorization "
        f"(prefix-sum error {gain:.3f}× independent noise's at equal ε), sensitivity {mech.sens:.4g}·C, "
        f"z={noise_multiplier:.4g} on it (one Gaussian mechanism), C={clipping_norm}, δ={delta:.3g}"
        + (f"; ε={target_epsilon} after {rounds} rounds" if target_epsilon > 0 else ""))  # fmt: skip
    if bands > len(c):
        log(f"privacy: {bands} bands asked, {len(c)} used"
            + (" (the cyclic separation bounds the band)" if participation == "cyclic" else ""))
    return mech
