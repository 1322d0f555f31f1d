"""The end of a run: which round is its result, that round's test metrics with intervals,
and the typed summary (`fedrec.summary.RunSummary`) the callbacks then write out.

`run` below is the `fedrec.run.FederatedRun` that calls `finish` (named, not imported:
the run imports this module).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedrec.provenance import provenance
from fedrec.callbacks import RunResult
from fedrec.communication import communication_summary
from fedrec.metrics import metric_means, metric_sums, user_intervals
from fedrec.model.types import AdapterState
from fedrec.port import RoundPort
from fedrec.privacy.mechanism import whatif_label
from fedrec.summary import RunSummary


@dataclass
class RunFacts:
    """What only the caller knows about a run, for its summary."""

    dataset: str | None = None
    adapter_parameters: int | None = None
    public_users: int | None = None
    num_items: int | None = None
    subsets: dict[str, Any] = field(default_factory=dict)  # name → users, e.g. test targets that are cold items
    setup_traffic: dict[str, Any] | None = None
    once_per_device: dict[str, Any] | None = None


@dataclass
class Pick:
    """The round a run's result is taken from."""

    how: str  # private | last | public
    round: int
    valid: dict[str, float]
    adapter: AdapterState


def pick(run) -> Pick:
    """`private`: best private validation; `last`; `public`: best public held-out round.
    lora-share=a-only is always `last`: users' own B cannot be rolled back."""
    how = "last" if run.cfg.lora_share == "a-only" else run.selection
    if how == "last":
        return Pick(how, run.round, run.rows[-1].get("valid", {}), run.adapter)
    if how == "public":
        valid = next((r.get("valid", {}) for r in run.rows if r["round"] == run.pick.round), {})
        return Pick(how, run.pick.round, valid, run.pick.adapter)
    return Pick(how, run.best.round, run.best.valid, run.best.adapter)


def _say_pick(run, chosen: Pick) -> None:
    last = f"the last round ({run.round}) is the run's result"
    if run.cfg.lora_share == "a-only":
        last += " (lora-share=a-only: users' own B cannot be rolled back)"
    else:
        last += " (model-selection=last" + (": under DP, private validation carries no noise)" if run.cfg.dp_enabled else ")")
    run.log({
        "private": f"best validation NDCG@10 at round {chosen.round}; its adapter is the run's result",
        "last": last,
        "public": f"best public held-out NDCG@10 at round {chosen.round}; its adapter is the run's result",
    }[chosen.how])  # fmt: skip


def finish(run, port: RoundPort, facts: RunFacts, timing: dict[str, float]) -> RunResult:
    """Evaluate the picked round (and the last, and the private-validation best as a labelled
    diagnostic) on the test users; `timing`: started, ready_seconds, round1_at."""
    cfg, chosen = run.cfg, pick(run)
    _say_pick(run, chosen)
    test = port.evaluate(chosen.round, run.test_users, chosen.adapter, "test")
    last = test if chosen.round == run.round else port.evaluate(run.round, run.test_users, run.adapter, "test")
    boot = dict(samples=cfg.bootstrap_samples, seed=cfg.seed)  # 95% intervals over test users
    base_ranks = run.base["ranks"]
    report = run.mechanism.report(run.dimension)
    summary = RunSummary(
        dataset=facts.dataset, placement=cfg.placement, base_test=run.base["test"], test=test.metrics,
        base_valid=run.base["valid"], valid=chosen.valid, best_round=chosen.round, last_round_test=last.metrics,
        base_test_ci=user_intervals(base_ranks, **boot), test_ci=user_intervals(test.ranks, **boot),
        last_round_test_ci=user_intervals(last.ranks, **boot),
        test_gain_ci=user_intervals(test.ranks, base_ranks, **boot),  # paired by user
        rounds=run.round, selection=chosen.how,
        diagnostic_private_best=_private_best(run, port, chosen, boot),
        subsets={name: (_subset_means(base_ranks, users), _subset_means(test.ranks, users))
                 for name, users in facts.subsets.items()},
        epsilon=report.epsilon, delta=report.delta, noise_multiplier=report.noise_multiplier,
        sampling_rate=report.sampling_rate, clipping_norm=cfg.clipping_norm, adapter_dimension=run.dimension,
        noise_to_signal=report.noise_to_signal,
        silo_epsilon=run.rows[-1]["train"].get("silo-epsilon") if cfg.partition == "silo" else None,
        **_throughput(run, timing),
        adapter_bytes=int(sum(t.numel() * t.element_size() for t in chosen.adapter.values())),
        adapter_parameters=facts.adapter_parameters, private_users=len(run.population),
        test_users=len(run.test_users), public_users=facts.public_users, num_items=facts.num_items,
        results_dir=str(run.out.path) if run.out else None, provenance=provenance(),
        whatif=whatif_label(run.mechanism.whatif) if getattr(run.mechanism, "whatif", None) else None,
        communication=communication_summary(run.adapter, run.sent_keys, run.users_trained, run.rows, cfg.placement,
                                            facts.setup_traffic, facts.once_per_device),
    )  # fmt: skip
    return RunResult(summary, chosen.adapter)


def _throughput(run, timing: dict[str, float]) -> dict[str, Any]:
    """Training rounds only (send, local training, receive, server step), no evaluation."""
    return {
        "users_trained": run.users_trained,
        "users_per_second": run.users_trained / run.train_seconds if run.train_seconds > 0 else None,
        "train_seconds": round(run.train_seconds, 3),
        "ready_seconds": round(timing["ready_seconds"], 3),  # start to all nodes warm
        "round1_at": timing["round1_at"],
        "server_started_at": round(timing["started"], 3),
        "worker_peak_rss_mb": run.peak_rss,
        "wall_seconds": round(time.time() - timing["started"], 2),
    }


def _private_best(run, port: RoundPort, chosen: Pick, boot: dict[str, Any]) -> dict[str, Any] | None:
    """The round private validation (no noise) would have picked, labelled: under DP this
    choice is outside the guarantee, so it is never the headline."""
    if chosen.how == "private":
        return None
    if run.best.round == chosen.round:
        return {"note": "private validation picks the same round", "round": run.best.round}
    diag = port.evaluate(run.best.round, run.test_users, run.best.adapter, "test")
    return {
        "note": "round picked on private validation without noise: a diagnostic outside the privacy guarantee",
        "round": run.best.round, "valid": run.best.valid, "test": diag.metrics,
        "test_ci": user_intervals(diag.ranks, **boot),
    }  # fmt: skip


def _subset_means(ranks: dict[int, int], users) -> dict[str, float]:
    """HR/NDCG means over the users of a subset (with their count as `users`)."""
    own = np.asarray([ranks[int(u)] for u in users if int(u) in ranks], dtype=np.int64)
    return metric_means(metric_sums(own)) if len(own) else {"users": 0.0}
