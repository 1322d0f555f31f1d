"""Every simulation a test starts reads one cache for the whole test run."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def one_cache_per_test_run(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run config without cache-dir caches in FEDREC_CACHE_DIR (`fedrec.model.base.cache_dir`),
    and the simulations, their Ray workers and resumed runs inherit it: so synthetic data and
    each pretrained base are made by the first simulation that needs them, once per test run,
    and the others read them (the cache key covers everything that shapes a base)."""
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(shared_cache))
