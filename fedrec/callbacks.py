"""What a run keeps, writes, prints or stops on, as callbacks around its round loop.

The loop (`fedrec.run.FederatedRun`) trains, privatizes, steps and validates; everything
else is a `RunCallback`, called in list order:

- `on_begin(run)` once, before round 0 (or the first resumed round);
- `before_round(run, round_)` before each training round: True stops the run before it;
- `after_round(run, row)` after each round's row (round 0 is the base model): True stops;
- `on_end(run, result)` once, with the run's result (its summary and picked adapter).

A new measurement is one new callback passed to `FederatedRun(callbacks=...)`, not an
edit of the loop. A callback with state the next round depends on returns it from
`state_dict()`; the run checkpoints it under its `name`. `run` in the hooks is the
`fedrec.run.FederatedRun` calling them (named, not imported: the run imports this module).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fedrec.model.types import AdapterState
from fedrec.progress import eta
from fedrec.privacy.audit import audit
from fedrec.summary import RunSummary

Row = dict[str, Any]  # a metrics.jsonl row: round, train / valid / public-valid metrics, seconds


@dataclass
class RunResult:
    """What a finished run hands its callbacks: the summary and the picked round's adapter."""

    summary: RunSummary
    adapter: AdapterState


class RunCallback:
    """Every hook is a no-op here; a callback overrides the ones it needs."""

    name = ""  # its key in the run's checkpoint, when it has state

    def on_begin(self, run: "FederatedRun") -> None:
        pass

    def before_round(self, run: "FederatedRun", round_: int) -> bool:
        return False

    def after_round(self, run: "FederatedRun", row: Row) -> bool:
        return False

    def on_end(self, run: "FederatedRun", result: RunResult) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class BestRound(RunCallback):
    """The round with the highest NDCG@10 in the rows' `metric` entry (`valid`: private
    validation; `public-valid`: public users' held-out items), and its adapter."""

    def __init__(self, name: str, metric: str) -> None:
        self.name, self.metric = name, metric
        self.round, self.score, self.valid, self.adapter = 0, float("-inf"), {}, None

    def after_round(self, run: "FederatedRun", row: Row) -> bool:
        if self.metric in row and row[self.metric]["ndcg@10"] > self.score:
            self.round, self.score, self.adapter = row["round"], row[self.metric]["ndcg@10"], run.adapter
            self.valid = row.get("valid", {})
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "score": self.score, "valid": self.valid, "adapter": self.adapter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints written before the callbacks kept `best` without its score and `pick` without its metrics.
        self.round, self.valid = int(state["round"]), dict(state.get("valid", {}))
        self.score = float(state.get("score", self.valid.get("ndcg@10", float("-inf"))))
        self.adapter = None if state["adapter"] is None else {k: v.clone() for k, v in state["adapter"].items()}


class MaxEpsilonStop(RunCallback):
    """Stop cleanly before the round that would take ε past `max-epsilon`."""

    def before_round(self, run: "FederatedRun", round_: int) -> bool:
        if not run.mechanism.would_exceed(round_, run.cfg.max_epsilon):
            return False
        run.log(f"stopping before round {round_}: it would take ε from {run.mechanism.report(0).epsilon:.3f} "
                f"past max-epsilon={run.cfg.max_epsilon}")  # fmt: skip
        return True


class Checkpointer(RunCallback):
    """`<output-dir>/checkpoint/` every `checkpoint-every` rounds and once at the end, so
    that a later --resume with more rounds starts where this run stopped."""

    def after_round(self, run: "FederatedRun", row: Row) -> bool:
        every = run.cfg.checkpoint_every
        if row["round"] and every and row["round"] % every == 0:
            run.checkpoint()
        return False

    def on_end(self, run: "FederatedRun", result: RunResult) -> None:
        if not run.cfg.checkpoint_every or run.round % run.cfg.checkpoint_every:
            run.checkpoint()


