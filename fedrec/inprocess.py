"""The run's port without Flower: the same engines called in this process.

For tuning loops, tests and benchmarks that want the run's exact round logic (cohort
draw, mechanism, server optimizer, model selection) without a simulation's start-up.
One process trains every user, so it gives the sums the Flower workers would give, up to
the order of float additions.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrec.config import FedRecConfig
from fedrec.metrics import metric_means
from fedrec.model.lora import load_adapter_state
from fedrec.model.types import AdapterState
from fedrec.run import EvalResult, TrainResult
from fedrec.train.engine import train_cohort
from fedrec.train.evaluate import rank_sums, rank_users
from fedrec.local_state import local_store_for
from fedrec.workload import Workload


class InProcessPort:
    def __init__(self, cfg: FedRecConfig, work: Workload, device: torch.device | None = None) -> None:
        if cfg.partition == "silo":
            raise ValueError("partition=silo trains through Flower's cohort workers only")
        self.cfg, self.data = cfg, work.data
        self.device = device or torch.device("cpu")
        self.model = work.model(self.device)

    def train(self, round_: int, cohort: np.ndarray, adapter: AdapterState, clipping_norm: float) -> TrainResult:
        total = train_cohort(self.cfg, self.model, adapter, self.data, [int(u) for u in cohort], round_=round_,
                             clipping_norm=clipping_norm, device=self.device)  # fmt: skip
        return TrainResult(total)

    def evaluate(self, round_: int, users: np.ndarray, adapter: AdapterState, split: str) -> EvalResult:
        load_adapter_state(self.model, {k: v.to(self.device) for k, v in adapter.items()})
        users = [int(u) for u in users]
        full, sampled = rank_users(self.model, self.data, users, split, max_seq_len=self.cfg.max_seq_len,
                                   device=self.device, local_store=local_store_for(self.cfg))  # fmt: skip
        return EvalResult(metric_means(rank_sums(full, sampled)), dict(zip(users, full.tolist())))
