"""Banded Toeplitz matrix factorizations of the prefix-sum workload (DP-FTRL's noise).

A run's server sees the rounds' sums x_1..x_T and consumes their prefix sums A·x (A the
lower-triangular matrix of ones: SGD's iterates, or any optimizer fed from them). A
factorization A = B·C releases C·x + N(0, σ²) and reconstructs B·(C·x + noise) = A·x +
B·noise; in a round that is the sum x_t plus the correlated noise w_t = (C⁻¹·ζ)_t
(Kairouz et al., ICML 2021; Choquette-Choo et al., NeurIPS 2023, "banded matrix
factorization"). Here C is lower-triangular banded Toeplitz with coefficients c_0 = 1,
c_1..c_{b-1}, so that w_t = ζ_t − Σ_{k≥1} c_k·w_{t−k}: the noise state is the last b−1
noise vectors. b = 1 is C = I: independent Gaussian noise, today's DP-FedAvg.

The privacy of C·x + N(0, σ²) is that of one Gaussian mechanism with the L2
sensitivity of C·x to one user, which depends on when a user takes part:
- `all`: every user in every round; one user moves every column of x by up to C, so the
  sensitivity is sup ‖Σ_t C[:, t]·u_t‖ over ‖u_t‖ ≤ 1, at most √(Σ_{s,t} |(CᵀC)_{st}|)
  (equal to it when C ≥ 0, as the coefficients here are kept);
- `cyclic` with k groups: a user's rounds are those of its group, k apart; the same bound
  over that group's columns, the largest over groups.
Written here rather than taken from a library: Flower has no matrix mechanism, and
pfl-research's and jax_privacy's optimize general banded matrices with their own
stacks (TensorFlow, JAX); the Toeplitz case needs only the b coefficients below.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize
from scipy.signal import lfilter


def inverse_coefficients(c: np.ndarray, length: int) -> np.ndarray:
    """The first `length` coefficients of C⁻¹ (lower-triangular Toeplitz too)."""
    impulse = np.zeros(length)
    impulse[0] = 1.0
    return lfilter([1.0], np.asarray(c, dtype=np.float64), impulse)


def toeplitz(c: np.ndarray, rounds: int) -> np.ndarray:
    """The T×T lower-triangular banded Toeplitz matrix of coefficients c (for tests and checks)."""
    out = np.zeros((rounds, rounds))
    for k, ck in enumerate(np.asarray(c, dtype=np.float64)[:rounds]):
        out += np.diag(np.full(rounds - k, ck), -k)
    return out


def participations(kind: str, rounds: int, groups: int = 1) -> list[np.ndarray]:
    """The 0-based rounds each class of user takes part in."""
    if kind == "all":
        return [np.arange(rounds)]
    if kind == "cyclic":
        return [np.arange(g, rounds, groups) for g in range(min(groups, rounds))]
    raise ValueError(f"participation: unknown {kind!r}; choose all or cyclic")


def sensitivity(c: np.ndarray, rounds: int, kind: str, groups: int = 1, released: int | None = None) -> float:
    """L2 sensitivity of the first `released` rows of C·x (default all T) to one user whose
    every contribution has norm ≤ 1.

    With c ≥ 0 every entry of CᵀC is ≥ 0, so the bound √Σ|CᵀC| over a user's columns is
    attained (all contributions in one direction) and sums in closed form: under `all`
    it is ‖C·1‖; under `cyclic` with the band within the separation a user's columns do not
    overlap, so it is √(Σ of their squared norms).
    """
    c = np.asarray(c, dtype=np.float64)
    if (c < 0).any():
        raise ValueError("banded factorization: coefficients must be >= 0")
    released = rounds if released is None else min(released, rounds)
    b = len(c)
    if kind == "all":
        row_sums = np.cumsum(c)[np.minimum(np.arange(released), b - 1)]
        return float(np.sqrt(np.sum(row_sums**2)))
    if b > groups:
        raise ValueError(f"banded factorization: {b} bands exceed the cyclic separation of {groups} rounds")
    sq = np.cumsum(c**2)
    col = sq[np.minimum(b - 1, released - 1 - np.arange(released))]  # column t's squared norm in the released rows
    return float(np.sqrt(max(col[p[p < released]].sum() for p in participations(kind, rounds, groups))))


def prefix_noise(c: np.ndarray, rounds: int) -> np.ndarray:
    """‖row t of B = A·C⁻¹‖ for t = 1..T: the noise std on the t-th prefix sum per unit σ."""
    beta = np.cumsum(inverse_coefficients(c, rounds))
    return np.sqrt(np.cumsum(beta**2))


def round_noise(c: np.ndarray, rounds: int) -> np.ndarray:
    """‖row t of C⁻¹‖ for t = 1..T: the noise std on round t's sum per unit σ."""
    return np.sqrt(np.cumsum(inverse_coefficients(c, rounds) ** 2))


def loss(c: np.ndarray, rounds: int, kind: str, groups: int = 1) -> float:
    """Total squared error of the T prefix sums per unit noise multiplier: ‖B‖_F²·sens²."""
    return float(np.sum(prefix_noise(c, rounds) ** 2)) * sensitivity(c, rounds, kind, groups) ** 2


def optimal_bands(rounds: int, bands: int, kind: str, groups: int = 1) -> np.ndarray:
    """Coefficients (c_0 = 1, the rest ≥ 0) of the banded Toeplitz C minimizing `loss`
    for this run's rounds and participation; b = 1 is the identity."""
    bands = max(1, min(bands, rounds))
    if kind == "cyclic":
        bands = min(bands, max(1, groups))  # a band within the separation: a user's columns stay orthogonal
    if bands == 1:
        return np.ones(1)

    def objective(tail: np.ndarray) -> float:
        return math.log(loss(np.concatenate([[1.0], tail]), rounds, kind, groups))

    start = np.array([math.exp(math.lgamma(k + 0.5) - math.lgamma(k + 1) - 0.5 * math.log(math.pi)) for k in
                      range(1, bands)])  # the square root of A's coefficients, truncated  # fmt: skip
    best = minimize(objective, start, method="L-BFGS-B", bounds=[(0.0, None)] * (bands - 1))
    tail = best.x if best.fun <= objective(start) else start
    c = np.concatenate([[1.0], tail])
    kept = np.nonzero(c > 1e-9)[0]
    return c[: kept[-1] + 1]  # trailing zero bands are no bands: all-zero is the identity
