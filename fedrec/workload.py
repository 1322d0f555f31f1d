"""What every participant of a run needs in memory: the split data and the base model.

Loaded once per process and memoized, so a worker that trains many messages reads the
data and the base weights once, not per message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from fedrec.config import FedRecConfig
from fedrec.data import SplitData, load_interactions, split_users
from fedrec.data.interactions import Interactions
from fedrec.model.base import BASE_KEYS, base_path, ensure_base, load_base
from fedrec.model.lora import attach_lora, freeze_random_factors

DATA_KEYS = ("dataset", "data-path", "seed", "min-user-interactions", "public-fraction") + tuple(
    k for k in BASE_KEYS if k.startswith("synthetic-")
)
_CACHE: dict[str, tuple[Interactions, SplitData]] = {}


@dataclass
class Workload:
    cfg: FedRecConfig
    interactions: Interactions
    data: SplitData
    base_path: Path

    def model(self, device: torch.device | None = None) -> PeftModel:
        """A fresh base+LoRA model; the LoRA init is seeded, B = 0."""
        base = load_base(self.cfg, self.data.num_items, self.base_path)
        model = attach_lora(
            base, self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.lora_target_list(), self.cfg.seed,
            item_rank=self.cfg.lora_item_rank,
        )  # fmt: skip
        if self.cfg.lora_train == "b-only":
            freeze_random_factors(model)
        return model.to(device or torch.device("cpu"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device")
    return torch.device(name)


def load_workload(cfg: FedRecConfig, log: Callable[[str], None] = lambda _m: None, pretrain: bool = True) -> Workload:
    """Data split and base model for `cfg`; pretrains the base if allowed and missing.

    The data is memoized by what determines it; the returned Workload always carries
    `cfg` itself, so adapter shape and other federated knobs are never stale.
    """
    key = cfg.fingerprint(*DATA_KEYS)
    if key not in _CACHE:
        interactions = load_interactions(cfg)
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