class ConsoleLines(RunCallback):
    """A line per round on the run's log, with the time left at this run's pace so far; in a
    run of more than LINES rounds, a line per hundredth of them (every row is in metrics.jsonl)."""

    LINES = 100
    _t0: float | None = None
    _from = 0

    def on_begin(self, run: "FederatedRun") -> None:
        self._t0, self._from = time.monotonic(), run.round

    def after_round(self, run: "FederatedRun", row: Row) -> bool:
        total = run.cfg.num_rounds
        if row["round"] == 0:
            run.log(f"round   0/{total} | base model            | val NDCG@10 {row['valid']['ndcg@10']:.4f}")
            return False
        every = max(1, total // self.LINES)
        if row["round"] % every and row["round"] not in (1, total):
            return False
        train = row["train"]
        val = f"val NDCG@10 {row['valid']['ndcg@10']:.4f}" if "valid" in row else ""
        whatif = getattr(run.mechanism, "whatif", None)
        eps = f" | ε {train['epsilon']:.3f}" + (f" (what-if N={whatif['population']:,})" if whatif else "") if "epsilon" in train else ""
        eps += f" | silo ε {train['silo-epsilon']:.3f}" if "silo-epsilon" in train else ""
        if self._t0 is None:  # rounds run without on_begin (a test driving run_rounds)
            self.on_begin(run)
        left = eta(row["round"] - self._from, total - self._from, time.monotonic() - (self._t0 or 0.0))
        run.log(f"round {row['round']:3d}/{total} | users {int(train['users']):4d} "
                f"| loss {train['loss']:.4f} | {val:<19}{eps} | {row['seconds']:.2f} s"
                + (f" | {left} left" if left else ""))  # fmt: skip
        return False


class MetricRows(RunCallback):
    """Each row to `metrics.jsonl` as it is made (a crash keeps the rounds that ran)."""

    def after_round(self, run: "FederatedRun", row: Row) -> bool:
        if run.out is not None:
            run.out.append_metrics(row)
        return False


class CanaryAudit(RunCallback):
    """The canaries against the model's whole change over the run (the last round's adapter:
    every round's noise and every canary's visits are in it): `audit.json` and the summary."""

    def on_end(self, run: "FederatedRun", result: RunResult) -> None:
        if run.canaries is None:
            return
        change = {k: run.adapter[k].double() - run.initial[k].double() for k in run.canaries.keys}
        s = result.summary
        delta = s.delta if s.delta is not None else run.delta
        record = audit(run.canaries, change, delta, s.epsilon)
        record |= {"real_users": len(run.users), "sampled_population": len(run.sampler.population),
                   "sampling_rate": run.sampler.q, "rounds": run.round}  # fmt: skip
        lb, est = record["epsilon_lower_bound"], record["epsilon_estimate"]
        run.log(f"audit: ε lower bound {lb:.3f} (95%, ceiling {record['one_run']['ceiling']:.2f} with "
                f"{run.canaries.count} canaries), one-shot estimate "
                + ("–" if est is None else f"{est:.3f}") + "; the accountant's ε "
                + ("none (no noise)" if s.epsilon is None else f"{s.epsilon:.3f}") + f" at δ={delta:.3g}")  # fmt: skip
        s.audit = {k: v for k, v in record.items() if k not in ("scores", "included_mask", "one_run", "one_shot")}
        if run.out is not None:
            run.out.write_json("audit.json", record)


class ResultFiles(RunCallback):
    """The results directory's end-of-run files: adapters, summary, privacy ledger, figure."""

    def on_end(self, run: "FederatedRun", result: RunResult) -> None:
        if run.out is None:
            return
        run.out.save_adapter(result.adapter)
        run.out.save_adapter(run.adapter, "adapter_last_round.safetensors")
        run.out.plot_validation(run.rows)
        run.out.write_summary(result.summary)
        run.out.write_privacy(run.mechanism.privacy_record())
        run.out.release()


def standard_callbacks(selection: str) -> list[RunCallback]:
    """Every run's: the best rounds, the ε stop, checkpoints, rows, console lines, the audit
    and the result files (in the order their end-of-run work must happen)."""
    picks = [BestRound("best", "valid")] + ([BestRound("pick", "public-valid")] if selection == "public" else [])
    return [*picks, MaxEpsilonStop(), MetricRows(), ConsoleLines(), Checkpointer(), CanaryAudit(), ResultFiles()]
