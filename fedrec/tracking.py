"""A run's numbers in TensorBoard (`tracking=tensorboard`): per-round training and validation
metrics, ε, the signal-to-noise meter, the config and the final summary, as event files in
`<output-dir>/tensorboard/` (`tensorboard --logdir results/`).

A callback (`fedrec.callbacks.RunCallback`), so the round loop does not know about it.
torch's SummaryWriter is imported only when a run asks for it (the `tracking` extra).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fedrec.callbacks import Row, RunCallback, RunResult
from fedrec.config import FedRecConfig

if TYPE_CHECKING:
    from fedrec.run import FederatedRun

FOLDER = "tensorboard"


class TensorBoard(RunCallback):
    def __init__(self, cfg: FedRecConfig) -> None:
        self.cfg = cfg
        self.writer: Any = None

    def on_begin(self, run: "FederatedRun") -> None:
        if run.out is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.out.path / FOLDER))
        self.writer.add_text("config", "```\n" + self.cfg.to_toml() + "\n```", 0)

    def after_round(self, run: "FederatedRun", row: Row) -> bool:
        if self.writer is None:
            return False
        step = int(row["round"])
        for part in ("train", "valid", "public-valid"):
            for key, value in (row.get(part) or {}).items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{part}/{key}", float(value), step)
        self.writer.flush()
        return False

    def on_end(self, run: "FederatedRun", result: RunResult) -> None:
        if self.writer is None:
            return
        s = result.summary
        for name, metrics in (("test", s.test), ("base_test", s.base_test), ("last_round_test", s.last_round_test)):
            for key, value in (metrics or {}).items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{name}/{key}", float(value), s.rounds or 0)
        if s.epsilon is not None:
            self.writer.add_scalar("privacy/epsilon", s.epsilon, s.rounds or 0)
        self.writer.add_text("summary", "```\n" + json.dumps(s.to_dict(), indent=1, default=str) + "\n```", s.rounds or 0)
        self.writer.close()
        self.writer = None


def tracking_callbacks(cfg: FedRecConfig) -> list[RunCallback]:
    return [TensorBoard(cfg)] if cfg.tracking == "tensorboard" else []
