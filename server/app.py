"""The Flower ServerApp: wiring only. The config is resolved, the nodes connected, and the
run object (`fedrec.run.FederatedRun`) drives the rounds through the strategy (its port)."""

from __future__ import annotations

import json
import os
import time

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedrec import checkpoint
from fedrec.communication import state_bytes
from fedrec.config import FedRecConfig
from fedrec.report import print_comparison
from fedrec.results import ResultsDir, default_output_dir
from fedrec.run import FederatedRun
from fedrec.workload import describe_adapter, load_workload, update_keys
from server.strategy import BaseShipment, FedRecStrategy

ENV_OVERRIDES = "FEDREC_RUN_CONFIG"

app = ServerApp()


def server_configs(run_config: dict) -> list[FedRecConfig]:
    """The runs' configs, validated once. `fedrec.simulate` resolves and validates them and
    passes them through the environment (`run_simulation` hands the ServerApp an empty
    run-config); `flwr run` gives pyproject defaults + --run-config, validated here."""
    if not os.environ.get(ENV_OVERRIDES):
        return [FedRecConfig.from_mapping(dict(run_config))]
    resolved = json.loads(os.environ[ENV_OVERRIDES])
    return [FedRecConfig.resolved(r) for r in (resolved if isinstance(resolved, list) else [resolved])]


@app.main()
def main(grid: Grid, context: Context) -> None:
    configs = server_configs(context.run_config)
    console = Console(soft_wrap=True)
    for i, cfg in enumerate(configs, start=1):
        if len(configs) > 1:  # one simulation, several runs: Ray and the workers start once
            console.rule(f"run {i}/{len(configs)}: {cfg.output_dir}")
        run_federated(grid, cfg, console=console, context=context)


def run_federated(grid: Grid, cfg: FedRecConfig, console: Console | None = None, context: Context | None = None) -> dict:
    console = console or Console(soft_wrap=True)
    started = time.time()
    state = folder = resumed_round = None
    if cfg.resume_from:  # the stored config, with only the changes a resumed run may make
        state, stored, folder = checkpoint.load(cfg.resume_from)
        cfg, resumed_round = checkpoint.resume_config(stored, cfg), int(state["round"])
    out = ResultsDir(cfg.output_dir or default_output_dir(cfg.mode), resume_round=resumed_round)
    cfg = cfg.replace(output_dir=str(out.path))
    out.write_config(cfg)
    work = load_workload(cfg, log=console.print)
    model = work.model()
    adapter = describe_adapter(cfg, model, work.item_side, log=console.print)
    base = BaseShipment(work.base_path.stem, work.base_path, work.data.item_ids, work.data.user_ids, work.item_side)
    strategy = FedRecStrategy(cfg, work.data.private, base=base, log=console.print, context=context,
                              update_keys=update_keys(cfg, model))  # fmt: skip
    strategy.connect(grid)  # in device placement the population becomes the users whose devices answered
    ready_seconds = time.time() - started
    nodes = len(strategy.workers) or len(strategy.user_node)
    console.print(f"federation: placement={cfg.placement}, {nodes} SuperNodes, cohort {cfg.cohort_size} "
                  f"of {len(strategy.population):,} users")  # fmt: skip
    run = FederatedRun(cfg, adapter.initial, strategy.population, dimension=adapter.dimension, out=out, log=console.print,
                       sent_keys=adapter.sent, public=work.data.public)
    if state is not None:
        run.resume(state, folder)
    about = {"dataset": work.interactions.describe(), "adapter_parameters": adapter.parameters,
             "public_users": len(work.data.public), "num_items": work.data.num_items,
             "subsets": work.cold_subsets(strategy.population), "setup_traffic": strategy.setup_traffic}  # fmt: skip
    if cfg.placement == "device":  # what a real device downloads once (FedRecStrategy._setup_devices ships it)
        shipped = torch.load(work.base_path, map_location="cpu", weights_only=True)
        about["once_per_device"] = {"base": state_bytes(shipped),
                                    "catalogue": sum(len(str(i).encode()) for i in work.data.item_ids)}  # fmt: skip
    summary = run.execute(strategy, started=started, ready_seconds=ready_seconds, about=about)
    if strategy.worker_places:
        ray_nodes = set(strategy.worker_places.values()) - {""}
        console.print(f"workers: {len(strategy.worker_places)} processes trained"
                      + (f", on {len(ray_nodes)} Ray node(s)" if ray_nodes else ""))  # fmt: skip
    print_comparison(summary, console)
    console.print(f"results: {out.path}")
    return summary
