"""The federated run: the one place a round's logic and the run's state live.

A `FederatedRun` holds the global adapter, the server optimizer, the cohort sampler, the
privacy mechanism (and its accountant), the best validated round and the metric rows, and
checkpoints all of it with `state_dict()` / `load_state_dict()`. It reaches the clients
only through a `RoundPort`: Flower's messages (`server.strategy.FedRecStrategy`) or the
same engines called in this process (`fedrec.inprocess.InProcessPort`).

A round: draw the cohort → `port.train` returns the sum of the cohort's clipped updates →
the mechanism turns it into a mean (noise and accounting under DP) → the server optimizer
steps → every `eval-every` rounds `port.evaluate` validates, and the best round is kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedrec import checkpoint
from fedrec.aggregate import ServerOptimizer, UpdateSum
from fedrec.cohort import CohortSampler, test_users, validation_users
from fedrec.communication import communication_summary
from fedrec.config import FedRecConfig
from fedrec.local_state import client_state_dir
from fedrec.metrics import metric_means, metric_sums, user_intervals
from fedrec.model.types import AdapterState
from fedrec.privacy.audit import CanarySet, audit
from fedrec.privacy.mechanism import AdaptiveClip, Mechanism, NoPrivacy, banded_mf, user_level_gaussian
from fedrec.privacy.snr import Meter
from fedrec.results import ResultsDir

Log = Callable[[str], None]


@dataclass
class TrainResult:
    """A round's training as the server sees it: the cohort's sum and the nodes' diagnostics."""

    total: UpdateSum
    diagnostics: dict[str, float] = field(default_factory=dict)  # worker memory and time, silo ε


@dataclass
class EvalResult:
    metrics: dict[str, float]  # means over the evaluated users
    ranks: dict[int, int]  # user → rank of their held-out item (bootstrap intervals resample these)


class RoundPort(Protocol):
    """How a run reaches its clients."""

    def train(self, round_: int, cohort: np.ndarray, adapter: AdapterState, clipping_norm: float) -> TrainResult: ...

    def evaluate(self, round_: int, users: np.ndarray, adapter: AdapterState, split: str) -> EvalResult: ...


def make_sampler(cfg: FedRecConfig, population: np.ndarray) -> CohortSampler:
    """Cross-silo runs train every silo each round; their privacy is their own (DP-SGD)."""
    kind = "all" if cfg.partition == "silo" else cfg.sampling
    return CohortSampler(kind, population, cfg.cohort_size, cfg.seed)


def run_delta(cfg: FedRecConfig, sampler: CohortSampler) -> float:
    """δ: `target-delta`, or 1/N over the sampled population (canaries included)."""
    return cfg.target_delta or 1.0 / len(sampler.population)


def selection(cfg: FedRecConfig) -> str:
    """How the run's result is picked: `private` (best round on private validation, only
    without DP), `last`, or `public` (best round on public users' held-out items)."""
    if cfg.model_selection != "auto":
        return cfg.model_selection
    return "last" if cfg.dp_enabled else "private"


def make_mechanism(cfg: FedRecConfig, sampler: CohortSampler, log: Log = print) -> Mechanism:
    population, expected = len(sampler.population), sampler.size
    adaptive = None
    if cfg.adaptive_clipping:
        count_stddev = (cfg.clip_count_stddev or expected / 20) if cfg.dp_enabled else 0.0  # Andrew et al.'s default
        adaptive = AdaptiveClip(cfg.clip_quantile, cfg.clip_learning_rate, count_stddev)
    if not cfg.dp_enabled:
        return NoPrivacy(cfg.clipping_norm, adaptive)
    if sampler.kind in ("all", "cyclic"):
        return banded_mf(
            noise_multiplier=cfg.noise_multiplier, target_epsilon=cfg.target_epsilon, rounds=cfg.num_rounds,
            bands=cfg.mf_bands if cfg.mechanism == "banded-mf" else 1, clipping_norm=cfg.clipping_norm,
            participation=sampler.kind, groups=getattr(sampler, "groups", 1), users_per_round=sampler.per_round,
            population=population, delta=run_delta(cfg, sampler), seed=cfg.seed, log=log,
        )  # fmt: skip
    return user_level_gaussian(
        noise_multiplier=cfg.noise_multiplier, target_epsilon=cfg.target_epsilon, rounds=cfg.num_rounds,
        clipping_norm=cfg.clipping_norm, q=min(1.0, expected / population), expected_users=expected,
        population=population, sampling=cfg.sampling, accountant=cfg.accountant,
        delta=run_delta(cfg, sampler), seed=cfg.seed, adaptive=adaptive, log=log,
    )  # fmt: skip


