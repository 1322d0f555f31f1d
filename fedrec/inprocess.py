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
from fedrec.model.types import AdapterState
from fedrec.assemble import build_run, open_results, run_facts
from fedrec.port import EvalResult, TrainResult
from fedrec.summary import RunSummary
from fedrec.train.engine import train_cohort
from fedrec.train.evaluate import rank_sums, rank_with_adapter
from fedrec.workload import Workload, describe_adapter, prepare_workload


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
        users = [int(u) for u in users]
        full, sampled = rank_with_adapter(self.cfg, self.model, adapter, self.data, users, split, self.device)
        return EvalResult(metric_means(rank_sums(full, sampled)), dict(zip(users, full.tolist())))


def run_in_process(cfg: FedRecConfig, out: Path | None = None, log: Callable[[str], None] = print) -> RunSummary:
    """A whole federated run through `InProcessPort` (no Flower), set up as the ServerApp
    sets one up (`fedrec.assemble`): its summary, and its results directory in `out` when given."""
    results = state = folder = None
    if out is not None:
        cfg, results, state, folder = open_results(cfg.replace(output_dir=str(out)))
    work = prepare_workload(cfg, log=log)
    port = InProcessPort(cfg, work)
    info = describe_adapter(cfg, port.model, work.item_side, log=log)
    run = build_run(cfg, work, info, work.data.private, out=results, log=log)
    if state is not None:  # resume-from: the checkpoint's state and the clients' folder
        run.resume(state, folder)
    return run.execute(port, started=time.time(), ready_seconds=0.0, facts=run_facts(work, info, work.data.private))
