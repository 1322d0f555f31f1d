"""The server's cohort draw and the routing of cohort users to worker nodes.

The server draws users itself from a seeded RNG (DESIGN.md fact 3): Flower's node
sampling is not reproducible and knows nothing of privacy amplification.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_cohort(population: Sequence[int] | np.ndarray, size: int, seed: int, round_: int) -> np.ndarray:
    """Uniform draw without replacement of min(size, N) users for one round, sorted."""
    pop = np.asarray(population, dtype=np.int64)
    rng = np.random.default_rng([seed, round_, 0xC0407])
    k = min(size, len(pop))
    return np.sort(rng.choice(pop, size=k, replace=False))


def split_among(users: Sequence[int] | np.ndarray, num_workers: int) -> list[np.ndarray]:
    """Contiguous, near-equal shares; empty shares are dropped."""
    return [s for s in np.array_split(np.asarray(users, dtype=np.int64), num_workers) if len(s)]


def sample_poisson(population: Sequence[int] | np.ndarray, rate: float, seed: int, round_: int) -> np.ndarray:
    """Each user independently with probability `rate` (the sampling DP amplification assumes)."""
    pop = np.asarray(population, dtype=np.int64)
    rng = np.random.default_rng([seed, round_, 0x9015])
    return np.sort(pop[rng.random(len(pop)) < rate])


def assign_silos(population: Sequence[int] | np.ndarray, num_silos: int, seed: int) -> list[np.ndarray]:
    """Seeded split of the private users into `num_silos` near-equal silos (sorted ids each)."""
    pop = np.random.default_rng([seed, 0x5110]).permutation(np.asarray(population, dtype=np.int64))
    return [np.sort(s) for s in np.array_split(pop, min(num_silos, len(pop)))]


def validation_users(population: Sequence[int] | np.ndarray, eval_users: int, seed: int) -> np.ndarray:
    """The users whose validation item picks the best round (or epoch): a seeded sample of
    `eval_users`, or everyone when that is 0 or covers the population."""
    pop = np.asarray(population, dtype=np.int64)
    if not 0 < eval_users < len(pop):
        return pop
    return np.sort(np.random.default_rng([seed, 0xE7A1]).choice(pop, eval_users, replace=False))
