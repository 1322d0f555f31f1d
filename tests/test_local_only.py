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


def test_many_users_at_once_rank_as_each_one_alone(tiny_cfg):
    """The stacked path (fedrec.train.alone) against the loop engine one user at a time, with
    dropout off (with it, each path draws its own masks)."""
    import torch

    from fedrec.local_only import one_at_a_time
    from fedrec.train.alone import train_and_rank_alone
    from fedrec.train.evaluate import rank_users
    from fedrec.train.settings import LocalTraining
    from fedrec.workload import describe_adapter, prepare_workload

    cfg = tiny_cfg.replace(dropout=0.0, learning_rate=0.5)
    work = prepare_workload(cfg)
    model = work.model()
    info = describe_adapter(cfg, model, work.item_side, log=lambda _m: None)
    users = [int(u) for u in work.data.private[:16]]
    local = LocalTraining(local_epochs=3, learning_rate=cfg.learning_rate, max_seq_len=cfg.max_seq_len, seed=cfg.seed,
                          vector_tokens=64)  # several groups  # fmt: skip
    stacked = train_and_rank_alone(model, info.initial, work.data, users, local, torch.device("cpu"))
    alone = one_at_a_time(model, info.initial, work.data, users, local, torch.device("cpu"))
    base, _ = rank_users(model, work.data, users, "test", max_seq_len=cfg.max_seq_len, device=torch.device("cpu"))
    for split in ("valid", "test"):
        assert stacked[split][0].tolist() == alone[split][0].tolist(), split
        assert stacked[split][1].tolist() == alone[split][1].tolist(), split
    assert stacked["test"][0].tolist() != base.tolist()  # the users' own steps moved their ranks
