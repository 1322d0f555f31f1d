"""What the local engines are told: the run's fixed training settings and one round's context.

Why two objects: the settings come from the config once and never change during a run,
while the context changes every round (its clipping norm adapts under adaptive clipping).
Both engines (`loop`, `vectorized`) take the same pair, so a knob has one name everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fedrec.config import FedRecConfig
from fedrec.local_state import UserStateStore, is_local


@dataclass(frozen=True)
class LocalTraining:
    """How each user trains locally: `local_epochs` full-batch SGD steps at `learning_rate`.

    `user_weighting` weighs a clipped update in the sum (`uniform` or by its targets).
    `vector_tokens` bounds a group's padded tokens in the vectorized engine (the default
    sits inside a broad range of sizes that ran alike, above the sizes that ran slower:
    experiments/README.md#throughput-tried). `scoring_dtype` is the scoring GEMMs' dtype there; `chunk` its rows per GEMM
    (None: `scoring_chunk`'s default for the device). The loop ignores these three.
    """

    local_epochs: int
    learning_rate: float
    max_seq_len: int
    seed: int
    user_weighting: str = "uniform"
    vector_tokens: int = 8192
    scoring_dtype: torch.dtype = torch.float32
    chunk: int | None = None

    @classmethod
    def from_config(cls, cfg: FedRecConfig) -> LocalTraining:
        return cls(
            local_epochs=cfg.local_epochs, learning_rate=cfg.learning_rate, max_seq_len=cfg.max_seq_len,
            seed=cfg.seed, user_weighting=cfg.user_weighting, vector_tokens=cfg.vector_tokens,
            scoring_dtype=getattr(torch, cfg.scoring_dtype),
        )  # fmt: skip

    def scoring_chunk(self, device: torch.device) -> int:
        """The scoring layer's rows per GEMM: 128 on CPU, so that the (rows × items) buffers
        stay near L2 size (nearby sizes ran alike:
        experiments/README.md#scoring-chunk), 4096 on a GPU, where each chunk
        is a few kernel launches (a guess, not yet measured on a GPU)."""
        return self.chunk or (128 if device.type == "cpu" else 4096)


@dataclass(frozen=True)
class RoundContext:
    """One round's share of a cohort: the round (it seeds dropout), the clipping norm, the
    device, and the store of tensors users keep (lora-share=a-only), else None."""

    round: int
    clipping_norm: float
    device: torch.device
    local_store: UserStateStore | None = None

    def split_keys(self, trainable: Iterable[str]) -> tuple[list[str], list[str]]:
        """(shared, kept): the trained tensors whose updates join the sum, and those each
        user keeps for themselves (none without a store)."""
        names = list(trainable)
        kept = [k for k in names if is_local(k)] if self.local_store is not None else []
        return [k for k in names if k not in kept], kept
