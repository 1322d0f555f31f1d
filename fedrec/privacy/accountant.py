"""User-level privacy accounting for DP-FedAvg rounds, amplified by sampling, resumable.

The accountant's whole state is its ledger of rounds (q, z, C, cohort size): ε is
recomposed from the ledger, so restoring a checkpoint's ledger gives exactly the ε an
uninterrupted run reports. Composition uses well-kept libraries:
- `pld` (default for Poisson sampling): dp-accounting's privacy loss distributions, composed
  as its PLDAccountant composes them, with one round's PLD kept per (q, z) (see below);
- `prv`: Opacus's PRV accountant (Poisson only; agrees with PLD to ~0.01 here);
- `rdp`: dp-accounting's Rényi accountant, the only one of these that handles fixed-size
  sampling without replacement (Wang, Balle & Kasiviswanathan, AISTATS 2019). That bound
  is for replace-one neighbours, for which the sum of clipped updates has sensitivity
  2C, so the noise multiplier it is given is z/2.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass

import dp_accounting as dpa
from dp_accounting import pld, rdp

ACCOUNTANTS = ("auto", "pld", "prv", "rdp")


@dataclass(frozen=True)
class RoundEvent:
    round: int
    q: float
    noise_multiplier: float
    clipping_norm: float
    sample_size: int


class UserLevelAccountant:
    def __init__(self, kind: str, sampling: str, population: int, delta: float) -> None:
        if kind == "auto":
            kind = "pld" if sampling == "poisson" else "rdp"
        if sampling == "fixed" and kind != "rdp":
            raise ValueError(f"accountant: {kind} has no bound for fixed-size sampling; use accountant=rdp or sampling=poisson")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.kind, self.sampling, self.population, self.delta = kind, sampling, population, delta
        self.events: list[RoundEvent] = []
        self.epsilons: list[float] = []

    # ------------------------------------------------------------------ ledger
    def record(self, event: RoundEvent, epsilon: float | None = None) -> float:
        """Add a round; `epsilon` may be passed when already composed for these events."""
        self.events.append(event)
        self.epsilons.append(self.epsilon(self.events) if epsilon is None else epsilon)
        return self.epsilons[-1]

    @property
    def spent(self) -> float:
        return self.epsilons[-1] if self.epsilons else 0.0

    def to_dict(self) -> dict:
        return {
            "accountant": self.kind,
            "sampling": self.sampling,
            "population": self.population,
            "delta": self.delta,
            "rounds": [asdict(e) | {"epsilon": eps} for e, eps in zip(self.events, self.epsilons)],
        }

    @classmethod
    def from_dict(cls, state: dict) -> UserLevelAccountant:
        acc = cls(state["accountant"], state["sampling"], state["population"], state["delta"])
        for row in state["rounds"]:
            acc.events.append(RoundEvent(**{k: row[k] for k in RoundEvent.__dataclass_fields__}))
            acc.epsilons.append(float(row["epsilon"]))
        return acc

    # ------------------------------------------------------------- composition
    def epsilon(self, events: list[RoundEvent]) -> float:
        """ε at this accountant's δ after `events` (identical consecutive rounds grouped)."""
        groups = [(key, sum(1 for _ in grp)) for key, grp in itertools.groupby(events, key=self._key)]
        if not groups:
            return 0.0
        if self.kind == "prv":
            from opacus.accountants import PRVAccountant

            acc = PRVAccountant()
            acc.history = [(z, q, n) for (q, z, _m), n in groups]
            return float(acc.get_epsilon(self.delta))
        if self.kind == "pld":
            return _pld_epsilon(tuple((q, z, n) for (q, z, _m), n in groups), self.delta)
        relation = dpa.NeighboringRelation.REPLACE_ONE if self.sampling == "fixed" else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
        accountant = rdp.RdpAccountant(neighboring_relation=relation)
        for (q, z, m), n in groups:
            accountant.compose(dpa.SelfComposedDpEvent(self._dp_event(q, z, m), n))
        return float(accountant.get_epsilon(self.delta))

    def _key(self, e: RoundEvent) -> tuple[float, float, int]:
        return (e.q, e.noise_multiplier, e.sample_size if self.sampling == "fixed" else 0)

    def _dp_event(self, q: float, z: float, m: int) -> dpa.DpEvent:
        if self.sampling == "poisson":
            return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
        return dpa.SampledWithoutReplacementDpEvent(self.population, m, dpa.GaussianDpEvent(z / 2))


# dp-accounting's PLD of one Poisson-sampled Gaussian round takes ~1.1 s to build at
# z ≈ 0.5 (its discretization at 1e-4), against ~0.2 s to self-compose it over 50
# rounds; PLDAccountant builds it again on every call, and a run asks for ε after every
# round. So the one-round PLD is kept per (q, z), and composed exactly as
# PLDAccountant composes (tests/test_dp.py holds the two equal).
_PLD_INTERVAL = 1e-4  # PLDAccountant's default value_discretization_interval


@functools.lru_cache(maxsize=8)
def _one_round_pld(q: float, z: float):
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=z, value_discretization_interval=_PLD_INTERVAL, sampling_prob=q,
        neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )  # fmt: skip


def _pld_epsilon(groups: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """ε of consecutive groups of `n` identical rounds (q, z, n), Poisson-sampled Gaussian."""
    composed = pld.privacy_loss_distribution.identity(value_discretization_interval=_PLD_INTERVAL)
    for q, z, n in groups:
        if q == 0:
            continue
        if z == 0:
            return math.inf
        composed = composed.compose(_one_round_pld(q, z).self_compose(n))
    return float(composed.get_epsilon_for_delta(delta))


def calibrate_noise(
    target_epsilon: float, rounds: int, make_accountant, q: float, sample_size: int, lo: float = 0.05, hi: float = 500.0
) -> float:
    """Smallest noise multiplier (to 0.1%) whose `rounds` rounds stay within target ε."""

    def eps(z: float) -> float:
        acc = make_accountant()
        return acc.epsilon([RoundEvent(1, q, z, 1.0, sample_size)] * rounds)

    if eps(hi) > target_epsilon:
        raise ValueError(f"target-epsilon {target_epsilon} is out of reach within noise multiplier {hi}")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
