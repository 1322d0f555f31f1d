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
