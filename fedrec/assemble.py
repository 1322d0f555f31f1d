"""A federated run put together from its config: the one set-up of the ServerApp
(`server/app.py`) and of in-process runs (`fedrec.inprocess`), so the two cannot drift."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedrec import checkpoint
from fedrec.callbacks import RunCallback
from fedrec.config import FedRecConfig
from fedrec.finish import RunFacts
from fedrec.results import ResultsDir, default_output_dir
from fedrec.tracking import tracking_callbacks
from fedrec.run import FederatedRun
from fedrec.workload import AdapterInfo, Workload


def open_results(cfg: FedRecConfig) -> tuple[FedRecConfig, ResultsDir, dict[str, Any] | None, Path | None]:
    """The results directory and the config that names it (written as config.toml); when
    resuming, the stored config with the changes a resume may make, the checkpoint's state
    and its folder (the directory keeps the rounds up to it)."""
    state = folder = resumed_round = None
    if cfg.resume_from:
        state, stored, folder = checkpoint.load(cfg.resume_from)
        cfg, resumed_round = checkpoint.resume_config(stored, cfg), int(state["round"])
    out = ResultsDir(cfg.output_dir or default_output_dir(cfg.mode), resume_round=resumed_round, overwrite=cfg.overwrite)
    cfg = cfg.replace(output_dir=str(out.path))
    out.write_config(cfg)
    return cfg, out, state, folder


def build_run(
    cfg: FedRecConfig, work: Workload, adapter: AdapterInfo, population: np.ndarray, *, out: ResultsDir | None,
    log: Callable[[str], None], callbacks: list[RunCallback] | None = None,
) -> FederatedRun:  # fmt: skip
    """The run over `population` (the private users that can train: in device placement,
    those whose devices answered), picking on the public users where asked."""
    return FederatedRun(cfg, adapter.initial, population, dimension=adapter.dimension, out=out, log=log,
                        sent_keys=adapter.sent, public=work.data.public,
                        callbacks=tracking_callbacks(cfg) + list(callbacks or []))  # fmt: skip


def run_facts(work: Workload, adapter: AdapterInfo, population: np.ndarray, **more: Any) -> RunFacts:
    """What the summary says about the data and the adapter; `more`: the port's own
    (setup traffic, what a device downloads once)."""
    return RunFacts(dataset=work.interactions.describe(), adapter_parameters=adapter.parameters,
                    public_users=len(work.data.public), num_items=work.data.num_items,
                    subsets=work.cold_subsets(population), **more)  # fmt: skip
