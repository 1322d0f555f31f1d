"""The fedrec Strategy: server-drawn cohorts, sums of clipped updates, FedOpt step.

A `flwr.serverapp.strategy.Strategy` subclass because the built-in strategies need one
ArrayRecord plus `num-examples` per reply and sample nodes themselves; here the server
samples users (seeded), routes them to nodes, and each reply is already a sum.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedrec.aggregate import ServerOptimizer, UpdateSum, mean_update
from fedrec.cohort import assign_silos, split_among
from fedrec.config import FedRecConfig
from fedrec.metrics import add_sums, metric_means
from fedrec.privacy.mechanism import PrivacyPlan

NODE_WAIT_S = 120.0
PULL_INTERVAL_S = 0.005


class FedRecStrategy(Strategy):
    def __init__(self, cfg: FedRecConfig, population: np.ndarray, optimizer: ServerOptimizer, plan: PrivacyPlan) -> None:
        self.cfg = cfg
        self.plan = plan
        self.silos = assign_silos(population, cfg.num_silos, cfg.seed) if cfg.partition == "silo" else []
        self.population = np.asarray(population, dtype=np.int64)
        self.optimizer = optimizer
        self.workers: list[int] = []
        self.user_node: dict[int, int] = {}
        self._run_config = ConfigRecord(cfg.to_dict())
        valid_rng = np.random.default_rng([cfg.seed, 0xE7A1])
        self.valid_users = (
            np.sort(valid_rng.choice(self.population, cfg.eval_users, replace=False))
            if 0 < cfg.eval_users < len(self.population)
            else self.population
        )

    # ------------------------------------------------------------ node routing
    def connect(self, grid: Grid, timeout: float = NODE_WAIT_S) -> None:
        """Wait for the nodes this placement needs; in device placement, learn who holds whom."""
        if hasattr(grid, "pull_interval"):
            # The simulation's in-memory grid polls for replies every 0.1 s by default
            # (a constructor argument we cannot reach through run_simulation); at a few
            # hundred ms per round that idle wait is a large share of the round.
            grid.pull_interval = PULL_INTERVAL_S
        need = self.cfg.num_workers if self.cfg.placement == "cohort" else len(self.population)
        deadline = time.monotonic() + timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= need:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {need} SuperNodes connected after {timeout:.0f} s")
            time.sleep(0.2)
        if self.cfg.placement == "cohort":
            nodes = nodes[:need]
        # The query also warms each node (data, base model, torch) before round 1.
        content = RecordDict({"run-config": self._run_config})
        queries = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        replies = self._receive(grid, queries, "identify")
        if self.cfg.placement == "cohort":
            self.workers = nodes
            return
        for reply in replies:
            user = int(reply.content["identity"]["user-id"])
            if user >= 0:
                self.user_node[user] = reply.metadata.src_node_id
        missing = [int(u) for u in self.population if int(u) not in self.user_node]
        if missing:
            raise RuntimeError(f"{len(missing)} private users have no device node (e.g. user {missing[0]})")

    def _messages(self, arrays: ArrayRecord, users: np.ndarray, task: dict, message_type: str) -> list[Message]:
        """One message per (node, share of users); silos train as units, one message each."""
        if self.cfg.placement == "device":
            shares = [(self.user_node[int(u)], np.array([u]), {}) for u in users]
        elif self.silos and message_type == MessageType.TRAIN:  # round-robin silos over the workers
            shares = [(self.workers[s % len(self.workers)], share, {"silo": s}) for s, share in enumerate(self.silos)]
        else:
            shares = [(n, share, {}) for n, share in zip(self.workers, split_among(users, len(self.workers)))]
        msgs = []
        for node, share, extra in shares:
            content = RecordDict(
                {
                    "adapter": arrays,
                    "task": ConfigRecord({**task, **extra, "user-ids": [int(u) for u in share]}),
                    "run-config": self._run_config,
                }
            )
            msgs.append(Message(content, dst_node_id=node, message_type=message_type))
        return msgs

    def _receive(self, grid: Grid, msgs: list[Message], what: str) -> list[Message]:
        replies = list(grid.send_and_receive(msgs, timeout=3600))
        failed = [r for r in replies if r.has_error()]
        if failed:
            err = failed[0]
            raise RuntimeError(
                f"{what}: {len(failed)} of {len(msgs)} nodes failed; node {err.metadata.src_node_id}: {err.error.reason}"
            )
        if len(replies) != len(msgs):
            raise RuntimeError(f"{what}: {len(msgs) - len(replies)} of {len(msgs)} nodes did not reply")
        return replies

    # ------------------------------------------------------------ Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Cross-silo: every silo takes part in every round; their privacy is their own (DP-SGD).
        silo = self.cfg.partition == "silo"
        self.cohort = self.population if silo else self.plan.draw(self.population, self.cfg.seed, server_round)
        task = {"round": server_round, "clipping-norm": float(self.plan.clipping_norm)}
        return self._messages(arrays, self.cohort, task, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        total = UpdateSum()
        silo_eps = peak_rss = busiest = 0.0
        for reply in replies:
            counts = {k: float(v) for k, v in reply.content["counts"].items()}
            silo_eps = max(silo_eps, counts.get("silo-epsilon", 0.0))
            peak_rss = max(peak_rss, counts.get("peak-rss-mb", 0.0))
            busiest = max(busiest, counts.get("train-seconds", 0.0))
            if counts["num-users"] > 0:
                total.merge(UpdateSum.from_parts(reply.content["update"].to_torch_state_dict(), counts))
        if total.num_users != len(self.cohort):
            raise RuntimeError(f"round {server_round}: {total.num_users} of {len(self.cohort)} cohort users reported")
        n = max(total.num_users, 1)
        metrics = {
            "users": total.num_users,
            "clipping-norm": self.plan.clipping_norm,
            "loss": total.loss_sum / n,
            "update-norm": total.norm_sum / n,
            "clipped-fraction": total.num_clipped / n,
            "worker-peak-rss-mb": peak_rss,  # the largest of the replying nodes' peak memory
            "worker-train-seconds": busiest,  # the slowest node's time inside its train handler
        }
        if self.silos:
            metrics["silo-epsilon"] = silo_eps  # the largest of the silos' sample-level ε
        if self.plan.enabled:
            # Noise goes on even when Poisson sampling drew nobody: the mechanism's output
            # must not reveal the cohort size.
            summed = total.delta or {k: torch.zeros_like(v) for k, v in self.optimizer.state().items()}
            new_state = self.optimizer.step(self.plan.private_mean(summed, self.cfg.seed, server_round))
            metrics["epsilon"] = self.plan.accountant.spent
        elif total.num_users:
            new_state = self.optimizer.step(mean_update(total))
        else:
            new_state = self.optimizer.state()
        self.plan.adapt_clip(total.num_users - total.num_clipped, total.num_users, self.cfg.seed, server_round)
        return ArrayRecord(new_state), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        split = str(config["split"])
        self.eval_target = self.valid_users if split == "valid" else self.population
        return self._messages(arrays, self.eval_target, {"round": server_round, "split": split}, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        sums: dict[str, float] = {}
        for reply in replies:
            sums = add_sums(sums, {k: float(v) for k, v in reply.content["metrics"].items()})
        if int(sums.get("count", 0)) != len(self.eval_target):
            raise RuntimeError(f"evaluation: {sums.get('count', 0):.0f} of {len(self.eval_target)} users reported")
        return MetricRecord(metric_means(sums))

    def summary(self) -> None:
        pass

    # ------------------------------------------------------------ round helpers
    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, MetricRecord]:
        msgs = list(self.configure_train(server_round, arrays, ConfigRecord(), grid))
        new_arrays, metrics = self.aggregate_train(server_round, self._receive(grid, msgs, "train"))
        assert new_arrays is not None and metrics is not None
        return new_arrays, metrics

    def evaluate_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, split: str) -> dict[str, float]:
        msgs = list(self.configure_evaluate(server_round, arrays, ConfigRecord({"split": split}), grid))
        result = self.aggregate_evaluate(server_round, self._receive(grid, msgs, f"evaluate {split}"))
        return {k: float(v) for k, v in (result or {}).items()}
