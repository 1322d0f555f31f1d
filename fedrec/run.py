"""The federated run: the one place a round's logic and the run's state live.

A `FederatedRun` holds the global adapter, the server optimizer, the cohort sampler, the
privacy mechanism (and its accountant), the metric rows and its callbacks, and
checkpoints all of it with `state_dict()` / `load_state_dict()`. It reaches the clients
only through a `RoundPort`: Flower's messages (`server.grid_port.GridPort`) or the
same engines called in this process (`fedrec.inprocess.InProcessPort`).

A round: draw the cohort → `port.train` returns the sum of the cohort's clipped updates →
the mechanism turns it into a mean (noise and accounting under DP) → the server optimizer
steps → every `eval-every` rounds `port.evaluate` validates → the callbacks see the round's
row (`fedrec.callbacks`: best rounds, the ε stop, checkpoints, rows, console). At the end
`fedrec.finish` picks the result and evaluates it, and the callbacks write it out.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedrec import checkpoint
from fedrec.interrupt import Interrupted, check, holding, mark_at_risk, mark_safe
from fedrec.aggregate import ServerOptimizer, UpdateSum
from fedrec.callbacks import BestRound, RunCallback, standard_callbacks
from fedrec.cohort import CohortSampler, test_users, validation_users
from fedrec.config import FedRecConfig
from fedrec.finish import RunFacts, finish
from fedrec.local_state import client_state_dir
from fedrec.model.base import cache_dir
from fedrec.model.types import AdapterState
from fedrec.port import EvalResult, RoundPort, TrainResult
from fedrec.privacy.audit import CanarySet
from fedrec.privacy.mechanism import AdaptiveClip, Mechanism, NoPrivacy, banded_mf, user_level_gaussian
from fedrec.privacy.snr import Meter
from fedrec.results import ResultsDir
from fedrec.summary import RunSummary

__all__ = ["EvalResult", "FederatedRun", "RoundPort", "RunFacts", "TrainResult"]  # the ports import these from here

Log = Callable[[str], None]


def make_sampler(cfg: FedRecConfig, population: np.ndarray) -> CohortSampler:
    """Cross-silo runs train every silo each round; their privacy is their own (DP-SGD)."""
    kind = "all" if cfg.partition == "silo" else cfg.sampling
    return CohortSampler(kind, population, cfg.cohort_size, cfg.seed)


def calibrate_ahead(cfg: FedRecConfig, population: int) -> threading.Thread | None:
    """Start the noise calibration that `make_mechanism` will ask for, on a thread, while the
    server waits for its workers to start; `make_mechanism` then takes its z, or waits for it.

    Only for the Gaussian mechanism calibrated to an ε over a population known before the
    nodes answer (cohort placement, no canaries); its PLDs are built point by point in Python
    and at a small q that was most of the time before round 1 (experiments/README.md#population-1p8m).
    A failure here is left for `make_mechanism` to raise."""
    if not (cfg.dp_enabled and cfg.target_epsilon > 0 and cfg.placement == "cohort" and not cfg.audit_canaries
            and cfg.noise_placement != "devices"):
        return None  # fmt: skip
    sampler = make_sampler(cfg, np.arange(population, dtype=np.int64))
    if sampler.kind in ("all", "cyclic"):  # make_mechanism's matrix mechanism, not the calibrated Gaussian
        return None

    def calibrate() -> None:
        try:
            make_mechanism(cfg, sampler, log=lambda _m: None)
        except Exception:  # noqa: BLE001 - make_mechanism raises it again, in the run's own thread
            pass

    thread = threading.Thread(target=calibrate, name="fedrec-calibrate-ahead", daemon=True)
    thread.start()
    return thread


def run_delta(cfg: FedRecConfig, population: int) -> float:
    """δ: `target-delta`, or 1/N over the sampled population of N (canaries included)."""
    return cfg.target_delta or 1.0 / population


def selection(cfg: FedRecConfig) -> str:
    """How the run's result is picked: `private` (best round on private validation, only
    without DP), `last`, or `public` (best round on public users' held-out items)."""
    if cfg.model_selection != "auto":
        return cfg.model_selection
    return "last" if cfg.dp_enabled else "private"


def make_mechanism(cfg: FedRecConfig, sampler: CohortSampler, log: Log = print, dimension: int = 0) -> Mechanism:
    population, expected = len(sampler.population), sampler.size
    adaptive = None
    if cfg.adaptive_clipping:
        count_stddev = (cfg.clip_count_stddev or expected / 20) if cfg.dp_enabled else 0.0  # Andrew et al.'s default
        adaptive = AdaptiveClip(cfg.clip_quantile, cfg.clip_learning_rate, count_stddev)
    if not cfg.dp_enabled:
        return NoPrivacy(cfg.clipping_norm, adaptive)
    if cfg.noise_placement == "devices":
        from fedrec.privacy.distributed import distributed_skellam

        return distributed_skellam(
            noise_multiplier=cfg.noise_multiplier, target_epsilon=cfg.target_epsilon, rounds=cfg.num_rounds,
            clipping_norm=cfg.clipping_norm, q=min(1.0, expected / population), expected_users=expected,
            population=population, delta=run_delta(cfg, population), dimension=dimension,
            dropout_margin=cfg.secagg_dropout_margin, seed=cfg.seed, log=log,
        )  # fmt: skip
    if sampler.kind in ("all", "cyclic"):
        return banded_mf(
            noise_multiplier=cfg.noise_multiplier, target_epsilon=cfg.target_epsilon, rounds=cfg.num_rounds,
            bands=cfg.mf_bands if cfg.mechanism == "banded-mf" else 1, clipping_norm=cfg.clipping_norm,
            participation=sampler.kind, groups=getattr(sampler, "groups", 1), users_per_round=sampler.per_round,
            population=population, delta=run_delta(cfg, population), seed=cfg.seed, log=log,
        )  # fmt: skip
    whatif = None
    if cfg.whatif_population:  # noise and ε of a stated population (fedrec.privacy.mechanism.whatif_label)
        whatif = {"population": cfg.whatif_population, "trained_population": population, "trained_cohort": expected,
                  "cohort": cfg.whatif_cohort_size or max(1, round(expected * cfg.whatif_population / population))}  # fmt: skip
        population, expected = cfg.whatif_population, whatif["cohort"]
    return user_level_gaussian(
        noise_multiplier=cfg.noise_multiplier, target_epsilon=cfg.target_epsilon, rounds=cfg.num_rounds,
        clipping_norm=cfg.clipping_norm, q=min(1.0, expected / population), expected_users=expected,
        population=population, sampling=cfg.sampling, accountant=cfg.accountant,
        delta=run_delta(cfg, population), seed=cfg.seed, adaptive=adaptive, log=log, whatif=whatif,
        calibrations=cache_dir(cfg) / "noise-calibrations.json",
    )  # fmt: skip


class FederatedRun:
    """Rounds of cohort training, privatized aggregation and validation; everything around
    the loop (best rounds, checkpoints, the ε stop, rows, console, audit, files) is a
    callback (`fedrec.callbacks`)."""

    def __init__(
        self, cfg: FedRecConfig, initial: AdapterState, population: np.ndarray, *, dimension: int,
        out: ResultsDir | None = None, log: Log = print, sent_keys: list[str] | None = None,
        public: np.ndarray | None = None, callbacks: list[RunCallback] | None = None,
    ) -> None:  # fmt: skip
        """`sent_keys`: the tensors users send (the canaries' space; default every adapter tensor);
        `public`: the public users, whose held-out items pick the round under model-selection=public;
        `callbacks`: added after the standard ones."""
        self.cfg, self.out, self.log, self.dimension = cfg, out, log, dimension
        self.optimizer = ServerOptimizer(initial, cfg.server_optimizer, cfg.server_learning_rate, cfg.server_momentum)
        self.users = np.asarray(population, dtype=np.int64)  # the real users: the only ones evaluated
        self.initial: AdapterState = {k: v.detach().clone() for k, v in initial.items()}
        self.sent_keys = list(sent_keys or sorted(initial))
        self._sample(cfg)
        self.mechanism = make_mechanism(cfg, self.sampler, log, dimension)
        self.valid_users = validation_users(self.users, cfg.eval_users, cfg.data_seed_value)
        self.selection = selection(cfg)
        self.public_users = validation_users(np.asarray(public if public is not None else [], dtype=np.int64),
                                             cfg.eval_users, cfg.data_seed_value)  # fmt: skip
        if self.selection == "public" and not len(self.public_users):
            raise ValueError("model-selection=public: the run was given no public users")
        self.meter = Meter()
        self.test_users = test_users(self.users, cfg.test_users, cfg.data_seed_value)
        if len(self.test_users) < len(self.users):
            log(f"evaluation: test on a seeded sample of {len(self.test_users):,} of the {len(self.users):,} users "
                "(test-users); the summary's intervals include the sampling")  # fmt: skip
        self.adapter: AdapterState = {k: v.detach().clone() for k, v in initial.items()}
        self.round = 0  # the last round that has run
        self.rows: list[dict[str, Any]] = []
        self.base: dict[str, Any] = {}  # round 0: the base model's valid/test metrics and test ranks
        self.users_trained, self.train_seconds, self.peak_rss = 0, 0.0, 0.0
        self.callbacks = standard_callbacks(self.selection) + list(callbacks or [])
        self.best = next(cb for cb in self.callbacks if isinstance(cb, BestRound) and cb.name == "best")
        self.pick = next((cb for cb in self.callbacks if isinstance(cb, BestRound) and cb.name == "pick"), None)

    def _sample(self, cfg: FedRecConfig) -> None:
        """Canaries join the sampled population (and so its size, q and the default δ = 1/N)."""
        initial = self.initial
        self.canaries = CanarySet.for_adapter(
            cfg.audit_canaries, cfg.seed, {k: initial[k] for k in self.sent_keys}) if cfg.audit_canaries else None
        sampled = np.concatenate([self.users, self.canaries.included_ids]) if self.canaries else self.users
        self.sampler = make_sampler(cfg, sampled)
        if self.canaries is not None:
            self.log(f"audit: {cfg.audit_canaries} canaries, {len(self.canaries.included_ids)} included; the sampled "
                     f"population is {len(self.users):,} users + {len(self.canaries.included_ids)} canaries, "
                     f"q={self.sampler.q:.4g}")  # fmt: skip

    @property
    def population(self) -> np.ndarray:
        return self.users

    @property
    def delta(self) -> float:
        return run_delta(self.cfg, len(self.sampler.population))

    # ------------------------------------------------------------------ rounds
    def evaluate_base(self, port: RoundPort) -> None:
        """Round 0: the base model itself, the first candidate for the best round."""
        t0 = time.time()
        valid = port.evaluate(0, self.valid_users, self.adapter, "valid").metrics
        test = port.evaluate(0, self.test_users, self.adapter, "test")
        self.base = {"valid": valid, "test": test.metrics, "ranks": test.ranks}
        row: dict[str, Any] = {"round": 0, "valid": valid}
        if self.selection == "public":
            row["public-valid"] = port.evaluate(0, self.public_users, self.adapter, "test").metrics
        self._row_done(row | {"seconds": round(time.time() - t0, 3)})

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
        if clip > 0 and not total.encoded:  # the signal-to-noise meter, on the real users' sum (fedrec.privacy.snr)
            metrics |= self.meter.round(total, clip, self.mechanism.noise_on_mean(self.dimension, rnd),
                                        self.mechanism.noise_on_sum(self.dimension, rnd))  # fmt: skip
        if self.canaries is not None:  # after the metrics above: those describe real users only
            metrics["canaries"] = len(canaries)
            total.merge(self.canaries.update_sum(canaries, clip))
        mean = self.mechanism.privatize(total, self.adapter, rnd)
        self.adapter = self.optimizer.step(mean) if mean is not None else self.optimizer.state()
        if self.mechanism.enabled:
            metrics["epsilon"] = self.mechanism.report(self.dimension).epsilon
        metrics |= self._losses(total, len(cohort), rnd) | {"worker-peak-rss-mb": 0.0, "worker-train-seconds": 0.0}
        metrics |= result.diagnostics
        self.round = rnd
        self.users_trained += int(metrics["users"])  # real users: canaries are not trained
        self.peak_rss = max(self.peak_rss, float(metrics["worker-peak-rss-mb"]))
        return {k: float(v) for k, v in metrics.items()}

    def _losses(self, total: UpdateSum, sampled: int, rnd: int) -> dict[str, int]:
        """Users who dropped out or whose update was rejected: counted, and said."""
        if total.num_dropped or total.num_rejected:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(total.rejected.items()))
            self.log(f"round {rnd}: {total.num_dropped} of {sampled} sampled users dropped out"
                     + (f"; {total.num_rejected} rejected ({why})" if total.num_rejected else ""))  # fmt: skip
        return {"dropped": total.num_dropped, "rejected": total.num_rejected} | {
            f"rejected-{reason}": n for reason, n in sorted(total.rejected.items())}

    def run_rounds(self, port: RoundPort, until: int | None = None) -> None:
        """Rounds from the next one to `until` (default: the last), until a callback stops the run."""
        cfg = self.cfg
        for rnd in range(self.round + 1, min(until or cfg.num_rounds, cfg.num_rounds) + 1):
            check(f"after round {self.round}")
            if any([cb.before_round(self, rnd) for cb in self.callbacks]):
                break
            t_round = time.time()
            try:
                train = self.train_round(port, rnd)
            except RuntimeError as err:  # the port gave up (e.g. no cohort worker left): say how to go on
                raise RuntimeError(f"{err}\n{self._resume_hint()}") from err
            self.train_seconds += time.time() - t_round
            with holding():  # the round has changed the run's state: its row is made whole before any stop
                if self._round_done(port, rnd, train, t_round):
                    break

    def _round_done(self, port: RoundPort, rnd: int, train: dict[str, float], t_round: float) -> bool:
        """The round's validation (where due) and row; True if a callback stops the run."""
        cfg = self.cfg
        row: dict[str, Any] = {"round": rnd, "train": train}
        last = rnd == cfg.num_rounds or self.mechanism.would_exceed(rnd + 1, cfg.max_epsilon)
        if (cfg.eval_every and rnd % cfg.eval_every == 0) or last:
            row["valid"] = port.evaluate(rnd, self.valid_users, self.adapter, "valid").metrics
            if self.selection == "public":
                row["public-valid"] = port.evaluate(rnd, self.public_users, self.adapter, "test").metrics
        row["seconds"] = round(time.time() - t_round, 3)
        return self._row_done(row)

    def _row_done(self, row: dict[str, Any]) -> bool:
        self.rows.append(row)
        return any([cb.after_round(self, row) for cb in self.callbacks])  # every callback sees every row

    def execute(self, port: RoundPort, *, started: float, ready_seconds: float, facts: RunFacts | None = None) -> RunSummary:
        """The whole run from round 0 (or from where a loaded state left off); writes the results
        directory (through the callbacks) and returns its summary."""
        self.mechanism.prepare(range(self.round + 1, self.cfg.num_rounds + 1))
        plan = getattr(self.mechanism, "plan", None)
        if plan is not None and hasattr(port, "noise_plan"):  # a port whose devices add the noise themselves
            port.noise_plan = plan
        for cb in self.callbacks:
            cb.on_begin(self)
        mark_at_risk(lambda: f"fedrec: stopped at once in round {self.round + 1}; {self._resume_hint()}")
        try:
            if not self.rows:
                self.evaluate_base(port)
            round1_at = time.time()
            self.run_rounds(port)
            timing = {"started": started, "ready_seconds": ready_seconds, "round1_at": round1_at}
            result = finish(self, port, facts or RunFacts(), timing)
        except Interrupted as stop:  # a signal (fedrec.interrupt): the state is that of the last whole round
            raise self._stopped(stop) from None
        for cb in self.callbacks:
            cb.on_end(self, result)
        mark_safe(f"fedrec: the run in {self.out.path if self.out else 'memory'} had finished")
        return result.summary

    # ------------------------------------------------------------- checkpoint
    def checkpoint(self) -> None:
        """`<output-dir>/checkpoint/`, written whole or not at all (fedrec.checkpoint)."""
        if self.out is None:
            return
        checkpoint.save(self.out.path, self.state_dict(), self.cfg, client_state_dir(self.cfg))

    def _stopped(self, stop: Interrupted) -> Interrupted:
        """Keep a checkpoint of the last whole round (whatever checkpoint-every says) and say
        how to go on. A round in progress was abandoned before it changed any state."""
        self.checkpoint()
        if self.out is not None:
            self.out.release()
        message = f"{stop.message}; {self._resume_hint()}"
        mark_safe(f"fedrec: {message}")
        return Interrupted(message, stop.signum)

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
            "meter": self.meter.state_dict(),
            "base": self.base,
            "rows": self.rows,
            "counters": {"users_trained": self.users_trained, "train_seconds": self.train_seconds,
                         "peak_rss": self.peak_rss},  # fmt: skip
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks if cb.name},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.mechanism.load_state_dict(state["mechanism"])
        self.round = int(state["round"])
        self.adapter = {k: v.clone() for k, v in state["adapter"].items()}
        # (older checkpoints hold the best rounds' state at the top level)
        stored = state.get("callbacks", {k: state[k] for k in ("best", "pick") if k in state})
        for cb in self.callbacks:
            if cb.name and cb.name in stored:
                cb.load_state_dict(stored[cb.name])
        self.meter.load_state_dict(state.get("meter", {}))
        self.base = dict(state["base"])
        self.rows = [dict(r) for r in state["rows"]]
        c = state["counters"]
        self.users_trained, self.train_seconds, self.peak_rss = int(c["users_trained"]), float(c["train_seconds"]), float(c["peak_rss"])
