"""The canary audit: its estimators on known laws, and on real runs that it must pass or fail."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import fedrec.privacy.mechanism as mechanism
from fedrec.config import ConfigError, FedRecConfig
from fedrec.inprocess import run_in_process
from fedrec.privacy.audit import (
    CANARY_ID_BASE, CanarySet, audit_p_value, gaussian_pair_delta, one_run_lower_bound, one_shot_estimate,
)  # fmt: skip


def _gdp_delta(eps: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism with sensitivity/σ = μ (Dong, Roth, Su 2019, Cor. 2.13)."""
    return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.05, 4.0), st.floats(0.0, 8.0), st.floats(1e-3, 10.0))
def test_equal_variance_gaussians_give_the_gaussian_mechanisms_curve(mu, eps, scale):
    got = gaussian_pair_delta(eps, mu * scale, scale, scale)
    assert got == pytest.approx(max(_gdp_delta(eps, mu), 0.0), rel=1e-6, abs=1e-12)


def test_a_wider_alternative_leaks_more_than_the_equal_variance_one():
    assert gaussian_pair_delta(2.0, 1.0, 1.5, 1.0) > gaussian_pair_delta(2.0, 1.0, 1.0, 1.0)


def test_the_one_shot_estimate_recovers_a_known_gaussian_mechanism():
    d, mu = 10_000, 1.0  # included cosines ~ N(μ/√d, 1/d): the μ-GDP mechanism
    scores = np.random.default_rng(0).normal(mu / d**0.5, d**-0.5, 200_000)
    est = one_shot_estimate(scores, d, 1e-5)["epsilon_estimate"]
    exact = next(e for e in np.arange(0, 10, 0.001) if _gdp_delta(e, mu) <= 1e-5)
    assert est == pytest.approx(exact, abs=0.1)


def test_without_delta_the_p_value_is_the_binomial_tail():
    for eps in (0.0, 1.0, 3.0):
        p = 1 / (1 + math.exp(-eps))
        assert audit_p_value(100, 40, 30, eps, 0.0) == pytest.approx(stats.binom.sf(29, 40, p))
    assert audit_p_value(100, 40, 30, 1.0, 1e-3) > audit_p_value(100, 40, 30, 1.0, 0.0)


def test_random_scores_give_no_bound_and_perfect_ones_reach_the_ceiling():
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    assert one_run_lower_bound(rng.normal(size=1000), included, 1e-5)["epsilon_lower_bound"] < 0.5
    perfect = one_run_lower_bound(included + rng.normal(0, 0.01, 1000), included, 1e-5)
    assert perfect["epsilon_lower_bound"] == pytest.approx(perfect["ceiling"]) and perfect["ceiling"] > 4
    assert perfect["correct"] == perfect["guesses"]


def test_canary_updates_are_seeded_unit_directions_scaled_to_the_clip():
    import torch

    canaries = CanarySet(8, seed=3, shapes={"b": (4, 5), "a": (3,)})
    assert canaries.dimension == 23 and canaries.keys == ["a", "b"]
    again = CanarySet(8, seed=3, shapes={"a": (3,), "b": (4, 5)})
    assert torch.equal(canaries.direction(5), again.direction(5)) and np.array_equal(canaries.included, again.included)
    assert not torch.equal(canaries.direction(5), canaries.direction(6))
    total = canaries.update_sum(np.array([CANARY_ID_BASE + 2]), 0.7)
    assert total.num_users == 1 and total.num_clipped == 0
    flat = canaries.flatten(total.delta)
    assert float(flat.norm()) == pytest.approx(0.7, rel=1e-6)
    assert float(flat @ canaries.direction(2)) == pytest.approx(0.7, rel=1e-6)


def test_audit_config_rules():
    with pytest.raises(ConfigError, match="audit-canaries: needs clipping-norm"):
        FedRecConfig(audit_canaries=100)
    FedRecConfig(audit_canaries=100, clipping_norm=1.0)


# ---------------------------------------------------------------- real runs
AUDITED = dict(
    synthetic_users=200, synthetic_items=60, synthetic_clusters=4, synthetic_mean_length=12, public_fraction=0.25,
    hidden_size=32, num_heads=2, num_blocks=1, max_seq_len=20, pretrain_epochs=5, bootstrap_samples=0, eval_every=0,
    clipping_norm=1.0, server_optimizer="sgd", server_learning_rate=1.0, local_epochs=1, num_rounds=20,
    cohort_size=150, sampling="poisson", target_delta=1e-5, audit_canaries=1000,
)  # fmt: skip


def _audited(tmp_path, cache, noise_factor: float = 1.0, **changes) -> tuple[dict, dict]:
    """A whole run through the in-process port (real training, the real mechanism); its
    summary and audit.json."""
    cfg = FedRecConfig(cache_dir=str(cache), output_dir=str(tmp_path / "out"), **AUDITED).replace(**changes)
    out = tmp_path / "out" / f"{changes}-{noise_factor}"
    old, mechanism._TEST_NOISE_FACTOR = mechanism._TEST_NOISE_FACTOR, noise_factor
    try:
        summary = run_in_process(cfg, out, log=lambda _m: None)
    finally:
        mechanism._TEST_NOISE_FACTOR = old
    return summary, json.loads((out / "audit.json").read_text())


def test_the_audit_flags_a_run_without_noise(tmp_path, shared_cache):
    summary, record = _audited(tmp_path, shared_cache)
    assert summary.epsilon is None and summary.audit["epsilon_lower_bound"] == record["epsilon_lower_bound"]
    # Canaries are sampled but never evaluated or counted as users.
    assert summary.private_users == 150 and record["sampled_population"] == 150 + record["included"]
    assert record["epsilon_lower_bound"] > 2.0  # above every honest DP run's claim at ε = 1 below
    assert record["epsilon_estimate"] > 20.0  # far above any ε claimed in this file (≤ 8)
    unseen = record["one_shot"]
    assert abs(unseen["unseen_mean"]) < 4 * unseen["null_std"] / (record["canaries"] - record["included"]) ** 0.5
    assert unseen["unseen_std"] == pytest.approx(unseen["null_std"], rel=0.15)  # unseen directions: ≈ N(0, 1/d)


def test_the_audit_flags_a_mechanism_that_adds_half_the_noise_it_accounts(tmp_path, shared_cache):
    _summary, record = _audited(tmp_path, shared_cache, noise_factor=0.5, target_epsilon=4.0)
    assert record["claimed_epsilon"] == pytest.approx(4.0, abs=0.01)
    assert max(record["epsilon_lower_bound"], record["epsilon_estimate"]) > record["claimed_epsilon"]


@pytest.mark.parametrize("epsilon", [1.0, 4.0, 8.0])
def test_honest_runs_stay_within_their_epsilon(tmp_path, shared_cache, epsilon):
    summary, record = _audited(tmp_path, shared_cache, target_epsilon=epsilon)
    assert summary.epsilon == pytest.approx(epsilon, abs=0.01)
    assert 0 <= record["epsilon_lower_bound"] <= summary.epsilon
