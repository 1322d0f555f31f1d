"""Full and cyclic participation with (correlated) noise, the signal-to-noise meter, and a
headline that stays inside the privacy guarantee."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fedrec.aggregate import UpdateSum
from fedrec.cohort import CohortSampler
from fedrec.config import ConfigError, FedRecConfig
from fedrec.privacy import factorization as mf
from fedrec.privacy.accountant import calibrate_gaussian, gaussian_epsilon, make_accountant
from fedrec.privacy.mechanism import BandedMatrixFactorization, GaussianUserLevel
from fedrec.privacy.snr import Meter, agreement

DELTA = 1e-5


def balle_wang_epsilon(z: float, delta: float) -> float:
    """ε of the Gaussian mechanism from its exact δ(ε) (Balle & Wang, ICML 2018, Thm. 8),
    by bisection with scipy's normal CDF: independent of dp-accounting's PLD."""
    lo, hi = 0.0, 200.0
    for _ in range(200):
        eps = (lo + hi) / 2
        d = norm.cdf(-eps * z + 1 / (2 * z)) - math.exp(eps) * norm.cdf(-eps * z - 1 / (2 * z))
        lo, hi = (eps, hi) if d > delta else (lo, eps)
    return hi


def _sum(shape=(3, 4), users=10, seed=0) -> UpdateSum:
    g = torch.Generator().manual_seed(seed)
    return UpdateSum(delta={"w": torch.randn(shape, generator=g), "v": torch.randn(5, generator=g)}, num_users=users,
                     weight=float(users))  # fmt: skip


def test_one_band_is_todays_gaussian_noise_and_epsilon():
    rounds, users, clip = 6, 50, 0.5
    z_star = calibrate_gaussian(4.0, DELTA)
    mfm = BandedMatrixFactorization(np.ones(1), z_star, clip, rounds, "all", 1, users, users, DELTA, seed=7)
    assert mfm.sens == pytest.approx(math.sqrt(rounds))
    gauss = GaussianUserLevel(z_star * math.sqrt(rounds), clip, 1.0, users, make_accountant("pld", "poisson", users, DELTA),
                              seed=7)  # fmt: skip
    for rnd in range(1, rounds + 1):
        total = _sum(seed=rnd)
        a = mfm.privatize(total, total.delta, rnd)
        b = gauss.privatize(total, total.delta, rnd)
        for k in a:
            assert torch.equal(a[k], b[k]), k  # the very same draws
    # Six rounds of the Gaussian composed (PLD) against one Gaussian at z*: the same mechanism.
    assert mfm.report(1).epsilon == pytest.approx(gauss.report(1).epsilon, rel=2e-3)
    assert mfm.report(1).epsilon == pytest.approx(4.0, abs=0.01)


def test_epsilon_equals_an_independent_computation_after_every_round():
    c = mf.optimal_bands(12, 4, "cyclic", 4)
    z = 0.9
    mech = BandedMatrixFactorization(c, z, 1.0, 12, "cyclic", 4, 10.0, 40, DELTA, seed=0)
    cmat = mf.toeplitz(c, 12)
    for t in (1, 4, 5, 12):
        # the sensitivity of the released rows, by brute force over each group's columns
        gram = cmat[:t].T @ cmat[:t]
        sens_t = max(math.sqrt(gram[np.ix_(p, p)].sum()) for p in mf.participations("cyclic", 12, 4))
        assert mf.sensitivity(c, 12, "cyclic", 4, released=t) == pytest.approx(sens_t)
        expected = balle_wang_epsilon(z * mech.sens / sens_t, DELTA)
        assert mech.epsilon_at(t) == pytest.approx(expected, rel=5e-3)  # PLD's discretization: a hair above
        assert mech.epsilon_at(t) >= expected - 1e-9
    assert gaussian_epsilon(calibrate_gaussian(8.0, DELTA), DELTA) <= 8.0


def test_every_round_sensitivity_is_the_norm_of_the_row_sums():
    c = np.array([1.0, 0.6, 0.3])
    cmat = mf.toeplitz(c, 9)
    assert mf.sensitivity(c, 9, "all") == pytest.approx(math.sqrt((cmat.T @ cmat).sum()))
    with pytest.raises(ValueError, match="exceed the cyclic separation"):
        mf.sensitivity(c, 9, "cyclic", 2)


def test_prefix_sum_noise_matches_the_factorizations_closed_form():
    """Σ_{s≤t} w_s over 20,000 coordinates: its measured spread against σ·‖row t of A·C⁻¹‖."""
    rounds, groups = 12, 4
    c = mf.optimal_bands(rounds, 4, "cyclic", groups)
    assert len(c) == 4 and mf.loss(c, rounds, "cyclic", groups) < mf.loss(np.ones(1), rounds, "cyclic", groups)
    mech = BandedMatrixFactorization(c, 1.0, 1.0, rounds, "cyclic", groups, 1.0, 40, DELTA, seed=3)
    zero = UpdateSum(delta={"w": torch.zeros(20_000)}, num_users=1, weight=1.0)
    prefix = torch.zeros(20_000, dtype=torch.float64)
    closed = mech.noise_multiplier * mech.sens * mf.prefix_noise(c, rounds)
    for t in range(1, rounds + 1):
        prefix += mech.privatize(zero, zero.delta, t)["w"].double()
        assert float(prefix.std()) == pytest.approx(closed[t - 1], rel=0.03), t


def test_correlated_noise_cancels_over_the_rounds():
    """Banded noise on the running sum is far below independent noise of the same ε."""
    rounds, groups = 40, 8
    c = mf.optimal_bands(rounds, 8, "cyclic", groups)
    banded = mf.sensitivity(c, rounds, "cyclic", groups) * mf.prefix_noise(c, rounds)[-1]
    independent = mf.sensitivity(np.ones(1), rounds, "cyclic", groups) * mf.prefix_noise(np.ones(1), rounds)[-1]
    assert banded < 0.6 * independent
    # Every user in every round: the best non-negative band is the identity (nothing to cancel).
    assert mf.optimal_bands(rounds, 8, "all").tolist() == [1.0]


def test_cyclic_groups_are_fixed_disjoint_and_take_turns():
    sampler = CohortSampler("cyclic", np.arange(100, 203), 25, seed=1)
    assert sampler.groups == 4
    seen = [sampler.draw(r) for r in range(1, 9)]
    assert all(np.array_equal(seen[i], seen[i + 4]) for i in range(4))
    assert sorted(np.concatenate(seen[:4]).tolist()) == list(range(100, 203))
    assert sampler.q == 0.25 and sampler.per_round == pytest.approx(103 / 4)


def test_the_meter_finds_what_users_share_and_nothing_in_unrelated_directions():
    g = torch.Generator().manual_seed(0)
    dim, users = 4000, 400
    shared = torch.zeros(dim)
    shared[0] = 0.3
    for mu, expected in ((shared, 0.3), (torch.zeros(dim), 0.0)):
        total = UpdateSum()
        for _ in range(users):
            u = mu + torch.randn(dim, generator=g) / math.sqrt(dim)
            n = float(u.norm())
            clipped = u * min(1.0, 1.0 / n)
            total.add_user({"w": clipped}, 1.0, 0.0, n, n > 1.0, clipped_norm=min(n, 1.0))
        mean_norm, agreed = agreement(total, 1.0)
        assert mean_norm > 1 / math.sqrt(users) * 0.9  # the mean alone is never ~0
        clip_share = 1 / math.sqrt(1 + 0.3**2) if expected else 1.0
        assert agreed == pytest.approx(expected * clip_share, abs=0.02)
    meter = Meter()
    row = meter.round(total, 1.0, noise=0.5, noise_sum=0.5)
    assert set(row) == {"snr-mean-norm", "snr-agreed", "snr-noise", "snr-ratio", "snr-run"}


def test_full_participation_and_headline_rules_are_checked_before_any_work():
    with pytest.raises(ConfigError, match="banded-mf"):
        FedRecConfig(mechanism="banded-mf", sampling="poisson", target_epsilon=4.0, clipping_norm=1.0)
    with pytest.raises(ConfigError, match="model-selection"):
        FedRecConfig(model_selection="private", sampling="poisson", target_epsilon=4.0, clipping_norm=1.0)
    with pytest.raises(ConfigError, match="adaptive-clipping"):
        FedRecConfig(sampling="all", target_epsilon=4.0, clipping_norm=1.0, adaptive_clipping=True)
    FedRecConfig(mechanism="banded-mf", sampling="cyclic", target_epsilon=4.0, clipping_norm=1.0)
