"""Shared fixtures: tiny configs, and the real datasets in ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedrec.config import FedRecConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDREC_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(1)


def write_csv_dataset(path: Path) -> Path:
    """40 users with raw string ids (users u0.., items item-..), so the catalogue mapping is exercised."""
    import csv

    from fedrec.data.synthetic import generate_synthetic

    inter = generate_synthetic(num_users=40, num_items=60, num_clusters=4, mean_length=12, seed=3)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "item", "timestamp"])
        for u, seq in enumerate(inter.sequences):
            for j, item in enumerate(seq):
                w.writerow([f"u{u}", f"item-{item}", 1_000_000 + 10 * j + u])
    return path


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test with a message saying where it looked."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real dataset not available: {path} is absent (set FEDREC_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the whole test run: synthetic data, item texts and pretrained
    bases are built once and read by every later test whose config keys them the same.

    Sharing is safe because the cache key covers everything that shapes what is cached
    (`fedrec.model.base.BASE_KEYS`), and a test that changes a pretraining knob gets a base
    of its own. Tests that are about the cache itself use their own folder.
    """
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture
def tiny_cfg(tmp_path: Path, shared_cache: Path) -> FedRecConfig:
    """A small synthetic workload that pretrains in about a second (once per test run)."""
    return FedRecConfig(
        synthetic_users=120,
        synthetic_items=60,
        synthetic_clusters=4,
        synthetic_mean_length=12,
        public_fraction=0.25,
        hidden_size=16,
        num_heads=2,
        num_blocks=1,
        max_seq_len=20,
        pretrain_epochs=5,
        cache_dir=str(shared_cache),
        output_dir=str(tmp_path / "out"),
    )
