"""Bad updates and lost users, below the Flower layer: the engines, the reply check, dropout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedrec.aggregate import UpdateSum
from fedrec.privacy.clipping import reply_fault
from fedrec.cohort import dropped_out
from fedrec.model.lora import adapter_parameters, adapter_state
from fedrec.train.engine import train_cohort
from fedrec.train.loop import train_users
from fedrec.train.vectorized import train_users_vectorized
from fedrec.workload import prepare_workload

from tests.engine_args import engine_args

CPU = torch.device("cpu")


@pytest.mark.parametrize("engine,item_adapter,epochs", [("loop", "none", 2), ("vectorized", "none", 2),
                                                          ("vectorized", "table", 1)])  # fmt: skip
def test_a_diverging_user_is_left_out_and_counted_by_every_engine(tiny_cfg, engine, item_adapter, epochs):
    cfg = tiny_cfg.replace(local_engine=engine, item_adapter=item_adapter, local_epochs=epochs, clipping_norm=0.5)
    work = prepare_workload(cfg)
    model = work.model()
    state = adapter_state(model)
    users = [int(u) for u in work.data.private[:10]]
    # An infinite step (no config admits one) makes every trained tensor non-finite: nothing may reach the sum.
    kw = dict(local_epochs=epochs, learning_rate=math.inf, clipping_norm=0.5, user_weighting="uniform",
              max_seq_len=cfg.max_seq_len, seed=cfg.seed, round_=1, device=CPU)  # fmt: skip
    total = (train_users if engine == "loop" else train_users_vectorized)(model, state, work.data, users, *engine_args(**kw))
    assert total.num_users == 0 and total.rejected == {"non-finite": 10}
    assert all(bool(torch.isfinite(v).all()) for v in total.delta.values())
    assert total.loss_sum == 0 and total.weight == 0
    fine = train_cohort(cfg, model, state, work.data, users, round_=1, clipping_norm=0.5, device=CPU)
    assert fine.num_users == 10 and fine.rejected == {}


def test_reply_fault_names_what_is_wrong():
    expected = {"a": torch.zeros(4, 2), "b": torch.zeros(3)}
    good = {"a": torch.full((4, 2), 0.1), "b": torch.full((3,), 0.1)}
    assert reply_fault(good, 1.0, expected, clipping_norm=1.0) is None
    assert reply_fault({"a": good["a"]}, 1.0, expected, 1.0) == "keys"
    assert reply_fault(good | {"c": torch.zeros(1)}, 1.0, expected, 1.0) == "keys"
    assert reply_fault(good | {"b": torch.zeros(4)}, 1.0, expected, 1.0) == "shape"
    assert reply_fault(good | {"b": good["b"].double()}, 1.0, expected, 1.0) == "dtype"
    assert reply_fault(good | {"b": torch.tensor([0.1, math.nan, 0.1])}, 1.0, expected, 1.0) == "non-finite"
    assert reply_fault(good | {"b": torch.tensor([0.1, -math.inf, 0.1])}, 1.0, expected, 1.0) == "non-finite"
    # A sum of 3 users clipped to C may reach norm 3C, no more.
    big = {k: v * 30 for k, v in good.items()}  # norm ≈ 30·0.33 = 10
    assert reply_fault(big, 3.0, expected, clipping_norm=1.0) == "norm"
    assert reply_fault(big, 11.0, expected, clipping_norm=1.0) is None
    assert reply_fault(big, 1.0, expected, clipping_norm=0.0) is None  # no clipping, no bound


def test_rejections_and_dropouts_add_up_through_replies():
    a = UpdateSum(num_users=2, weight=2.0, delta={"w": torch.ones(2)}, rejected={"norm": 1}, num_dropped=3)
    b = UpdateSum.from_parts({"w": torch.ones(2)}, a.counts())
    assert b.rejected == {"norm": 1} and b.num_dropped == 3
    a.merge(b)
    a.merge(UpdateSum(rejected={"keys": 2}))
    assert a.rejected == {"norm": 2, "keys": 2} and a.num_rejected == 4 and a.num_dropped == 6 and a.num_users == 4


def test_client_dropout_loses_users_at_the_rate_seeded_by_user(tiny_cfg):
    users = np.arange(4000)
    lost = dropped_out(users, 0.3, seed=1, round_=5)
    assert abs(len(lost) / len(users) - 0.3) < 0.03
    assert dropped_out(users[::-1], 0.3, seed=1, round_=5) == lost  # by user, not by position
    assert dropped_out(users, 0.3, seed=1, round_=6) != lost
    cfg = tiny_cfg.replace(client_dropout=0.4)
    work = prepare_workload(cfg)
    model = work.model()
    cohort = [int(u) for u in work.data.private[:40]]
    total = train_cohort(cfg, model, adapter_state(model), work.data, cohort, round_=2, clipping_norm=0.0, device=CPU)
    gone = dropped_out(cohort, 0.4, cfg.seed, 2)
    assert total.num_dropped == len(gone) > 0 and total.num_users == len(cohort) - len(gone)
    kept = train_cohort(cfg.replace(client_dropout=0.0), model, adapter_state(model), work.data,
                        [u for u in cohort if u not in gone], round_=2, clipping_norm=0.0, device=CPU)  # fmt: skip
    for k in adapter_parameters(model):
        torch.testing.assert_close(total.delta[k], kept.delta[k])


def test_a_device_that_cannot_join_is_told_why_from_its_log():
    from server.local_federation import join_failure

    # The lines Flower 1.42's SuperNode writes in each case (tests/integration/test_deployment.py
    # starts such devices for real).
    assert "refused its authentication key" in join_failure(
        "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
        "[code: 2004] Failed to activate SuperNode.\n", 1)  # fmt: skip
    assert "CERTIFICATE_VERIFY_FAILED" in join_failure(
        "ERROR :     SSL/TLS handshake error detected.\n[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed\n", 1)
    assert join_failure("ERROR : something else broke\n", 1) == "ERROR : something else broke"
    assert join_failure("", 3) == "its process exited with code 3"
