"""What-if runs (whatif-population): the noise and ε of a stated population, trained on the
data at hand, and labelled as such in every output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedrec.aggregate import UpdateSum
from fedrec.config import ConfigError, FedRecConfig
from fedrec.inprocess import run_in_process
from fedrec.report import main as report_main
from fedrec.run import make_mechanism, make_sampler

PLAN = {"sampling": "poisson", "target-epsilon": 4.0, "num-rounds": 20, "clipping-norm": 0.5, "accountant": "rdp"}


def _mechanism(cfg: FedRecConfig, population: int, dimension: int = 2000):
    return make_mechanism(cfg, make_sampler(cfg, np.arange(population)), log=lambda _m: None, dimension=dimension)


def test_the_whatif_noise_equals_a_real_runs_at_the_stated_population():
    real = _mechanism(FedRecConfig.from_mapping(PLAN | {"cohort-size": 300}), population=5000)
    whatif = _mechanism(FedRecConfig.from_mapping(PLAN | {"cohort-size": 60, "whatif-population": 5000,
                                                           "whatif-cohort-size": 300}), population=1000)  # fmt: skip
    assert whatif.noise_multiplier == real.noise_multiplier and whatif.delta == real.delta == 1 / 5000
    assert whatif.q == real.q == 300 / 5000
    assert whatif.noise_on_mean(2000, 1) == pytest.approx(real.noise_on_mean(2000, 1))
    # The noise each released mean carries, drawn: the same spread, z·C/m′, from 60 users' sum as from 300's.
    template = {"w": torch.zeros(20_000)}
    spreads = []
    for mech, users in ((real, 300), (whatif, 60)):
        mean = mech.privatize(UpdateSum({"w": torch.zeros(20_000)}, num_users=users, weight=float(users)), template, 1)
        spreads.append(float(mean["w"].std()))
    expected = real.noise_multiplier * 0.5 / 300
    assert spreads[0] == pytest.approx(expected, rel=0.03) and spreads[1] == pytest.approx(expected, rel=0.03)
    # The default cohort keeps the run's sampling rate.
    same_q = _mechanism(FedRecConfig.from_mapping(PLAN | {"cohort-size": 60, "whatif-population": 5000}), population=1000)
    assert same_q.expected_users == 300 and same_q.divisor == 60


def test_every_output_of_a_whatif_run_carries_the_label(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(num_rounds=3, cohort_size=20, eval_every=0, clipping_norm=0.5, bootstrap_samples=20,
                           sampling="poisson", target_epsilon=8.0, whatif_population=100_000)  # fmt: skip
    lines: list[str] = []
    summary = run_in_process(cfg, tmp_path / "runs" / "whatif", log=lines.append)
    label = "ε for a population of 100,000"
    assert any("WHAT-IF" in line and label in line for line in lines)
    assert any("(what-if N=100,000)" in line for line in lines if line.startswith("round"))
    on_disk = json.loads((tmp_path / "runs" / "whatif" / "summary.json").read_text())
    assert label in on_disk["whatif"]["label"] and on_disk["whatif"]["population"] == 100_000 == summary.whatif["population"]
    privacy = json.loads((tmp_path / "runs" / "whatif" / "privacy.json").read_text())
    assert label in privacy["whatif"]["label"] and privacy["population"] == 100_000 and privacy["delta"] == 1e-5
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert f"what-if: {label}" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("extra, names", [
    ({"audit-canaries": 10}, "audit-canaries"),
    ({"placement": "device"}, "placement=cohort"),
    ({"target-epsilon": 0.0}, "noise"),
    ({"adaptive-clipping": True}, "adaptive-clipping"),
])  # fmt: skip
def test_an_audit_a_deployment_or_a_run_without_noise_refuses_whatif(extra, names):
    with pytest.raises(ConfigError, match=names):
        FedRecConfig.from_mapping(PLAN | {"whatif-population": 10_000} | extra)
    with pytest.raises(ConfigError, match="needs whatif-population"):
        FedRecConfig.from_mapping(PLAN | {"whatif-cohort-size": 300})
