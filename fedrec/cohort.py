"""The server's cohort draw and the routing of cohort users to worker nodes.

The server draws users itself from a seeded RNG (docs/design.md#server-draws-cohort): Flower's node
sampling is not reproducible and knows nothing of privacy amplification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SAMPLERS = ("fixed", "poisson", "all", "cyclic")


def sample_cohort(population: Sequence[int] | np.ndarray, size: int, seed: int, round_: int) -> np.ndarray:
    """Uniform draw without replacement of min(size, N) users for one round, sorted."""
    pop = np.asarray(population, dtype=np.int64)
    rng = np.random.default_rng([seed, round_, 0xC0407])
    k = min(size, len(pop))
    return np.sort(rng.choice(pop, size=k, replace=False))


@dataclass
class CohortSampler:
    """Who trains in each round: `fixed` (m users without replacement), `poisson` (each user
    with probability q = m/N, what privacy amplification assumes), `all` (every user, every
    round) or `cyclic` (the users split once, seeded, into k = N // m groups; round t trains
    group (t − 1) mod k, so a user's rounds are exactly k apart: the participation the
    banded matrix mechanism's sensitivity is computed for).

    Its RNG is counter-based, seeded by (seed, round): a round's draw needs no state but
    the seed, so a resumed run draws exactly the cohorts an uninterrupted one would.
    """

    kind: str
    population: np.ndarray
    size: int  # the cohort size m (Poisson: its expectation)
    seed: int

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"sampling: unknown {self.kind!r}; choose from {', '.join(SAMPLERS)}")
        self.population = np.asarray(self.population, dtype=np.int64)
        self.size = len(self.population) if self.kind == "all" else min(self.size, len(self.population))
        if self.kind == "cyclic":
            self.groups = max(1, len(self.population) // max(self.size, 1))
            self._members = cyclic_groups(self.population, self.groups, self.seed)

    @property
    def q(self) -> float:
        if self.kind == "cyclic":
            return 1.0 / self.groups
        return min(1.0, self.size / len(self.population)) if len(self.population) else 0.0

    @property
    def per_round(self) -> float:
        """Users per round as the mechanism divides by: m, N (all) or N/k (cyclic)."""
        return len(self.population) / self.groups if self.kind == "cyclic" else float(self.size)

    def draw(self, round_: int) -> np.ndarray:
        if self.kind == "poisson":
            return sample_poisson(self.population, self.q, self.seed, round_)
        if self.kind == "fixed":
            return sample_cohort(self.population, self.size, self.seed, round_)
        if self.kind == "cyclic":
            return self._members[(round_ - 1) % self.groups].copy()
        return self.population.copy()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "population": self.population.tolist(), "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind or state["seed"] != self.seed or state["population"] != self.population.tolist():
            raise ValueError("checkpoint: the cohort sampler's population, kind or seed differ from this run's")
        self.size = int(state["size"])


def dropped_out(users: Sequence[int] | np.ndarray, rate: float, seed: int, round_: int) -> set[int]:
    """The sampled users who fail to report this round (client-dropout): each independently
    with probability `rate`, decided by (seed, round, user) alone, so on any worker alike."""
    if rate <= 0:
        return set()
    return {int(u) for u in users if np.random.default_rng([seed, round_, int(u), 0xD0]).random() < rate}


def split_among(users: Sequence[int] | np.ndarray, num_workers: int) -> list[np.ndarray]:
    """Contiguous, near-equal shares; empty shares are dropped."""
    return [s for s in np.array_split(np.asarray(users, dtype=np.int64), num_workers) if len(s)]


def sample_poisson(population: Sequence[int] | np.ndarray, rate: float, seed: int, round_: int) -> np.ndarray:
    """Each user independently with probability `rate` (the sampling DP amplification assumes)."""
    pop = np.asarray(population, dtype=np.int64)
    rng = np.random.default_rng([seed, round_, 0x9015])
    return np.sort(pop[rng.random(len(pop)) < rate])


def cyclic_groups(population: Sequence[int] | np.ndarray, groups: int, seed: int) -> list[np.ndarray]:
    """A seeded split of the population into `groups` near-equal groups (sorted ids each)."""
    pop = np.random.default_rng([seed, 0xC1C]).permutation(np.asarray(population, dtype=np.int64))
    return [np.sort(g) for g in np.array_split(pop, groups)]


def assign_silos(population: Sequence[int] | np.ndarray, num_silos: int, seed: int) -> list[np.ndarray]:
    """Seeded split of the private users into `num_silos` near-equal silos (sorted ids each)."""
    pop = np.random.default_rng([seed, 0x5110]).permutation(np.asarray(population, dtype=np.int64))
    return [np.sort(s) for s in np.array_split(pop, min(num_silos, len(pop)))]


def seeded_sample(population: Sequence[int] | np.ndarray, size: int, seed: int, tag: int) -> np.ndarray:
    """A seeded sample of `size` users (sorted), or everyone when that is 0 or covers the
    population; `tag` keeps each purpose's sample apart from the others'."""
    pop = np.asarray(population, dtype=np.int64)
    if not 0 < size < len(pop):
        return pop
    return np.sort(np.random.default_rng([seed, tag]).choice(pop, size, replace=False))


def validation_users(population: Sequence[int] | np.ndarray, eval_users: int, seed: int) -> np.ndarray:
    """The users whose validation item picks the best round (or epoch): a seeded sample of
    `eval_users`, or everyone when that is 0 or covers the population."""
    return seeded_sample(population, eval_users, seed, 0xE7A1)


def test_users(population: Sequence[int] | np.ndarray, sample: int, seed: int) -> np.ndarray:
    """The users whose test item scores the run: a seeded sample of `sample` (drawn apart
    from the validation sample), or everyone when that is 0 or covers the population. On a
    large population the sample's bootstrap interval states what the sampling costs."""
    return seeded_sample(population, sample, seed, 0x7E57)
