import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from fedrec.config import ConfigError, FedRecConfig
from fedrec.aggregate import UpdateSum
from fedrec.privacy.accountant import REGISTRY, RoundEvent, UserLevelAccountant, calibrate_noise, make_accountant
from fedrec.privacy.mechanism import add_gaussian_noise
from fedrec.run import make_mechanism, make_sampler


def _mechanism(cfg, population):
    return make_mechanism(cfg, make_sampler(cfg, np.arange(population)), log=lambda _m: None)


def _sum(delta, users=0, clipped=0):
    return UpdateSum(delta=delta, num_users=users, weight=float(users), num_clipped=clipped)


def test_the_config_names_exactly_the_registered_accountants():
    from fedrec.config import ACCOUNTANTS

    assert set(ACCOUNTANTS) == {"auto", *REGISTRY}
    for kind, cls in REGISTRY.items():
        assert isinstance(make_accountant(kind, "poisson", 100, 1e-3), cls) and issubclass(cls, UserLevelAccountant)


def _events(n, q=0.01, z=1.0, m=100):
    return [RoundEvent(r + 1, q, z, 1.0, m) for r in range(n)]


def test_noise_std_is_z_times_c():
    z, c = 1.3, 0.7
    zeros = {"a": torch.zeros(30_000), "b": torch.zeros(100, 200)}
    noised = add_gaussian_noise(zeros, z * c, seed=3, round_=5)
    flat = torch.cat([v.flatten() for v in noised.values()]).double()
    # 50k samples: the std estimate is within ~0.6% (1 sd); a factor sqrt(2) or m is far out.
    assert abs(float(flat.std()) / (z * c) - 1) < 0.03
    assert abs(float(flat.mean())) < 0.03 * z * c
    again = add_gaussian_noise(zeros, z * c, seed=3, round_=5)
    assert all(torch.equal(again[k], noised[k]) for k in noised)
    other = add_gaussian_noise(zeros, z * c, seed=3, round_=6)
    assert not torch.equal(other["a"], noised["a"])


