"""`python -m fedrec.snr`: a few rounds without noise, then a prediction per plan and ε."""

from __future__ import annotations

import math
import re

import pytest

from fedrec.config import merge_run_config

from fedrec import snr
from fedrec.config import ConfigError, FedRecConfig
from fedrec.privacy.snr import predicted_run_snr

TINY = ("synthetic-users=120 synthetic-items=60 synthetic-clusters=4 synthetic-mean-length=12 public-fraction=0.25 "
        "hidden-size=16 num-heads=2 num-blocks=1 max-seq-len=20 pretrain-epochs=5 cohort-size=30 clipping-norm=0.5")  # fmt: skip


def test_it_measures_then_predicts_every_plan_at_every_epsilon(shared_cache, capsys):
    rc = snr.main(["--run-config", merge_run_config(TINY, f"cache-dir={shared_cache}"), "--rounds", "2", "--epsilons", "8,1",
                   "--plans", "config,all:x10,cyclic:30x20"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "round 2/2" in out and "agreed signal" in out
    for plan in ("poisson m=30 T=50", "all T=10", "cyclic m=30 T=20"):  # config: fixed cohorts read as Poisson
        assert plan in out, plan
    assert len(re.findall(r"\d\.\d\d (?:keeps|loses)", out)) == 6  # 3 plans × 2 ε


def test_bad_plans_and_a_missing_clip_are_one_line(capsys):
    assert snr.main(["--run-config", "clipping-norm=0"]) == 2
    assert "clipping-norm" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--plans"):
        snr.Plan.parse("poisson:ax3", FedRecConfig())
    with pytest.raises(ConfigError, match="--plans"):
        snr.Plan.parse("fixed:10x3", FedRecConfig())


def test_more_users_per_round_or_a_smaller_adapter_predict_more():
    base = snr.noise_on_sum(snr.Plan("poisson", 1000, 100), 8.0, 17_890, 12_288, 1 / 17_890, 16)
    more_users = snr.noise_on_sum(snr.Plan("poisson", 4000, 25), 8.0, 17_890, 12_288, 1 / 17_890, 16)
    small = snr.noise_on_sum(snr.Plan("poisson", 1000, 100), 8.0, 17_890, 14, 1 / 17_890, 16)
    # the same user-rounds in fewer, larger rounds: less noise on what the run adds up
    assert predicted_run_snr(0.02, 0, 0, 1, 25, more_users) > predicted_run_snr(0.02, 0, 0, 1, 100, base)
    assert small == pytest.approx(base * math.sqrt(14 / 12_288))
