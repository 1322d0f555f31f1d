"""Per-user adapter state that never leaves the user's client (lora-share=a-only).

In FedSA-style sharing (Guo et al., ICLR 2025) each user keeps their own LoRA B and only A
is aggregated. In simulation the "device" is a folder per run; a real client app would
point `client-state-dir` at its own storage.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedrec.config import FedRecConfig
from fedrec.model.types import AdapterState, is_local

__all__ = ["UserStateStore", "client_state_dir", "is_local", "keeps_client_state", "local_store_for"]


class UserStateStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, user: int) -> Path:
        return self.root / f"user-{int(user)}.safetensors"

    def load(self, user: int) -> AdapterState | None:
        path = self._path(user)
        return load_file(str(path)) if path.exists() else None

    def save(self, user: int, state: AdapterState) -> None:
        path = self._path(user)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)


def client_state_dir(cfg: FedRecConfig) -> Path:
    """Where clients keep what never leaves them (own B, a silo's privacy ledger)."""
    return Path(cfg.client_state_dir or Path(cfg.output_dir) / "client-state")


def local_store_for(cfg: FedRecConfig) -> UserStateStore | None:
    if cfg.lora_share != "a-only":
        return None
    return UserStateStore(client_state_dir(cfg))


def keeps_client_state(cfg: FedRecConfig) -> bool:
    """Whether clients write state between rounds (own B, silo ledgers): then a round in
    progress cannot be abandoned without leaving that state a round ahead of the run's."""
    return cfg.lora_share == "a-only" or cfg.partition == "silo"
