"""What every participant of a run needs in memory: the split data and the base model.

Loaded once per process and memoized, so a worker that trains many messages reads the
data and the base weights once, not per message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from fedrec.config import FedRecConfig
from fedrec.data import SplitData, load_interactions, split_users
from fedrec.data.interactions import Interactions
from fedrec.model.base import BASE_KEYS, base_path, cache_dir, ensure_base, load_base
from fedrec.model.lora import attach_lora, freeze_random_factors

DATA_KEYS = ("dataset", "data-path", "seed", "min-user-interactions", "public-fraction") + tuple(
    k for k in BASE_KEYS if k.startswith("synthetic-")
)
# What build_model's adapter depends on (besides the base): a model cached by a worker is
# reused only for configs that agree on these.
ADAPTER_KEYS = ("seed", "lora-rank", "lora-alpha", "lora-targets", "lora-item-rank", "lora-train")
_CACHE: dict[str, tuple[Interactions, SplitData]] = {}


@dataclass
class Workload:
    cfg: FedRecConfig
    interactions: Interactions
    data: SplitData
    base_path: Path

    def model(self, device: torch.device | None = None) -> PeftModel:
        """A fresh base+LoRA model; the LoRA init is seeded, B = 0."""
        return build_model(self.cfg, self.data.num_items, self.base_path, device)


def build_model(cfg: FedRecConfig, num_items: int, path: Path, device: torch.device | None = None) -> PeftModel:
    """The frozen base at `path` with the run's seeded LoRA: the same on server, workers and devices."""
    base = load_base(cfg, num_items, path)
    model = attach_lora(
        base, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_list(), cfg.seed, item_rank=cfg.lora_item_rank
    )
    if cfg.lora_train == "b-only":
        freeze_random_factors(model)
    return model.to(device or torch.device("cpu"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device")
    return torch.device(name)


def _load_or_generate(cfg: FedRecConfig) -> Interactions:
    """Real data from its file; synthetic data from the cache dir once generated.

    Generating the ML-1M-sized synthetic set takes ~20 s of pure Python; every worker
    process would pay it before round 1. It is deterministic in the config, so the first
    process writes it beside the cached base model and the others read it in milliseconds.
    """
    if cfg.dataset != "synthetic":
        return load_interactions(cfg)
    keys = [k for k in DATA_KEYS if k.startswith("synthetic-")] + ["seed"]
    path = cache_dir(cfg) / f"synthetic-{cfg.fingerprint(*keys)}.npz"
    if path.exists():
        with np.load(path) as z:
            flat, ends = z["items"], z["ends"]
            sequences = np.split(flat, ends[:-1])
            return Interactions(sequences, [str(u) for u in range(len(sequences))], int(z["num_items"]), str(z["source"]))
    interactions = load_interactions(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    ends = np.cumsum([len(s) for s in interactions.sequences])
    np.savez(tmp, items=np.concatenate(interactions.sequences), ends=ends, num_items=interactions.num_items,
             source=interactions.source)  # fmt: skip
    os.replace(tmp, path)
    return interactions


def load_workload(cfg: FedRecConfig, log: Callable[[str], None] = lambda _m: None, pretrain: bool = True) -> Workload:
    """Data split and base model for `cfg`; pretrains the base if allowed and missing.

    The data is memoized by what determines it; the returned Workload always carries
    `cfg` itself, so adapter shape and other federated knobs are never stale.
    """
    key = cfg.fingerprint(*DATA_KEYS)
    if key not in _CACHE:
        interactions = _load_or_generate(cfg)
        log(f"data: {interactions.describe()}")
        data = split_users(interactions, cfg.public_fraction, cfg.seed)
        log(f"split: {len(data.public):,} public users (pretraining), {len(data.private):,} private users (federated)")
        _CACHE[key] = (interactions, data)
    interactions, data = _CACHE[key]
    if pretrain:
        path = ensure_base(cfg, data, log)
    else:
        path = base_path(cfg)
        if not path.exists():
            raise FileNotFoundError(f"base model {path} is missing; the server creates it before round 1")
    return Workload(cfg, interactions, data, path)
