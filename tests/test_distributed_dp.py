"""Distributed DP (noise-placement=devices): the devices' shares, the field, the ledger."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fedrec.aggregate import UpdateSum
from fedrec.config import ConfigError, FedRecConfig
from fedrec.privacy.accountant import RoundEvent, make_accountant
from fedrec.privacy.distributed import TOO_FEW, DistributedSkellam, SkellamAccountant, SkellamPlan, distributed_skellam


def _unit(rng: np.random.Generator, d: int, norm: float) -> np.ndarray:
    v = rng.normal(size=d)
    return v * norm / np.linalg.norm(v)


@pytest.fixture(scope="module")
def plan() -> SkellamPlan:
    return SkellamPlan.make(clipping_norm=0.5, dimension=3000, noise_multiplier=1.2, expected_users=10, dropout_margin=0.2)


def test_the_sum_of_the_device_shares_has_the_target_variance(plan):
    # 8 devices, 30 seeds: the decoded sum minus the true sum is the survivors' noise.
    n, errors = 8, []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        xs = [_unit(rng, plan.dimension, plan.clipping_norm) for _ in range(n)]
        field_sum = sum(plan.encode(x, rng) for x in xs)
        errors.append(plan.decode(field_sum) - np.sum(xs, axis=0))
    var = float(np.var(np.concatenate(errors)))
    assert var == pytest.approx(plan.noise_std(n) ** 2, rel=0.02)
    # The noise that protects one user, the other min_survivors − 1 devices', is z·Δ2 (over s).
    assert (plan.min_survivors - 1) * plan.device_variance == pytest.approx((plan.noise_multiplier * plan.l2_sensitivity) ** 2)
    assert plan.noise_std(plan.min_survivors - 1) >= plan.noise_multiplier * plan.clipping_norm


def test_quantization_error_is_bounded_and_reported(plan):
    quiet = dataclasses.replace(plan, device_variance=0.0)  # rounding alone
    rng = np.random.default_rng(0)
    xs = [_unit(rng, plan.dimension, plan.clipping_norm) for _ in range(6)]
    err = quiet.decode(sum(quiet.encode(x, rng) for x in xs)) - np.sum(xs, axis=0)
    assert 0 < np.abs(err).max() <= quiet.rounding_bound(6)
    assert abs(float(err.mean())) < 3 * quiet.rounding_bound(6) / math.sqrt(err.size)  # randomized rounding: unbiased
    # Rounding adds to the sensitivity the accountant uses, and the plan says by how much.
    assert plan.l2_sensitivity > plan.scale * plan.clipping_norm
    mech = DistributedSkellam(plan, 0.1, SkellamAccountant("poisson", 100, 1e-2, plan.l2_sensitivity, plan.l1_sensitivity), 0,
                              log=lambda _m: None)  # fmt: skip
    total = UpdateSum({"w": torch.from_numpy(np.sum(xs, axis=0)).float()}, num_users=plan.min_survivors)
    mech.privatize(total, {"w": torch.zeros(plan.dimension)}, 1)
    record = mech.privacy_record()
    assert record["rounding_bound_per_coordinate"] == pytest.approx(plan.rounding_bound(plan.min_survivors))
    assert record["sensitivity_inflation"] > 1


def test_the_field_wraps_only_out_of_range_and_sums_stay_exact(plan):
    # Every device's update along one axis: the worst case the scale was fitted for.
    x = np.zeros(plan.dimension)
    x[0] = plan.clipping_norm
    quiet = dataclasses.replace(plan, device_variance=0.0)
    rng = np.random.default_rng(1)
    got = quiet.decode(sum(quiet.encode(x, rng) for _ in range(plan.max_users)))
    assert got[0] == pytest.approx(plan.max_users * plan.clipping_norm, abs=quiet.rounding_bound(plan.max_users))
    assert plan.max_users * plan.field < 2**32  # SecAgg+'s weight factor must not wrap either


def test_an_unclipped_update_is_refused(plan):
    with pytest.raises(ValueError, match="not clipped"):
        plan.encode(np.full(plan.dimension, 1.0), np.random.default_rng(0))


def test_dropouts_within_the_margin_release_and_beyond_it_refuse_but_are_charged(plan):
    acc = SkellamAccountant("poisson", 100, 1e-2, plan.l2_sensitivity, plan.l1_sensitivity)
    mech = DistributedSkellam(plan, 0.1, acc, seed=0, log=lambda _m: None)
    template = {"w": torch.zeros(plan.dimension)}
    rng = np.random.default_rng(0)
    at_margin = UpdateSum({"w": torch.from_numpy(_unit(rng, plan.dimension, 0.5)).float()}, num_users=plan.min_survivors)
    assert mech.privatize(at_margin, template, 1) is not None
    eps_one = acc.spent
    short = UpdateSum(rejected={TOO_FEW: plan.min_survivors - 1}, encoded=True)
    assert mech.privatize(short, template, 2) is None
    assert acc.spent > eps_one and mech.privacy_record()["refused_rounds"] == 1


def test_calibrated_noise_meets_the_target_and_costs_more_than_central(plan):
    kw = dict(rounds=20, clipping_norm=0.5, q=0.05, expected_users=50, population=1000, delta=1e-3, dimension=2000,
              dropout_margin=0.2, seed=0, log=lambda _m: None)  # fmt: skip
    mech = distributed_skellam(noise_multiplier=0.0, target_epsilon=4.0, **kw)
    events = [RoundEvent(r, 0.05, mech.noise_multiplier, 0.5, 50) for r in range(1, 21)]
    assert mech.accountant.epsilon(events) <= 4.0
    assert mech.accountant.epsilon(events) > 3.9  # calibrated, not merely safe
    # The same z under the central Gaussian's RDP bound spends less: Skellam's general
    # subsampling bound and its extra terms are the price of adding the noise on devices.
    assert make_accountant("rdp", "poisson", 1000, 1e-3).epsilon(events) < 4.0
    # Against the server, which knows the cohorts, one round alone costs more than the run.
    assert mech.privacy_record()["server_view"]["epsilon_after_1_round"] > 0


def test_skellam_epsilon_tends_to_the_gaussian_rdp_as_the_scale_grows():
    # With Δ2 large the Skellam terms beyond the Gaussian's vanish; without sampling (q=1),
    # the Zhu–Wang bound is not involved and RDP equals the Gaussian's α/(2z²).
    big = SkellamAccountant("poisson", 100, 1e-5, l2=1e6, l1=1e9)
    z = 2.0
    ev = [RoundEvent(1, 1.0, z, 1.0, 1)] * 5
    gauss = make_accountant("rdp", "poisson", 100, 1e-5).epsilon(ev)
    assert big.epsilon(ev) == pytest.approx(gauss, rel=0.02)


def test_config_refuses_distributed_noise_without_its_conditions():
    with pytest.raises(ConfigError, match="sampling=poisson"):
        FedRecConfig.from_mapping({"noise-placement": "devices", "noise-multiplier": 1.0, "clipping-norm": 0.5})
    with pytest.raises(ConfigError, match="secure-aggregation=secagg"):
        FedRecConfig.from_mapping({"noise-placement": "devices", "noise-multiplier": 1.0, "clipping-norm": 0.5,
                                   "sampling": "poisson", "placement": "device"})  # fmt: skip
    with pytest.raises(ConfigError, match="noise"):
        FedRecConfig.from_mapping({"noise-placement": "devices", "clipping-norm": 0.5, "sampling": "poisson"})
    ok = FedRecConfig.from_mapping({"noise-placement": "devices", "noise-multiplier": 1.0, "clipping-norm": 0.5,
                                    "sampling": "poisson", "placement": "device", "secure-aggregation": "secagg+"})  # fmt: skip
    assert ok.noise_placement == "devices"


def test_enrolled_private_users_need_device_placement():
    with pytest.raises(ConfigError, match="placement=device"):
        FedRecConfig.from_mapping({"private-users": "enrolled"})
    with pytest.raises(ConfigError, match="private-users=enrolled"):
        FedRecConfig.from_mapping({"enroll-devices": 3})
    assert FedRecConfig.from_mapping({"private-users": "enrolled", "placement": "device"}).private_users == "enrolled"


def test_enrolled_devices_become_the_population_in_the_order_of_their_keys():
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from server.grid_port import BaseShipment, GridPort

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    cfg = FedRecConfig.from_mapping({"placement": "device", "private-users": "enrolled"})
    base = BaseShipment("b", None, ["i1"], [f"public-{i}" for i in range(30)])  # the server's own users: public
    logs: list[str] = []
    port = GridPort(cfg, np.zeros(0, dtype=np.int64), base=base, log=logs.append)

    def reply(key: str | None) -> Message:
        identity = {"needs-base": 1} | ({"device-key": key} if key else {"user-id": 3})
        return Message(RecordDict({"identity": ConfigRecord(identity)}), dst_node_id=0, message_type="query")

    kept = port._enroll([reply("ff"), reply("0a"), reply(None), reply("7c")])
    assert [str(r.content["identity"]["device-key"]) for r in kept] == ["0a", "7c", "ff"]
    assert [int(r.content["identity"]["enrolled"]) for r in kept] == [30, 31, 32]  # after the public users
    assert port.population.tolist() == [30, 31, 32]
    assert any("N=3" in line for line in logs) and any("without a device key" in line for line in logs)


def test_a_large_cohort_rotates_and_the_sum_survives_the_round_trip():
    # Every user of a Beauty-sized population in every round: without the rotation the field
    # leaves s·C ≈ 3.5 and rounding would inflate Δ2 16-fold; rotated, far less.
    big = SkellamPlan.make(0.5, 3000, 1.5, 17890, 0.2, rotation_seed=7)
    plain = SkellamPlan._fit(0.5, 3000, 1.5, 17890, 0.2, rotate=False)
    assert big.rotated and big.padded == 4096 and big.coordinates == 4096
    assert plain.l2_sensitivity / (plain.scale * 0.5) > 5 > 1.5 > big.l2_sensitivity / (big.scale * 0.5)
    rng = np.random.default_rng(0)
    x = _unit(rng, 3000, 0.5)
    assert np.allclose(big.unrotate(big.rotate(x)), x) and np.linalg.norm(big.rotate(x)) == pytest.approx(0.5)
    xs = [_unit(rng, 3000, 0.5) for _ in range(20)]
    err = big.decode(sum(big.encode(v, rng) for v in xs)) - np.sum(xs, axis=0)
    quiet = dataclasses.replace(big, device_variance=0.0)
    rounding = quiet.decode(sum(quiet.encode(v, rng) for v in xs)) - np.sum(xs, axis=0)
    # The error is the plan's noise (rotated back, orthonormal: same variance) plus the rounding,
    # which at this small scale is not negligible: at most 1/(4s²) per device and coordinate.
    assert float(rounding.var()) <= 20 / (4 * big.scale**2)
    assert float(err.var()) == pytest.approx(big.noise_std(20) ** 2 + float(rounding.var()), rel=0.06)
    record = SkellamPlan.from_record(big.to_record())
    assert record == big


def test_a_simulation_refuses_enrolled_private_users_before_it_starts():
    from fedrec.simulate import check_resources

    cfg = FedRecConfig.from_mapping({"private-users": "enrolled", "placement": "device"})
    with pytest.raises(ConfigError, match="local_federation --enroll"):
        check_resources(cfg)