@pytest.mark.parametrize("kind", ["pld", "rdp", "prv"])
def test_epsilon_grows_with_rounds_and_shrinks_with_noise(kind):
    acc = make_accountant(kind, "poisson", 10_000, 1e-5)
    eps_rounds = [acc.epsilon(_events(n)) for n in (1, 10, 100, 500)]
    assert eps_rounds == sorted(eps_rounds) and eps_rounds[0] < eps_rounds[-1]
    eps_noise = [acc.epsilon(_events(100, z=z)) for z in (0.7, 1.0, 2.0, 4.0)]
    assert eps_noise == sorted(eps_noise, reverse=True) and eps_noise[-1] < eps_noise[0]


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε of one Gaussian mechanism (sensitivity 1), Balle & Wang (ICML 2018), Thm 8."""

    def delta_of(eps):
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z", [0.8, 1.5, 3.0])
def test_one_round_with_q_one_is_the_analytic_gaussian(z):
    acc = make_accountant("pld", "poisson", 1000, 1e-5)
    eps = acc.epsilon([RoundEvent(1, 1.0, z, 1.0, 1000)])
    assert eps == pytest.approx(_analytic_gaussian_epsilon(z, 1e-5), rel=0.01)


@settings(max_examples=10, deadline=None)
@given(st.floats(0.001, 0.2), st.floats(0.6, 5.0), st.integers(1, 300))
def test_pld_never_above_rdp(q, z, rounds):
    events = _events(rounds, q=q, z=z)
    pld = make_accountant("pld", "poisson", 10_000, 1e-5).epsilon(events)
    rdp = make_accountant("rdp", "poisson", 10_000, 1e-5).epsilon(events)
    assert pld <= rdp * 1.001


def test_ledger_restores_exactly():
    acc = make_accountant("pld", "poisson", 5000, 2e-4)
    for e in _events(7, q=0.02, z=1.1):
        acc.record(e)
    restored = UserLevelAccountant.from_dict(acc.to_dict())
    assert restored.epsilons == acc.epsilons and restored.events == acc.events
    nxt = RoundEvent(8, 0.02, 1.1, 1.0, 100)
    assert restored.record(nxt) == acc.record(nxt)


def test_pld_with_the_cached_round_equals_dp_accountings_own_pld_accountant():
    import dp_accounting as dpa
    from dp_accounting import pld

    ledger = _events(5, q=0.06, z=0.55) + _events(7, q=0.03, z=1.2) + _events(3, q=0.06, z=0.55)
    acc = make_accountant("pld", "poisson", 1000, 1e-3)
    # One reference, composed event by event as before and read at each prefix: the same
    # compositions in the same order as a fresh reference per prefix, built once.
    reference, composed = pld.PLDAccountant(), 0
    for n in (1, 5, 12, 15):  # the later calls reuse the cached one-round PLDs
        for e in ledger[composed:n]:
            reference.compose(dpa.PoissonSampledDpEvent(e.q, dpa.GaussianDpEvent(e.noise_multiplier)))
        composed = n
        assert acc.epsilon(ledger[:n]) == pytest.approx(reference.get_epsilon(1e-3), rel=1e-9)
    assert acc.epsilon(_events(3, q=0.06, z=0.0)) == math.inf


def test_calibration_lands_on_the_target():
    def new():
        return make_accountant("pld", "poisson", 20_000, 5e-5)

    z = calibrate_noise(4.0, 200, new, 0.0128, 256)
    eps = new().epsilon(_events(200, q=0.0128, z=z, m=256))
    assert eps <= 4.0
    assert new().epsilon(_events(200, q=0.0128, z=z * 0.99, m=256)) > 4.0 * 0.99


def test_fixed_size_sampling_uses_rdp_with_replace_one():
    acc = make_accountant("auto", "fixed", 1000, 1e-5)
    assert acc.kind == "rdp"
    # Replace-one doubles the sensitivity of a sum: never cheaper than Poisson at the same rate.
    poisson = make_accountant("rdp", "poisson", 1000, 1e-5).epsilon(_events(50, q=0.05, m=50))
    assert acc.epsilon(_events(50, q=0.05, m=50)) > poisson
    with pytest.raises(ValueError, match="fixed-size"):
        make_accountant("pld", "fixed", 1000, 1e-5)


def test_private_mean_divides_by_the_expected_cohort_whoever_came():
    cfg = FedRecConfig(sampling="poisson", noise_multiplier=1.0, clipping_norm=1.0, cohort_size=50)
    mech = _mechanism(cfg, 1000)
    total = {"w": torch.ones(10) * 7.0}
    a = mech.privatize(_sum(total, users=3), total, round_=1)
    b = _mechanism(cfg, 1000).privatize(_sum(total, users=70), total, round_=1)
    torch.testing.assert_close(a["w"], b["w"])
    noise = add_gaussian_noise({"w": torch.zeros(10)}, 1.0, seed=0, round_=1)["w"]
    torch.testing.assert_close(a["w"], (7.0 + noise) / 50)
    assert mech.accountant.spent > 0 and len(mech.accountant.events) == 1
    assert mech.delta == pytest.approx(1e-3)


def test_noise_goes_on_when_poisson_sampling_drew_nobody():
    cfg = FedRecConfig(sampling="poisson", noise_multiplier=1.0, clipping_norm=1.0, cohort_size=50)
    out = _mechanism(cfg, 1000).privatize(UpdateSum(), {"w": torch.zeros(8)}, round_=1)
    expected = add_gaussian_noise({"w": torch.zeros(8)}, 1.0, seed=0, round_=1)["w"] / 50
    torch.testing.assert_close(out["w"], expected)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"noise-multiplier": 1.0}, "clipping-norm"),
        ({"noise-multiplier": 1.0, "clipping-norm": 1.0, "user-weighting": "examples"}, "user-weighting"),
        ({"target-epsilon": 4.0, "noise-multiplier": 1.0, "clipping-norm": 1.0}, "target-epsilon"),
        ({"noise-multiplier": 1.0, "clipping-norm": 1.0, "accountant": "pld"}, "accountant"),
    ],
)
def test_dp_config_errors(overrides, key):
    with pytest.raises(ConfigError) as err:
        FedRecConfig.from_mapping(overrides)
    assert str(err.value).startswith(key + ":")


def test_poisson_cohorts_have_the_right_rate():
    from fedrec.cohort import sample_poisson

    sizes = [len(sample_poisson(np.arange(2000), 0.05, 0, r)) for r in range(200)]
    assert abs(np.mean(sizes) - 100) < 3 and np.std(sizes) > 5


def test_adaptive_clipping_noises_with_the_clip_it_applied():
    cfg = FedRecConfig(
        sampling="poisson", noise_multiplier=1.0, clipping_norm=1.0, cohort_size=100, adaptive_clipping=True
    )
    mech = _mechanism(cfg, 2000)
    sigma_b = 100 / 20
    assert mech.adaptive.count_stddev == sigma_b
    assert mech.update_noise_multiplier ** -2 + (2 * sigma_b) ** -2 == pytest.approx(1.0)
    zeros = {"w": torch.zeros(1000)}
    for rnd in (1, 2, 3):
        applied = mech.clipping_norm
        out = mech.privatize(_sum(zeros, users=100, clipped=0), zeros, round_=rnd)  # everyone under the clip
        expected = add_gaussian_noise(zeros, mech.update_noise_multiplier * applied, seed=0, round_=rnd)
        torch.testing.assert_close(out["w"], expected["w"] / 100)
        assert mech.accountant.events[-1].clipping_norm == applied
        assert mech.clipping_norm < applied  # so the clip shrinks for the next round
    assert [e.noise_multiplier for e in mech.accountant.events] == [1.0] * 3  # ε is charged at z


def test_adaptive_clip_tracks_the_target_quantile_without_dp():
    cfg = FedRecConfig(clipping_norm=5.0, adaptive_clipping=True, clip_quantile=0.3, clip_learning_rate=0.2)
    mech = _mechanism(cfg, 1000)
    assert not mech.enabled
    rng = np.random.default_rng(0)
    zeros = {"w": torch.zeros(3)}
    for rnd in range(400):
        norms = rng.lognormal(0.0, 0.5, size=200)
        mech.privatize(_sum(zeros, users=200, clipped=int((norms > mech.clipping_norm).sum())), zeros, round_=rnd)
    assert mech.clipping_norm == pytest.approx(np.exp(0.5 * norm.ppf(0.3)), rel=0.1)


def test_server_noise_on_the_mean_has_std_z_c_over_m():
    z, c, m = 1.3, 0.7, 40
    cfg = FedRecConfig(sampling="poisson", noise_multiplier=z, clipping_norm=c, cohort_size=m, seed=1)
    zeros = {"w": torch.zeros(60_000)}
    mean = _mechanism(cfg, 4000).privatize(_sum(zeros), zeros, round_=1)["w"].double()
    # The mean's noise is z·C/m per coordinate; √2, m or C mistakes are all far outside 3%.
    assert abs(float(mean.std()) / (z * c / m) - 1) < 0.03


def _exact_bisection(target, rounds, new, q, m, lo=0.05, hi=500.0):
    """The plain bisection on the accountant's own ε that calibration must agree with."""
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if new().epsilon(_events(rounds, q=q, z=mid, m=m)) <= target:
            hi = mid
        else:
            lo = mid
    return hi


