"""The frozen base model: pretrained centrally on public users, cached on disk.

The cache key hashes everything that determines the weights (data, split, model shape,
pretraining knobs, seed), so a sweep over federated knobs pretrains once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from fedrec.config import FedRecConfig
from fedrec.data.load import source_file
from fedrec.data.split import SplitData
from fedrec.model.sasrec import SASRec
from fedrec.metrics import metric_means
from fedrec.train import evaluate_users, fit_sequences

BASE_KEYS = (
    "dataset", "data-path", "seed", "min-user-interactions", "public-fraction",
    "synthetic-users", "synthetic-items", "synthetic-clusters", "synthetic-mean-length",
    "max-seq-len", "hidden-size", "num-blocks", "num-heads", "dropout",
    "pretrain-epochs", "pretrain-patience", "pretrain-learning-rate", "batch-size",
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


# Bumped when pretraining itself changes (2: random batches each epoch), so no cached base
# of an older recipe is reused.
PRETRAIN_RECIPE = 2


def base_path(cfg: FedRecConfig) -> Path:
    if cfg.dataset == "synthetic":
        key = f"{cfg.fingerprint(*BASE_KEYS)}-r{PRETRAIN_RECIPE}"
    else:
        # Keyed by the file's content, not its path or mtime: a copy, a re-sync or a touch
        # keeps the base (pretraining Beauty takes ~200 s here), a changed file gets a new
        # one. Hashing costs less than parsing the file, which every process does anyway.
        source = source_file(cfg.dataset, Path(cfg.data_path).expanduser().resolve())
        key = f"{cfg.fingerprint(*(k for k in BASE_KEYS if k != 'data-path'))}-{_content_digest(source)}-r{PRETRAIN_RECIPE}"
    return cache_dir(cfg) / f"base-{key}.pt"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _content_digest(path: Path) -> str:
    """blake2b of the file, hashed once per process per (path, mtime, size): workers look
    the base up on every message."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _DIGESTS:
        with open(path, "rb") as fh:
            _DIGESTS[key] = hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=8)).hexdigest()
    return _DIGESTS[key]


def ensure_base(cfg: FedRecConfig, data: SplitData, log: Callable[[str], None] = print) -> Path:
    """Pretrain the base on public users unless a cached copy exists; return its path."""
    path = base_path(cfg)
    if path.exists():
        log(f"base model: cached {path}")
        return path
    torch.manual_seed(cfg.seed)
    model = new_model(cfg, data.num_items)
    # Public users train on all but their last item, which picks the stopping epoch:
    # an over-trained base is over-confident on new users, and LoRA on the projections
    # cannot undo that (the final LayerNorm fixes the logit scale).
    public = [int(u) for u in data.public]
    seqs = [data.history(u, "test") for u in public]
    log(f"base model: pretraining on {len(seqs):,} public users, up to {cfg.pretrain_epochs} epochs")

    def validate() -> float:
        sums = evaluate_users(model, data, public, "test", max_seq_len=cfg.max_seq_len, device=torch.device("cpu"))
        return metric_means(sums)["ndcg@10"]

    best = fit_sequences(
        model,
        seqs,
        list(model.parameters()),
        epochs=cfg.pretrain_epochs,
        lr=cfg.pretrain_learning_rate,
        batch_size=cfg.batch_size,
        max_seq_len=cfg.max_seq_len,
        seed=cfg.seed,
        device=torch.device("cpu"),
        validate=validate,
        patience=cfg.pretrain_patience,
        on_epoch=lambda e, loss, score: log(
            f"  pretrain epoch {e}/{cfg.pretrain_epochs} loss {loss:.4f} public held-out NDCG@10 {score or 0.0:.4f}"
        ),
    )
    log(f"base model: keeping epoch {best}")
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