class FederatedRun:
    """Rounds of cohort training, privatized aggregation and validation-based selection."""

    def __init__(
        self, cfg: FedRecConfig, initial: AdapterState, population: np.ndarray, *, dimension: int,
        out: ResultsDir | None = None, log: Log = print, sent_keys: list[str] | None = None,
        public: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        """`sent_keys`: the tensors users send (the canaries' space; default every adapter tensor);
        `public`: the public users, whose held-out items pick the round under model-selection=public."""
        self.cfg, self.out, self.log, self.dimension = cfg, out, log, dimension
        self.optimizer = ServerOptimizer(initial, cfg.server_optimizer, cfg.server_learning_rate, cfg.server_momentum)
        self.users = np.asarray(population, dtype=np.int64)  # the real users: the only ones evaluated
        self.initial: AdapterState = {k: v.detach().clone() for k, v in initial.items()}
        self.sent_keys = list(sent_keys or sorted(initial))
        # Canaries join the sampled population (and so its size, q and the default δ = 1/N).
        self.canaries = CanarySet.for_adapter(
            cfg.audit_canaries, cfg.seed, {k: initial[k] for k in self.sent_keys}) if cfg.audit_canaries else None
        sampled = np.concatenate([self.users, self.canaries.included_ids]) if self.canaries else self.users
        self.sampler = make_sampler(cfg, sampled)
        if self.canaries is not None:
            log(f"audit: {cfg.audit_canaries} canaries, {len(self.canaries.included_ids)} included; the sampled "
                f"population is {len(self.users):,} users + {len(self.canaries.included_ids)} canaries, "
                f"q={self.sampler.q:.4g}")  # fmt: skip
        self.mechanism = make_mechanism(cfg, self.sampler, log)
        self.valid_users = validation_users(self.users, cfg.eval_users, cfg.seed)
        self.selection = selection(cfg)
        self.public_users = validation_users(np.asarray(public if public is not None else [], dtype=np.int64),
                                             cfg.eval_users, cfg.seed)  # fmt: skip
        if self.selection == "public" and not len(self.public_users):
            raise ValueError("model-selection=public: the run was given no public users")
        self.meter = Meter()
        # The round the result is taken from, and the best round on private validation (the
        # same under `private`; under DP only a diagnostic, as it carries no noise).
        self.pick_round, self.pick_score, self.pick_adapter = 0, float("-inf"), None
        self.test_users = test_users(self.users, cfg.test_users, cfg.seed)
        if len(self.test_users) < len(self.users):
            log(f"evaluation: test on a seeded sample of {len(self.test_users):,} of the {len(self.users):,} users "
                "(test-users); the summary's intervals include the sampling")  # fmt: skip
        self.adapter: AdapterState = {k: v.detach().clone() for k, v in initial.items()}
        self.round = 0  # the last round that has run
        self.rows: list[dict[str, Any]] = []
        self.best_round, self.best_valid, self.best_adapter = 0, {}, self.adapter
        self.base: dict[str, Any] = {}  # round 0: the base model's valid/test metrics and test ranks
        self.users_trained, self.train_seconds, self.peak_rss = 0, 0.0, 0.0

    @property
    def population(self) -> np.ndarray:
        return self.users

    # ------------------------------------------------------------------ rounds
    def evaluate_base(self, port: RoundPort) -> None:
        """Round 0: the base model itself, the first candidate for the best round."""
        t0 = time.time()
        valid = port.evaluate(0, self.valid_users, self.adapter, "valid").metrics
        test = port.evaluate(0, self.test_users, self.adapter, "test")
        self.base = {"valid": valid, "test": test.metrics, "ranks": test.ranks}
        self.best_round, self.best_valid, self.best_adapter = 0, valid, self.adapter
        row: dict[str, Any] = {"round": 0, "valid": valid}
        if self.selection == "public":
            row["public-valid"] = port.evaluate(0, self.public_users, self.adapter, "test").metrics
            self.pick_round, self.pick_score, self.pick_adapter = 0, row["public-valid"]["ndcg@10"], self.adapter
        self._append(row | {"seconds": round(time.time() - t0, 3)})
        self.log(f"round   0/{self.cfg.num_rounds} | base model            | val NDCG@10 {valid['ndcg@10']:.4f}")

    def train_round(self, port: RoundPort, rnd: int) -> dict[str, float]:
        """Draw, train, privatize, step; returns the round's train metrics."""
        cohort = self.sampler.draw(rnd)
        canaries = cohort[cohort >= self.canaries.ids[0]] if self.canaries is not None else cohort[:0]
        cohort = cohort[: len(cohort) - len(canaries)]  # the ids are sorted: canaries come last
        clip = self.mechanism.clipping_norm
        result = port.train(rnd, cohort, self.adapter, clip)
        total, n = result.total, max(result.total.num_users, 1)
        metrics = {
            "users": total.num_users,
            "clipping-norm": clip,
            "loss": total.loss_sum / n,
            "update-norm": total.norm_sum / n,
            "clipped-fraction": total.num_clipped / n,
        }
        if clip > 0:  # the signal-to-noise meter, on the real users' sum (fedrec.privacy.snr)
            metrics |= self.meter.round(total, clip, self.mechanism.noise_on_mean(self.dimension, rnd),
                                        self.mechanism.noise_on_sum(self.dimension, rnd))  # fmt: skip
        if self.canaries is not None:  # after the metrics above: those describe real users only
            metrics["canaries"] = len(canaries)
            total.merge(self.canaries.update_sum(canaries, clip))
        mean = self.mechanism.privatize(total, self.adapter, rnd)
        self.adapter = self.optimizer.step(mean) if mean is not None else self.optimizer.state()
        if self.mechanism.enabled:
            metrics["epsilon"] = self.mechanism.report(self.dimension)["epsilon"]
        lost = {"dropped": total.num_dropped, "rejected": total.num_rejected}
        metrics |= lost | {f"rejected-{reason}": n for reason, n in sorted(total.rejected.items())}
        if total.num_dropped or total.num_rejected:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(total.rejected.items()))
            self.log(f"round {rnd}: {total.num_dropped} of {len(cohort)} sampled users dropped out"
                     + (f"; {total.num_rejected} rejected ({why})" if total.num_rejected else ""))  # fmt: skip
        metrics |= {"worker-peak-rss-mb": 0.0, "worker-train-seconds": 0.0} | result.diagnostics
        self.round = rnd
        self.users_trained += int(metrics["users"])  # real users: canaries are not trained
        self.peak_rss = max(self.peak_rss, float(metrics["worker-peak-rss-mb"]))
        return {k: float(v) for k, v in metrics.items()}

    def run_rounds(self, port: RoundPort, until: int | None = None) -> None:
        """Rounds from the next one to `until` (default: the last), stopping early at max-epsilon."""
        cfg = self.cfg
        for rnd in range(self.round + 1, min(until or cfg.num_rounds, cfg.num_rounds) + 1):
            if self.mechanism.would_exceed(rnd, cfg.max_epsilon):
                self.log(f"stopping before round {rnd}: it would take ε from {self.mechanism.report(0)['epsilon']:.3f} "
                         f"past max-epsilon={cfg.max_epsilon}")  # fmt: skip
                break
            t_round = time.time()
            try:
                train = self.train_round(port, rnd)
            except RuntimeError as err:  # the port gave up (e.g. no cohort worker left): say how to go on
                raise RuntimeError(f"{err}\n{self._resume_hint()}") from err
            self.train_seconds += time.time() - t_round
            row: dict[str, Any] = {"round": rnd, "train": train}
            last = rnd == cfg.num_rounds or self.mechanism.would_exceed(rnd + 1, cfg.max_epsilon)
            if (cfg.eval_every and rnd % cfg.eval_every == 0) or last:
                row["valid"] = port.evaluate(rnd, self.valid_users, self.adapter, "valid").metrics
                if row["valid"]["ndcg@10"] > self.best_valid["ndcg@10"]:
                    self.best_round, self.best_valid, self.best_adapter = rnd, row["valid"], self.adapter
                if self.selection == "public":
                    row["public-valid"] = port.evaluate(rnd, self.public_users, self.adapter, "test").metrics
                    if row["public-valid"]["ndcg@10"] > self.pick_score:
                        self.pick_round, self.pick_score, self.pick_adapter = rnd, row["public-valid"]["ndcg@10"], self.adapter
            row["seconds"] = round(time.time() - t_round, 3)
            self._append(row)
            val = f"val NDCG@10 {row['valid']['ndcg@10']:.4f}" if "valid" in row else ""
            eps = f" | ε {train['epsilon']:.3f}" if "epsilon" in train else ""
            eps += f" | silo ε {train['silo-epsilon']:.3f}" if "silo-epsilon" in train else ""
            self.log(f"round {rnd:3d}/{cfg.num_rounds} | users {int(train['users']):4d} "
                     f"| loss {train['loss']:.4f} | {val:<19}{eps} | {row['seconds']:.2f} s")  # fmt: skip
            if cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0:
                self.checkpoint()

    def execute(self, port: RoundPort, *, started: float, ready_seconds: float, about: dict[str, Any]) -> dict[str, Any]:
        """The whole run from round 0 (or from where a loaded state left off); writes the results
        directory and returns its summary. `about` adds what only the caller knows (dataset, counts)."""
        self.mechanism.prepare(range(self.round + 1, self.cfg.num_rounds + 1))
        if not self.rows:
            self.evaluate_base(port)
        round1_at = time.time()
        self.run_rounds(port)
        if not self.cfg.checkpoint_every or self.round % self.cfg.checkpoint_every:
            self.checkpoint()  # a clean stop: a later --resume with more rounds starts here
        return self.finish(port, started=started, ready_seconds=ready_seconds, round1_at=round1_at, about=about)

    def finish(self, port: RoundPort, *, started: float, ready_seconds: float, round1_at: float,
               about: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        cfg = self.cfg
        how = "last" if cfg.lora_share == "a-only" else self.selection
        # The private-validation best round, kept apart: under DP it is only a diagnostic.
        private_round, private_valid, private_adapter = self.best_round, self.best_valid, self.best_adapter
        if how == "last":
            self.best_round, self.best_adapter = self.round, self.adapter
            self.best_valid = self.rows[-1].get("valid", {})
        elif how == "public":
            self.best_round, self.best_adapter = self.pick_round, self.pick_adapter
            self.best_valid = next((r.get("valid", {}) for r in self.rows if r["round"] == self.pick_round), {})
        self.log({
            "private": f"best validation NDCG@10 at round {self.best_round}; its adapter is the run's result",
            "last": f"the last round ({self.round}) is the run's result"
                    + (" (lora-share=a-only: users' own B cannot be rolled back)" if cfg.lora_share == "a-only"
                       else " (model-selection=last" + (": under DP, private validation carries no noise)" if cfg.dp_enabled else ")")),
            "public": f"best public held-out NDCG@10 at round {self.best_round}; its adapter is the run's result",
        }[how])  # fmt: skip
        test = port.evaluate(self.best_round, self.test_users, self.best_adapter, "test")
        last = test if self.best_round == self.round else port.evaluate(self.round, self.test_users, self.adapter, "test")
        boot = dict(samples=cfg.bootstrap_samples, seed=cfg.seed)  # 95% intervals over test users
        summary = {
            "mode": "federated",
            "dataset": about.get("dataset"),
            "placement": cfg.placement,
            "base_test": self.base["test"],
            "test": test.metrics,
            "base_valid": self.base["valid"],
            "valid": self.best_valid,
            "best_round": self.best_round,
            "last_round_test": last.metrics,
            "base_test_ci": user_intervals(self.base["ranks"], **boot),
            "test_ci": user_intervals(test.ranks, **boot),
            "last_round_test_ci": user_intervals(last.ranks, **boot),
            "test_gain_ci": user_intervals(test.ranks, self.base["ranks"], **boot),  # paired by user
            "rounds": self.round,
            "selection": how,
        }
        if how != "private" and private_round != self.best_round:
            # Labelled: the round private validation (no noise) would have picked. Under DP this
            # choice is outside the guarantee, so it is never the headline.
            diag = port.evaluate(private_round, self.test_users, private_adapter, "test")
            summary["diagnostic_private_best"] = {
                "note": "round picked on private validation without noise: a diagnostic outside the privacy guarantee",
                "round": private_round, "valid": private_valid, "test": diag.metrics,
                "test_ci": user_intervals(diag.ranks, **boot),
            }  # fmt: skip
        elif how != "private":
            summary["diagnostic_private_best"] = {"note": "private validation picks the same round", "round": private_round}
        for name, users in about.get("subsets", {}).items():  # e.g. test targets that are cold items
            summary |= {f"base_test_{name}": _subset_means(self.base["ranks"], users),
                        f"test_{name}": _subset_means(test.ranks, users)}  # fmt: skip
        report = self.mechanism.report(self.dimension)
        summary |= {k: report[k] for k in ("epsilon", "delta", "noise_multiplier", "sampling_rate")}
        summary |= {
            "clipping_norm": cfg.clipping_norm,  # as configured (adaptive clipping moves it: privacy.json)
            "adapter_dimension": self.dimension,
            "noise_to_signal": report["noise_to_signal"],
            "silo_epsilon": self.rows[-1]["train"].get("silo-epsilon") if cfg.partition == "silo" else None,
            "users_trained": self.users_trained,
            # Training rounds only (send, local training, receive, server step), no evaluation.
            "users_per_second": self.users_trained / self.train_seconds if self.train_seconds > 0 else None,
            "train_seconds": round(self.train_seconds, 3),
            "ready_seconds": round(ready_seconds, 3),  # start to all nodes warm
            "round1_at": round1_at,  # wall clock (epoch s) when round 1 started
            "server_started_at": round(started, 3),  # wall clock (epoch s) when the ServerApp started
            "worker_peak_rss_mb": self.peak_rss,
            "wall_seconds": round(time.time() - started, 2),
            "adapter_bytes": int(sum(t.numel() * t.element_size() for t in self.best_adapter.values())),
            "adapter_parameters": about.get("adapter_parameters"),
            "private_users": len(self.population),
            "test_users": len(self.test_users),
            "public_users": about.get("public_users"),
            "num_items": about.get("num_items"),
            "results_dir": str(self.out.path) if self.out else None,
            "communication": communication_summary(self.adapter, self.sent_keys, self.users_trained, self.rows,
                                                   cfg.placement, about.get("setup_traffic"), about.get("once_per_device")),
        }
        if self.canaries is not None:
            record = self.audit(report)
            summary["audit"] = {k: v for k, v in record.items() if k not in ("scores", "included_mask", "one_run", "one_shot")}
            if self.out is not None:
                self.out.write_json("audit.json", record)
        if self.out is not None:
            self.out.save_adapter(self.best_adapter)
            self.out.save_adapter(self.adapter, "adapter_last_round.safetensors")
            self.out.plot_validation(self.rows)
            self.out.write_summary(summary)
            self.out.write_privacy(self.mechanism.privacy_record())
        return summary

    def audit(self, report: dict[str, Any]) -> dict[str, Any]:
        """The canaries against the model's whole change over the run (the last round's
        adapter: every round's noise and every canary's visits are in it)."""
        change = {k: self.adapter[k].double() - self.initial[k].double() for k in self.canaries.keys}
        delta = report["delta"] if report["delta"] is not None else run_delta(self.cfg, self.sampler)
        record = audit(self.canaries, change, delta, report["epsilon"])
        record |= {"real_users": len(self.users), "sampled_population": len(self.sampler.population),
                   "sampling_rate": self.sampler.q, "rounds": self.round}  # fmt: skip
        lb, est = record["epsilon_lower_bound"], record["epsilon_estimate"]
        self.log(f"audit: ε lower bound {lb:.3f} (95%, ceiling {record['one_run']['ceiling']:.2f} with "
                 f"{self.canaries.count} canaries), one-shot estimate "
                 + ("–" if est is None else f"{est:.3f}") + f"; the accountant's ε "
                 + ("– (no DP)" if report["epsilon"] is None else f"{report['epsilon']:.3f}") + f" at δ={delta:.3g}")  # fmt: skip
        return record

    def _append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.out is not None:
            self.out.append_metrics(row)

    # ------------------------------------------------------------- checkpoint
    def checkpoint(self) -> None:
        """`<output-dir>/checkpoint/`, written whole or not at all (fedrec.checkpoint)."""
        if self.out is None:
            return
        checkpoint.save(self.out.path, self.state_dict(), self.cfg, client_state_dir(self.cfg))

    def _resume_hint(self) -> str:
        done = checkpoint.checkpoint_dir(self.out.path) if self.out is not None else None
        if done is None or not (done / "state.pt").exists():
            return "no checkpoint was written yet (checkpoint-every); the run must start again"
        state = (done / "manifest.json").read_text()
        return (f"last checkpoint: {done} (after round {json.loads(state)['round']}); continue with: "
                f"python -m fedrec.simulate --resume {self.out.path}")

    def resume(self, state: dict[str, Any], folder: Path) -> None:
        """Continue from a loaded checkpoint (`checkpoint.load`): the run's state, and the
        clients' folder as it was then."""
        self.load_state_dict(state)
        checkpoint.restore_client_state(folder, client_state_dir(self.cfg))
        self.log(f"resuming after round {self.round} from {folder}")

    def state_dict(self) -> dict[str, Any]:
        """Everything the next round depends on; `load_state_dict` on a run built from the same
        config and population continues exactly where this one stands."""
        return {
            "round": self.round,
            "adapter": self.adapter,
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "mechanism": self.mechanism.state_dict(),
            "best": {"round": self.best_round, "valid": self.best_valid, "adapter": self.best_adapter},
            "pick": {"round": self.pick_round, "score": self.pick_score, "adapter": self.pick_adapter},
            "meter": self.meter.state_dict(),
            "base": self.base,
            "rows": self.rows,
            "counters": {"users_trained": self.users_trained, "train_seconds": self.train_seconds,
                         "peak_rss": self.peak_rss},  # fmt: skip
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.mechanism.load_state_dict(state["mechanism"])
        self.round = int(state["round"])
        self.adapter = {k: v.clone() for k, v in state["adapter"].items()}
        best = state["best"]
        self.best_round, self.best_valid = int(best["round"]), dict(best["valid"])
        self.best_adapter = {k: v.clone() for k, v in best["adapter"].items()}
        pick = state.get("pick", {"round": 0, "score": float("-inf"), "adapter": None})
        self.pick_round, self.pick_score = int(pick["round"]), float(pick["score"])
        self.pick_adapter = None if pick["adapter"] is None else {k: v.clone() for k, v in pick["adapter"].items()}
        self.meter.load_state_dict(state.get("meter", {}))
        self.base = dict(state["base"])
        self.rows = [dict(r) for r in state["rows"]]
        c = state["counters"]
        self.users_trained, self.train_seconds, self.peak_rss = int(c["users_trained"]), float(c["train_seconds"]), float(c["peak_rss"])


def _subset_means(ranks: dict[int, int], users) -> dict[str, float]:
    """HR/NDCG means over the users of a subset (with their count as `users`)."""
    own = np.asarray([ranks[int(u)] for u in users if int(u) in ranks], dtype=np.int64)
    return metric_means(metric_sums(own)) if len(own) else {"users": 0.0}
