"""tracking=tensorboard: the run's numbers written as TensorBoard events, read back here."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorboard", reason="the tracking extra (tensorboard) is not installed")


def test_tensorboard_events_hold_every_round_the_config_and_the_summary(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedrec.inprocess import run_in_process

    cfg = tiny_cfg.replace(num_rounds=3, cohort_size=20, eval_every=1, bootstrap_samples=0, clipping_norm=0.5,
                           target_epsilon=8.0, sampling="poisson", tracking="tensorboard")  # fmt: skip
    summary = run_in_process(cfg, tmp_path / "run", log=lambda _m: None)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in events.Scalars(tag)}

    assert sorted(series("train/loss")) == [1, 2, 3] and sorted(series("valid/ndcg@10")) == [0, 1, 2, 3]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert series("train/epsilon")[3] == pytest.approx(rows[3]["train"]["epsilon"])
    assert "train/snr-agreed" in scalars  # the signal-to-noise meter
    assert series("test/ndcg@10")[3] == pytest.approx(summary.test["ndcg@10"])
    assert series("privacy/epsilon")[3] == pytest.approx(summary.epsilon)
    assert {"config", "summary"} <= {t.split("/")[0] for t in events.Tags()["tensors"]}
