"""The frozen base model: its shape, its cache file, and loading it frozen (pretraining
itself is `fedrec.train.pretrain.ensure_base`).

The cache key hashes everything that determines the weights (data, split, model shape,
pretraining knobs, seed), so a sweep over federated knobs pretrains once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from fedrec.config import FedRecConfig
from fedrec.data.load import source_file
from fedrec.model.sasrec import SASRec

BASE_KEYS = (
    "dataset", "data-path", "data-seed", "min-user-interactions", "public-fraction",
    "synthetic-users", "synthetic-items", "synthetic-clusters", "synthetic-mean-length",
    "max-seq-len", "hidden-size", "num-blocks", "num-heads", "dropout",
    "pretrain-epochs", "pretrain-patience", "pretrain-learning-rate", "batch-size", "item-encoder", "cold-items",
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
    if cfg.dataset == "teacher":
        # A teacher population's public users are the real data's, in the real split's order:
        # its base is the real data's base, one file for every population size and temperature.
        from fedrec.model.teacher import real_data_config

        cfg = real_data_config(cfg)
    if cfg.dataset == "synthetic":
        from fedrec.data.synthetic import GENERATOR_VERSION

        keys = BASE_KEYS if not cfg.public_users else [k for k in BASE_KEYS if k != "synthetic-users"]
        key = f"{cfg.fingerprint(*keys)}-r{PRETRAIN_RECIPE}-g{GENERATOR_VERSION}"
        if cfg.public_users:  # the public users are their own stream: the base is the same for every size
            key += f"-pu{cfg.public_users}"
    else:
        # Keyed by the file's content, not its path or mtime: a copy, a re-sync or a touch
        # keeps the base (pretraining it is the longest step of a run's start:
        # experiments/README.md#base-cache), a changed file gets
        # a new one. Hashing costs less than parsing the file, which every process does anyway.
        source = source_file(cfg.dataset, Path(cfg.data_path).expanduser().resolve())
        key = f"{cfg.fingerprint(*(k for k in BASE_KEYS if k != 'data-path'))}-{_content_digest(source)}-r{PRETRAIN_RECIPE}"
    if cfg.item_encoder != "id" and cfg.item_text:  # the texts enter by content, as the data file does
        key += f"-t{_content_digest(Path(cfg.item_text).expanduser().resolve())}"
    if cfg.item_encoder == "id+text":
        key += f"-i{cfg.id_dropout:g}"
    if cfg.pretrain_min_epochs:
        key += f"-m{cfg.pretrain_min_epochs}"
    if cfg.pretrain_loss_tolerance:  # only when set, as below
        key += f"-lt{cfg.pretrain_loss_tolerance:g}"
    if cfg.pretrain_label_smoothing:  # only when set, as below
        key += f"-ls{cfg.pretrain_label_smoothing:g}"
    if cfg.private_users == "enrolled":  # every user of the file is public, so the base differs
        key += "-enrolled"
    if cfg.pretrain_users:  # only when set, so that every base cached before the key stays valid
        key += f"-p{cfg.pretrain_users}"
    if cfg.cold_items:  # cold items' recipe 2: left out of the training softmax too
        key += "-c2"
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


def load_base(cfg: FedRecConfig, num_items: int, path: Path) -> SASRec:
    model = new_model(cfg, num_items)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    for p in model.parameters():
        p.requires_grad_(False)
    return model
