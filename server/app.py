"""The Flower ServerApp: resolve the config, run the rounds, write the results directory.

The round loop is our own rather than `Strategy.start` because a run also needs the
base model's federated evaluation before round 1, evaluation only every `eval-every`
rounds, a test evaluation at the end, and a results directory; the per-round work is
the strategy's configure/aggregate methods.
"""

from __future__ import annotations

import json
import os
import time

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedrec.aggregate import ServerOptimizer
from fedrec.config import FedRecConfig
from fedrec.local_state import is_local
from fedrec.metrics import user_intervals
from fedrec.model.lora import ITEM_DELTA, adapter_bytes, adapter_parameters, adapter_state
from fedrec.privacy.mechanism import make_plan
from fedrec.report import print_comparison
from fedrec.results import ResultsDir, default_output_dir
from fedrec.workload import describe_item_adapter, load_workload
from server.strategy import BaseShipment, FedRecStrategy

ENV_OVERRIDES = "FEDREC_RUN_CONFIG"

app = ServerApp()


def server_configs(run_config: dict) -> list[FedRecConfig]:
    """Run-config from Flower (pyproject defaults + --run-config), then the simulate overrides.

    `run_simulation` hands the ServerApp an empty run-config, so `fedrec.simulate` passes
    the resolved config through the environment instead: one mapping, or a list of them
    for several runs on the same federation (`fedrec.simulate.run_many`).
    """
    cfg = FedRecConfig.from_mapping(dict(run_config))
    if not os.environ.get(ENV_OVERRIDES):
        return [cfg]
    overrides = json.loads(os.environ[ENV_OVERRIDES])
    return [FedRecConfig.from_mapping(o, cfg) for o in (overrides if isinstance(overrides, list) else [overrides])]


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
    t0 = time.time()
    out = ResultsDir(cfg.output_dir or default_output_dir(cfg.mode))
    cfg = cfg.replace(output_dir=str(out.path))
    out.write_config(cfg)
    work = load_workload(cfg, log=console.print)
    model = work.model()
    initial = adapter_state(model)
    n_total = sum(t.numel() for t in initial.values())
    n_params = sum(p.numel() for p in adapter_parameters(model).values())  # trained and sent: d
    item = describe_item_adapter(cfg, work.item_side, sum(v.numel() for k, v in initial.items() if ITEM_DELTA in k))
    console.print(
        f"adapter: LoRA r={cfg.lora_rank} on {cfg.lora_targets}{item}: {n_total:,} parameters, "
        f"{adapter_bytes(initial):,} bytes; {n_params:,} trained and sent per user ({cfg.lora_train})"
    )
    if cfg.item_adapter != "none" and not cfg.dp_enabled:
        console.print(
            f"note: item-adapter={cfg.item_adapter} sends an image of the item table's gradient, which shows which "
            "items a user touched; without DP noise only the sum protects it (cohort placement sums inside the "
            "worker; device placement needs secure-aggregation=secagg+)"
        )
    optimizer = ServerOptimizer(initial, cfg.server_optimizer, cfg.server_learning_rate, cfg.server_momentum)
    base = BaseShipment(work.base_path.stem, work.base_path, work.data.item_ids, work.data.user_ids, work.item_side)
    update_keys = [k for k in adapter_parameters(model) if not (cfg.lora_share == "a-only" and is_local(k))]
    strategy = FedRecStrategy(cfg, work.data.private, optimizer, base=base, log=console.print, context=context,
                              update_keys=update_keys)  # fmt: skip
    strategy.connect(grid)
    ready_seconds = time.time() - t0
    nodes = len(strategy.workers) or len(strategy.user_node)
    population = len(strategy.population)
    console.print(f"federation: placement={cfg.placement}, {nodes} SuperNodes, cohort {cfg.cohort_size} of {population:,} users")
    if cfg.secure_aggregation == "secagg+":
        console.print(
            f"privacy: SecAgg+ ({cfg.secagg_shares} shares, threshold {cfg.secagg_threshold}): the server learns only "
            "the sum of the cohort's clipped updates, never one user's; per-user loss and norm stay on the devices"
        )
    # After connect: in device placement the population is the users whose devices answered.
    plan = make_plan(cfg, population, log=console.print)
    strategy.plan = plan
    if plan.enabled:  # the ε of every planned round, composed while the clients train
        plan.accountant.compose_ahead([plan.event(r) for r in range(1, cfg.num_rounds + 1)])

    if cfg.partition == "silo":
        console.print(
            f"privacy: partition=silo, {cfg.num_silos} silos, sample-level DP-SGD (Opacus, PRV) with "
            f"z={cfg.dpsgd_noise_multiplier}, C={cfg.dpsgd_max_grad_norm}: protects each example (a user's "
            "sequence) within a silo, not users across silos"
        )
    arrays = ArrayRecord(initial)
    base_valid = strategy.evaluate_round(grid, 0, arrays, "valid")
    base_test = strategy.evaluate_round(grid, 0, arrays, "test")
    base_ranks = strategy.last_ranks
    rows = [{"round": 0, "valid": base_valid, "seconds": round(time.time() - t0, 3)}]
    out.append_metrics(rows[0])
    console.print(f"round   0/{cfg.num_rounds} | base model            | val NDCG@10 {base_valid['ndcg@10']:.4f}")
    users_trained, train_seconds, peak_rss = 0, 0.0, 0.0
    # Model selection on validation, as in centralized training: the adapter that the
    # run returns is the one of the best validated round (round 0 = the base itself).
    best_round, best_valid, best_arrays = 0, base_valid, arrays
    round1_at = time.time()
    rounds_run = 0

    def over_budget(rnd: int) -> bool:
        return bool(plan.enabled and cfg.max_epsilon and plan.epsilon_after_next(rnd) > cfg.max_epsilon)

    for rnd in range(1, cfg.num_rounds + 1):
        if over_budget(rnd):
            console.print(
                f"stopping before round {rnd}: it would take ε from {plan.accountant.spent:.3f} "
                f"past max-epsilon={cfg.max_epsilon}"
            )
            break
        rounds_run = rnd
        t_round = time.time()
        if rnd == 1:
            round1_at = time.time()
        arrays, train_metrics = strategy.train_round(grid, rnd, arrays)
        train_seconds += time.time() - t_round
        users_trained += int(train_metrics["users"])
        peak_rss = max(peak_rss, float(train_metrics["worker-peak-rss-mb"]))
        row: dict = {"round": rnd, "train": {k: float(v) for k, v in train_metrics.items()}}
        last = rnd == cfg.num_rounds or over_budget(rnd + 1)
        if (cfg.eval_every and rnd % cfg.eval_every == 0) or last:
            row["valid"] = strategy.evaluate_round(grid, rnd, arrays, "valid")
            if row["valid"]["ndcg@10"] > best_valid["ndcg@10"]:
                best_round, best_valid, best_arrays = rnd, row["valid"], arrays
        row["seconds"] = round(time.time() - t_round, 3)
        out.append_metrics(row)
        rows.append(row)
        val = f"val NDCG@10 {row['valid']['ndcg@10']:.4f}" if "valid" in row else ""
        eps = f" | ε {float(train_metrics['epsilon']):.3f}" if plan.enabled else ""
        eps += f" | silo ε {float(train_metrics['silo-epsilon']):.3f}" if "silo-epsilon" in train_metrics else ""
        console.print(
            f"round {rnd:3d}/{cfg.num_rounds} | users {int(train_metrics['users']):4d} "
            f"| loss {float(train_metrics['loss']):.4f} | {val:<19}{eps} | {row['seconds']:.2f} s"
        )
    if cfg.lora_share == "a-only":
        # Users' own B cannot be rolled back to an earlier round: the result is the last round.
        best_round, best_arrays, best_valid = rounds_run, arrays, rows[-1].get("valid", best_valid)
    test = strategy.evaluate_round(grid, best_round, best_arrays, "test")
    test_ranks = strategy.last_ranks
    last_test = test if best_round == rounds_run else strategy.evaluate_round(grid, rounds_run, arrays, "test")
    last_ranks = strategy.last_ranks
    # 95% bootstrap intervals over test users; the gain over the base is paired by user.
    boot = dict(samples=cfg.bootstrap_samples, seed=cfg.seed)
    intervals = {
        "base_test_ci": user_intervals(base_ranks, **boot),
        "test_ci": user_intervals(test_ranks, **boot),
        "last_round_test_ci": user_intervals(last_ranks, **boot),
        "test_gain_ci": user_intervals(test_ranks, base_ranks, **boot),
    }
    if cfg.lora_share == "a-only":
        console.print("lora-share=a-only: the last round (with each user's own B) is the run's result")
    else:
        console.print(f"best validation NDCG@10 at round {best_round}; its adapter is the run's result")
    final = best_arrays.to_torch_state_dict()
    out.save_adapter(final)
    out.save_adapter(arrays.to_torch_state_dict(), "adapter_last_round.safetensors")
    out.plot_validation(rows)
    summary = {
        "mode": "federated",
        "dataset": work.interactions.describe(),
        "placement": cfg.placement,
        "base_test": base_test,
        "test": test,
        "base_valid": base_valid,
        "valid": best_valid,
        "best_round": best_round,
        "last_round_test": last_test,
        **intervals,
        "rounds": rounds_run,
        "epsilon": plan.accountant.spent if plan.enabled else None,
        "delta": plan.delta if plan.enabled else None,
        "noise_multiplier": plan.noise_multiplier if plan.enabled else None,
        "sampling_rate": plan.q if plan.enabled else None,
        "clipping_norm": cfg.clipping_norm,  # as configured (adaptive clipping moves it: privacy.json)
        "adapter_dimension": n_params,
        # Noise norm over a fully agreeing mean update: z·√d/m (m = expected cohort size;
        # z is the update's own multiplier, z_Δ under adaptive clipping).
        "noise_to_signal": plan.update_noise_multiplier * n_params**0.5 / plan.expected_users if plan.enabled else None,
        "silo_epsilon": rows[-1]["train"].get("silo-epsilon") if cfg.partition == "silo" else None,
        "users_trained": users_trained,
        # Training rounds only (send, local training, receive, server step), no evaluation.
        "users_per_second": users_trained / train_seconds if train_seconds > 0 else None,
        "train_seconds": round(train_seconds, 3),
        "ready_seconds": round(ready_seconds, 3),  # ServerApp start to all nodes warm
        "round1_at": round1_at,  # wall clock (epoch s) when round 1 started
        "worker_peak_rss_mb": peak_rss,
        "wall_seconds": round(time.time() - t0, 2),
        "adapter_bytes": adapter_bytes(final),
        "adapter_parameters": n_total,
        "private_users": len(strategy.population),
        "public_users": len(work.data.public),
        "num_items": work.data.num_items,
        "results_dir": str(out.path),
    }
    out.write_summary(summary)
    out.write_privacy(plan.accountant.to_dict() if plan.enabled else {"accountant": None, "epsilon": None})
    print_comparison(summary, console)
    console.print(f"results: {out.path}")
    return summary
