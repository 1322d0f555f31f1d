"""Smoke checks of the benchmark scripts (marked slow: `pytest -m slow`); targets live in their output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_throughput_quick_writes_every_number(tmp_path):
    out = tmp_path / "bench.json"
    env_cache = {"FEDREC_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "experiments/bench_throughput.py", "--quick", "--json", str(out)],
                   cwd=ROOT, check=True, env=os.environ | env_cache, timeout=600)  # fmt: skip
    result = json.loads(out.read_text())
    rates = result["users_per_s"]
    assert set(rates) == {"device", "cohort_loop", "cohort_vectorized", "compute_bound"}
    assert all(v > 0 for v in rates.values())
    assert rates["cohort_vectorized"] > rates["device"]  # the point of cohort placement
    assert result["startup_s"] > 0 and result["peak_rss_mb"] > 100


@pytest.mark.slow
def test_privacy_sweep_writes_table_rows_and_plot(tmp_path):
    tiny = (
        "synthetic-users=150 synthetic-items=80 synthetic-clusters=4 synthetic-mean-length=15 public-fraction=0.2 "
        f"hidden-size=32 num-blocks=1 max-seq-len=20 pretrain-epochs=8 num-rounds=3 cohort-size=20 "
        f"clipping-norm=0.5 cache-dir={tmp_path / 'cache'}"
    )
    out = tmp_path / "sweep"
    subprocess.run([sys.executable, "experiments/sweep_privacy.py", "--epsilons", "none,4,8", "--vary",
                    "item-adapter=none,features", "--run-config", tiny, "--out", str(out)], cwd=ROOT, check=True,
                   timeout=600)  # fmt: skip
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["item-adapter"], r["target-epsilon"]) for r in rows] == [
        (a, e) for a in ("none", "features") for e in ("none", "4", "8")]  # fmt: skip
    assert rows[1]["epsilon"] == pytest.approx(4, abs=0.01) and rows[0]["epsilon"] is None
    assert rows[0]["noise_multiplier"] is None and rows[2]["noise_multiplier"] < rows[1]["noise_multiplier"]
    assert rows[3]["adapter_dimension"] == rows[0]["adapter_dimension"] + 4 * 32  # 4 clusters x d: counted in d
    table = (out / "sweep.md").read_text()
    assert table.count("\n| features |") == 3 and "| z·√d/m |" in table and "one shared simulation" in table
    assert "kept at ε = 4" in (out / "gain_kept.md").read_text()
    assert (out / "ndcg_vs_epsilon.png").stat().st_size > 1000