@pytest.mark.parametrize("target,q", [(0.5, 0.05), (1.5, 0.1)])
def test_calibration_with_predicted_steps_equals_the_exact_bisection(monkeypatch, target, q):
    """The bisection on cheaper PLDs, once checked, gives exactly the exact bisection's z;
    where its check fails (forced here with a useless 0.5 discretization), the exact runs."""
    from fedrec.privacy import accountant

    made = []

    def new():
        made.append(1)
        return make_accountant("pld", "poisson", 5000, 1e-5)

    exact = _exact_bisection(target, 30, new, q, 100)
    made.clear()
    assert calibrate_noise(target, 30, new, q, 100) == exact
    assert len(made) <= 4  # the bound at hi, the kind, the final bracket's two ends
    made.clear()
    monkeypatch.setattr(accountant, "_PREDICT_INTERVAL", 0.5)
    assert calibrate_noise(target, 30, new, q, 100) == exact
    assert len(made) > 10  # the check failed and the exact bisection ran


def test_epsilon_composed_ahead_equals_epsilon_composed_when_asked():
    from fedrec.privacy import accountant

    planned = _events(6, q=0.03, z=0.9, m=100)
    ahead = make_accountant("pld", "poisson", 4000, 1e-5)
    ahead.record(planned[0])
    ahead.compose_ahead(planned[1:])
    got = [ahead.record(e) for e in planned[1:]]
    for k, eps in enumerate(got, start=2):  # the same function, so the same float
        assert eps == accountant._pld_epsilon(((0.03, 0.9, k),), 1e-5)
        assert (((0.03, 0.9, k),), 1e-5) in accountant._AHEAD._done  # it did come from the thread


