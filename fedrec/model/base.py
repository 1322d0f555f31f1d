"""The frozen base model: pretrained centrally on public users, cached on disk.

The cache key hashes everything that determines the weights (data, split, model shape,
pretraining knobs, seed), so a sweep over federated knobs pretrains once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from fedrec.config import FedRecConfig
from fedrec.data.split import SplitData
from fedrec.model.sasrec import SASRec
from fedrec.train import fit_sequences

BASE_KEYS = (
    "dataset", "data-path", "seed", "min-user-interactions", "public-fraction",
    "synthetic-users", "synthetic-items", "synthetic-clusters", "synthetic-mean-length",
    "max-seq-len", "hidden-size", "num-blocks", "num-heads", "dropout",
    "pretrain-epochs", "pretrain-learning-rate", "batch-size",
)  # fmt: skip


def new_model(cfg: FedRecConfig, num_items: int) -> SASRec:
    return SASRec(
        num_items=num_items,
        max_seq_len=cfg.max_seq_len,
        hidden_size=cfg.hidden_size,
        num_blocks=cfg.num_blocks,
        num_heads=cfg.num_heads,
        dropout=cfg.dropout,
    )


def cache_dir(cfg: FedRecConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser().resolve()
    env = os.environ.get("FEDREC_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "fedrec"


def base_path(cfg: FedRecConfig) -> Path:
    key = cfg.fingerprint(*BASE_KEYS)
    if cfg.dataset != "synthetic":
        st = Path(cfg.data_path).stat()
        key = f"{key}-{int(st.st_mtime)}-{st.st_size}"
    return cache_dir(cfg) / f"base-{key}.pt"


def ensure_base(cfg: FedRecConfig, data: SplitData, log: Callable[[str], None] = print) -> Path:
    """Pretrain the base on public users unless a cached copy exists; return its path."""
    path = base_path(cfg)
    if path.exists():
        log(f"base model: cached {path}")
        return path
    torch.manual_seed(cfg.seed)
    model = new_model(cfg, data.num_items)
    seqs = [data.full_sequence(int(u)) for u in data.public]
    log(f"base model: pretraining on {len(seqs):,} public users for {cfg.pretrain_epochs} epochs")
    fit_sequences(
        model,
        seqs,
        list(model.parameters()),
        epochs=cfg.pretrain_epochs,
        lr=cfg.pretrain_learning_rate,
        batch_size=cfg.batch_size,
        max_seq_len=cfg.max_seq_len,
        seed=cfg.seed,
        device=torch.device("cpu"),
        on_epoch=lambda e, loss: log(f"  pretrain epoch {e}/{cfg.pretrain_epochs} loss {loss:.4f}")
        if e % max(1, cfg.pretrain_epochs // 5) == 0 or e == cfg.pretrain_epochs
        else None,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: concurrent readers see the old or the whole new file
    log(f"base model: saved {path}")
    return path


def load_base(cfg: FedRecConfig, num_items: int, path: Path) -> SASRec:
    model = new_model(cfg, num_items)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    for p in model.parameters():
        p.requires_grad_(False)
    return model
