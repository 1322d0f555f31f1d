"""The run's port without Flower: the same engines called in this process.

For tuning loops, tests and benchmarks that want the run's exact round logic (cohort
draw, mechanism, server optimizer, model selection) without a simulation's start-up.
One process trains every user, so it gives the sums the Flower workers would give, up to
the order of float additions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedrec.config import FedRecConfig
from fedrec.metrics import metric_means
from fedrec.model.lora import load_adapter_state
from fedrec.model.types import AdapterState
from fedrec.results import ResultsDir
from fedrec.run import EvalResult, FederatedRun, TrainResult
from fedrec.train.engine import train_cohort
from fedrec.train.evaluate import rank_sums, rank_users
from fedrec.local_state import local_store_for
from fedrec.workload import Workload, describe_adapter, load_workload


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


def run_in_process(cfg: FedRecConfig, out: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """A whole federated run through `InProcessPort` (no Flower): its summary, and its
    results directory in `out` when given."""
    work = load_workload(cfg, log=log)
    port = InProcessPort(cfg, work)
    info = describe_adapter(cfg, port.model, work.item_side, log=log)
    results = ResultsDir(out) if out is not None else None
    if results is not None:
        results.write_config(cfg)
    run = FederatedRun(cfg, info.initial, work.data.private, dimension=info.dimension, out=results, log=log,
                       sent_keys=info.sent, public=work.data.public)  # fmt: skip
    return run.execute(port, started=time.time(), ready_seconds=0.0, about={"dataset": work.interactions.describe()})
