"""The Flower ServerApp: wiring only. The config is resolved, the nodes connected, and the
run object (`fedrec.run.FederatedRun`, built by `fedrec.assemble`) drives the rounds
through `server.grid_port.GridPort`, its port over Flower's Grid."""

from __future__ import annotations

import json
import os
import time

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedrec.assemble import build_run, open_results, run_facts
from fedrec.communication import state_bytes
from fedrec.config import FedRecConfig
from fedrec.data.load import check_inputs
from fedrec.interrupt import Interrupted, hand_over
from fedrec.progress import eta
from fedrec.report import print_comparison
from fedrec.run import calibrate_ahead
from fedrec.summary import RunSummary
from fedrec.workload import describe_adapter, prepare_workload, update_keys
from server.grid_port import BaseShipment, GridPort

ENV_OVERRIDES = "FEDREC_RUN_CONFIG"

app = ServerApp()


def server_configs(run_config: dict) -> list[FedRecConfig]:
    """The runs' configs, validated once. `fedrec.simulate` resolves and validates them and
    passes them through the environment (`run_simulation` hands the ServerApp an empty
    run-config); `flwr run` gives pyproject defaults + --run-config, validated here."""
    if not os.environ.get(ENV_OVERRIDES):
        cfg = FedRecConfig.from_mapping(dict(run_config))
        check_inputs(cfg)  # the files this server reads, before it starts
        return [cfg]
    resolved = json.loads(os.environ[ENV_OVERRIDES])
    return [FedRecConfig.resolved(r) for r in (resolved if isinstance(resolved, list) else [resolved])]


@app.main()
def main(grid: Grid, context: Context) -> None:
    configs = server_configs(context.run_config)
    console = Console(soft_wrap=True)
    started = time.monotonic()
    for i, cfg in enumerate(configs, start=1):
        if len(configs) > 1:  # one simulation, several runs: Ray and the workers start once
            left = eta(i - 1, len(configs), time.monotonic() - started)
            console.rule(f"run {i}/{len(configs)}: {cfg.output_dir}" + (f" (about {left} left)" if left else ""))
        try:
            run_federated(grid, cfg, console=console, context=context)
        except Interrupted as stop:  # Ctrl-C or SIGTERM: the run kept its checkpoint (fedrec.interrupt)
            hand_over(stop)  # the driver says what was kept
            return


def run_federated(grid: Grid, cfg: FedRecConfig, console: Console | None = None, context: Context | None = None) -> RunSummary:
    console = console or Console(soft_wrap=True)
    started = time.time()
    cfg, out, state, folder = open_results(cfg)
    work = prepare_workload(cfg, log=console.print)
    model = work.model()
    adapter = describe_adapter(cfg, model, work.item_side, log=console.print)
    base = BaseShipment(work.base_path.stem, work.base_path, work.data.item_ids, work.data.user_ids, work.item_side)
    port = GridPort(cfg, work.data.private, base=base, log=console.print, context=context,
                    update_keys=update_keys(cfg, model))  # fmt: skip
    if state is None:  # a resumed run keeps the z it ran with
        calibrate_ahead(cfg, len(work.data.private))  # while the nodes start (build_run takes its z)
    port.connect(grid)  # in device placement the population becomes the users whose devices answered
    ready_seconds = time.time() - started
    nodes = len(port.workers) or len(port.user_node)
    console.print(f"federation: placement={cfg.placement}, {nodes} SuperNodes, cohort {cfg.cohort_size} "
                  f"of {len(port.population):,} users")  # fmt: skip
    run = build_run(cfg, work, adapter, port.population, out=out, log=console.print)
    if state is not None:
        run.resume(state, folder)
    facts = run_facts(work, adapter, port.population, setup_traffic=port.setup_traffic)
    if cfg.placement == "device":  # what a real device downloads once (GridPort._setup_devices ships it)
        shipped = torch.load(work.base_path, map_location="cpu", weights_only=True)
        facts.once_per_device = {"base": state_bytes(shipped),
                                 "catalogue": sum(len(str(i).encode()) for i in work.data.item_ids)}  # fmt: skip
    summary = run.execute(port, started=started, ready_seconds=ready_seconds, facts=facts)
    if port.worker_places:
        ray_nodes = set(port.worker_places.values()) - {""}
        console.print(f"workers: {len(port.worker_places)} processes trained"
                      + (f", on {len(ray_nodes)} Ray node(s)" if ray_nodes else ""))  # fmt: skip
    print_comparison(summary, console)
    console.print(f"results: {out.path}")
    return summary
