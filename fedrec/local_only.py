"""`mode=local`: each private user fine-tunes its own adapter on its own data, alone.

The lower baseline of federated recommendation: what a user gets without federation.
Every private user starts from the frozen base and the same initial adapter and takes
the local SGD steps it would take over the whole federated run (`local-epochs` ×
the rounds it is expected to be sampled in, at least `local-epochs`), with the same
local learning rate and no clipping, then is ranked on its own validation and test
item with its own adapter. Nothing is shared, so there is no ε to report. With
`eval-users` > 0 the users are that seeded sample (the federated run's validation users),
which the report then marks as other users than the federated runs'. With the LoRA adapter
the users train many at once (`fedrec.train.alone`); with an item adapter, one at a time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedrec.interrupt import check
from fedrec.cohort import validation_users
from fedrec.config import FedRecConfig
from fedrec.data.split import SplitData
from fedrec.metrics import bootstrap_intervals, metric_means, metric_sums
from fedrec.model.lora import load_adapter_state
from fedrec.model.types import AdapterState
from fedrec.report import print_comparison
from fedrec.results import ResultsDir
from fedrec.train.evaluate import rank_sums, rank_users
from fedrec.train.alone import train_and_rank_alone
from fedrec.train.loop import train_users
from fedrec.train.settings import LocalTraining, RoundContext
from fedrec.workload import describe_adapter, prepare_workload, resolve_device


def local_steps(cfg: FedRecConfig, population: int) -> int:
    """The local epochs one user takes over a federated run of this config (expected)."""
    expected_rounds = cfg.num_rounds * min(1.0, cfg.cohort_size / max(population, 1))
    return max(cfg.local_epochs, round(cfg.local_epochs * expected_rounds))


def one_at_a_time(model: nn.Module, initial: AdapterState, data: SplitData, users: list[int], local: LocalTraining,
                  device: torch.device, advance: Callable[[int], None] = lambda _n: None,
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """The loop engine's steps and a ranking per user, with that user's adapter loaded."""
    alone = RoundContext(round=1, clipping_norm=0.0, device=device)
    rank = dict(max_seq_len=local.max_seq_len, device=device)
    out = {s: (np.zeros(len(users), dtype=np.int64), np.zeros(len(users), dtype=np.int64)) for s in ("valid", "test")}
    for i, u in enumerate(users):
        delta = train_users(model, initial, data, [u], local, alone).delta
        own = {k: v + delta[k].to(v.device) if k in delta else v for k, v in initial.items()}
        load_adapter_state(model, {k: v.to(device) for k, v in own.items()})
        for split, (full, sampled) in out.items():
            f, s = rank_users(model, data, [u], split, **rank)
            full[i], sampled[i] = f[0], s[0]
        advance(1)
    load_adapter_state(model, {k: v.to(device) for k, v in initial.items()})
    return out


def run_local(cfg: FedRecConfig, console: Console | None = None) -> dict:
    console = console or Console(soft_wrap=True)
    t0 = time.time()
    out = ResultsDir(cfg.output_dir, overwrite=cfg.overwrite)
    out.write_config(cfg)
    work = prepare_workload(cfg, log=console.print)
    data, device = work.data, resolve_device(cfg.device)
    model = work.model(device)
    info = describe_adapter(cfg, model, work.item_side, log=console.print)
    users = [int(u) for u in validation_users(data.private, cfg.eval_users, cfg.seed)]
    epochs = local_steps(cfg, len(data.private))
    sample = f" (eval-users={cfg.eval_users}, seeded)" if len(users) < len(data.private) else ""
    console.print(f"local only: {len(users):,} of {len(data.private):,} private users{sample}, each {epochs} local SGD "
                  f"steps at lr {cfg.learning_rate:g} on its own sequence, from the base; {info.dimension:,} parameters "
                  "each, nothing shared")  # fmt: skip
    rank = dict(max_seq_len=cfg.max_seq_len, device=device)
    # each user alone, unclipped, with weight 1: their own full update
    local = dataclasses.replace(LocalTraining.from_config(cfg), local_epochs=epochs)
    base_valid, _ = rank_users(model, data, users, "valid", **rank)
    base_test, base_sampled = rank_users(model, data, users, "test", **rank)
    progress = Progress(TextColumn("local only"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)
    with progress:
        task = progress.add_task("users", total=len(users))
        done = [0]

        def advance(n: int) -> None:
            check(f"after {done[0]:,} of {len(users):,} local-only users; none of it was kept (it has no checkpoint)")
            progress.advance(task, n)
            before, done[0] = done[0], done[0] + n
            step = max(1, len(users) // 10)
            if not console.is_terminal and before // step != done[0] // step:  # a log file sees no bar
                console.print(f"local only: {done[0]:,}/{len(users):,} users, {time.time() - t0:.0f} s")

        if cfg.vectorized and cfg.item_adapter == "none":
            ranks = train_and_rank_alone(model, info.initial, data, users, local, device, on_group=advance)
        else:  # item adapters rank with each user's own item table: one user at a time
            ranks = one_at_a_time(model, info.initial, data, users, local, device, advance)
    (valid, _), (test, sampled) = ranks["valid"], ranks["test"]
    boot = dict(samples=cfg.bootstrap_samples, seed=cfg.seed)
    summary = {
        "mode": "local",
        "engine": "vectorized" if cfg.vectorized and cfg.item_adapter == "none" else "loop",
        "dataset": work.interactions.describe(),
        "private_users": len(data.private),
        "local_users": len(users),
        "public_users": len(data.public),
        "num_items": data.num_items,
        "local_epochs_per_user": epochs,
        "base_valid": metric_means(metric_sums(base_valid)),
        "local_valid": metric_means(metric_sums(valid)),
        "base_test": metric_means(rank_sums(base_test, base_sampled)),
        "base_test_ci": bootstrap_intervals(base_test, **boot),
        "local_test": metric_means(rank_sums(test, sampled)),
        "local_test_ci": bootstrap_intervals(test, **boot),
        "local_test_gain_ci": bootstrap_intervals(test, baseline=base_test, **boot),
        "adapter_dimension": info.dimension,
        "epsilon": None,
        "communication": {"per_user_round": {"down": 0, "up": 0}, "run_total": {"down": 0, "up": 0}},
        "wall_seconds": round(time.time() - t0, 2),
        "results_dir": str(out.path),
    }
    out.write_summary(summary)
    out.release()
    print_comparison(summary, console)
    console.print(f"results: {out.path}")
    return summary
