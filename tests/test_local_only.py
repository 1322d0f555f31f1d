"""mode=local: every private user fine-tunes its own adapter, alone, and is ranked with it."""

from __future__ import annotations

import pytest

from fedrec.local_only import local_steps, run_local


def test_local_only_trains_each_user_alone_and_reports_beside_the_base(tiny_cfg):
    cfg = tiny_cfg.replace(mode="local", num_rounds=20, cohort_size=30, bootstrap_samples=100)
    s = run_local(cfg)
    assert s["mode"] == "local" and s["epsilon"] is None
    assert s["local_epochs_per_user"] == local_steps(cfg, s["private_users"]) == round(2 * 20 * 30 / 90)
    assert s["local_test"]["users"] == s["base_test"]["users"] == s["local_users"] == s["private_users"] == 90
    assert s["local_test"] != s["base_test"]  # the users' own adapters rank differently from the base
    lo, hi = s["local_test_ci"]["ndcg@10"]
    assert lo <= s["local_test"]["ndcg@10"] <= hi
    lo, hi = s["local_test_gain_ci"]["ndcg@10"]
    assert lo <= s["local_test"]["ndcg@10"] - s["base_test"]["ndcg@10"] <= hi


def test_a_user_whose_steps_change_nothing_ranks_as_the_base(tiny_cfg):
    s = run_local(tiny_cfg.replace(mode="local", learning_rate=1e-30, bootstrap_samples=0, eval_users=40))
    assert s["local_users"] == s["local_test"]["users"] == s["base_test"]["users"] == 40  # the seeded sample
    assert s["local_test"] == pytest.approx(s["base_test"])
    assert s["local_valid"]["ndcg@10"] == pytest.approx(s["base_valid"]["ndcg@10"])