def test_a_run_stopped_early_does_not_wait_for_the_rounds_composed_ahead():
    import subprocess
    import sys

    code = (
        "from fedrec.privacy.accountant import RoundEvent, make_accountant\n"
        "acc = make_accountant('pld', 'poisson', 4000, 1e-5)\n"
        "acc.compose_ahead([RoundEvent(r, 0.05, 0.6, 1.0, 200) for r in range(1, 2001)])\n"
        "print(acc.epsilon([RoundEvent(1, 0.05, 0.6, 1.0, 200)]))\n"
    )  # 2,000 queued ledgers at ~0.2 s each: joining the thread at exit would take minutes
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 0


def test_a_process_exits_cleanly_while_ledgers_are_composed_ahead():
    """Queued ε compositions are dropped at exit and the one in progress is waited for: a
    daemon thread inside SciPy's FFT during finalization once aborted a finished run."""
    import subprocess
    import sys

    code = ("import time\nfrom fedrec.privacy import accountant as a\n"
            "a._AHEAD.submit([(((0.13, 0.8, n),), 1e-3) for n in range(1, 400)])\ntime.sleep(0.3)\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_stored_calibration_is_taken_by_a_later_process_and_only_for_the_same_inputs(monkeypatch, tmp_path):
    """The file stands in for a later process (the memory is cleared); other inputs, or an
    unreadable file, calibrate again."""
    from fedrec.privacy import accountant

    store = tmp_path / "noise-calibrations.json"

    def new():
        return make_accountant("pld", "poisson", 5000, 1e-5)

    monkeypatch.setattr(accountant, "_FROM_STORE", set())
    z = calibrate_noise(1.0, 20, new, 0.04, 200, store=store)
    assert not accountant.stored_calibration(1.0, 20, new, 0.04, 200)  # this process calibrated it
    monkeypatch.setattr(accountant, "_CALIBRATED", {})
    calls = []
    real = accountant._calibrate
    monkeypatch.setattr(accountant, "_calibrate", lambda *a: calls.append(a) or real(*a))
    assert calibrate_noise(1.0, 20, new, 0.04, 200, store=store) == z and not calls
    assert accountant.stored_calibration(1.0, 20, new, 0.04, 200)  # a later process read it
    z2 = calibrate_noise(2.0, 20, new, 0.04, 200, store=store)
    assert len(calls) == 1 and z2 < z
    assert not accountant.stored_calibration(2.0, 20, new, 0.04, 200)
    monkeypatch.setattr(accountant, "_CALIBRATED", {})
    store.write_text("{not json")
    assert calibrate_noise(1.0, 20, new, 0.04, 200, store=store) == z and len(calls) == 2


def test_a_calibration_started_ahead_is_the_one_the_mechanism_takes(monkeypatch, tmp_path):
    """The server starts the calibration while its nodes start; the mechanism built after
    waits for it (forced here: the thread is held inside its calibration) and does not
    calibrate a second time."""
    import threading

    from fedrec.privacy import accountant
    from fedrec.run import calibrate_ahead

    monkeypatch.setattr(accountant, "_CALIBRATED", {})
    entered, release, calls = threading.Event(), threading.Event(), []
    real = accountant._calibrate

    def held(*a):
        calls.append(threading.current_thread().name)
        entered.set()
        release.wait(30)
        return real(*a)

    monkeypatch.setattr(accountant, "_calibrate", held)
    cfg = FedRecConfig(sampling="poisson", target_epsilon=2.0, clipping_norm=1.0, cohort_size=200, num_rounds=20,
                       cache_dir=str(tmp_path))  # fmt: skip
    thread = calibrate_ahead(cfg, 5000)
    assert thread is not None and entered.wait(30)
    threading.Timer(0.2, release.set).start()
    mech = _mechanism(cfg, 5000)  # waits for the thread's z
    thread.join(30)
    assert calls == ["fedrec-calibrate-ahead"]
    assert mech.noise_multiplier == calibrate_noise(2.0, 20, lambda: make_accountant("pld", "poisson", 5000, 1 / 5000),
                                                    200 / 5000, 200)  # fmt: skip
    assert calibrate_ahead(cfg.replace(target_epsilon=0.0, noise_multiplier=1.0), 5000) is None  # nothing to calibrate
