"""The results directory of a run: everything a person or a sweep reads afterwards."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from fedrec.config import FedRecConfig
from fedrec.model.types import AdapterState
from fedrec.summary import Intervals, Metrics, RunSummary


def default_output_dir(mode: str) -> str:
    return str(Path("results") / f"{datetime.now():%Y%m%d-%H%M%S}-{mode}")


class ResultsDir:
    def __init__(self, path: str | Path, resume_round: int | None = None) -> None:
        """A new run starts `metrics.jsonl` empty; a resumed one (`resume_round`) keeps it."""
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        if resume_round is None:
            self.metrics_path.write_text("")
        else:
            self._keep_rounds_up_to(resume_round)

    def _keep_rounds_up_to(self, last: int) -> None:
        """Rows a crashed run wrote after its checkpoint will be run again: they move to
        `metrics.discarded.jsonl` (nothing is lost), the rest stays as it was written."""
        lines = self.metrics_path.read_text().splitlines(keepends=True) if self.metrics_path.exists() else []
        keep = [line for line in lines if json.loads(line)["round"] <= last]
        later = [line for line in lines if json.loads(line)["round"] > last]
        if later:
            with (self.path / "metrics.discarded.jsonl").open("a") as fh:
                fh.writelines(later)
            tmp = self.metrics_path.with_suffix(".tmp")
            tmp.write_text("".join(keep))
            tmp.replace(self.metrics_path)

    def write_config(self, cfg: FedRecConfig) -> None:
        (self.path / "config.toml").write_text(cfg.to_toml())

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def write_summary(self, summary: RunSummary | dict[str, Any]) -> None:
        """A federated run's typed summary, or the centralized and local-only modes' dicts."""
        data = summary.to_dict() if isinstance(summary, RunSummary) else summary
        (self.path / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
        (self.path / "summary.txt").write_text(summary_text(as_summary(summary)))

    def write_json(self, name: str, record: dict[str, Any]) -> None:
        (self.path / name).write_text(json.dumps(record, indent=2) + "\n")

    def write_privacy(self, ledger: dict[str, Any]) -> None:
        (self.path / "privacy.json").write_text(json.dumps(ledger, indent=2) + "\n")

    def save_adapter(self, state: AdapterState, name: str = "adapter.safetensors") -> Path:
        from safetensors.torch import save_file

        path = self.path / name
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path

    def plot_validation(self, rows: list[dict[str, Any]], metric: str = "ndcg@10") -> Path | None:
        points = [(r["round"], r["valid"][metric]) for r in rows if r.get("valid")]
        if not points:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel(f"validation {metric.upper()}")
        ax.set_title("Validation NDCG@10 per round (round 0 = base model)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.path / "valid_ndcg10.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


_ROWS = (
    ("most_popular_test", "most popular"),
    ("base_test", "base model"),
    ("test", "federated"),
    ("local_test", "local only (no federation)"),
    ("last_round_test", "federated, last round"),
    ("base_test_warm", "base, warm targets"),
    ("test_warm", "federated, warm targets"),
    ("base_test_cold", "base, cold targets"),
    ("test_cold", "federated, cold targets"),
    ("ceiling_scratch_test", "ceiling: from scratch"),
    ("ceiling_full_test", "ceiling: full fine-tune"),
    ("ceiling_transformer_test", "ceiling: transformer (items frozen)"),
    ("ceiling_same_test", "ceiling: same parameters"),
)


def as_summary(summary: RunSummary | dict[str, Any]) -> RunSummary:
    return summary if isinstance(summary, RunSummary) else RunSummary.from_dict(summary)


def comparison_rows(summary: RunSummary) -> list[tuple[str, Metrics, Intervals]]:
    """(label, test metrics, their 95% intervals) for every model the summary holds, base first."""
    labels = list(_ROWS)
    if summary.best_round == summary.rounds:
        labels.remove(("last_round_test", "federated, last round"))  # the same adapter
    rows = [(label, *summary.model_metrics(key)) for key, label in labels]
    return [row for row in rows if row[1]]


def interval_text(value: float, ci: list[float] | None, digits: int = 4) -> str:
    """`0.0452 [0.0431, 0.0474]`, or the value alone without an interval."""
    if not ci:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def summary_text(summary: RunSummary) -> str:
    lines = [f"fedrec {summary.mode} run", "", "test split, full ranking; [95% bootstrap interval over users]"]
    lines.append(f"{'model':<28} {'HR@10':>26} {'NDCG@10':>26} {'HR@20':>8} {'NDCG@20':>8}")
    for label, m, ci in comparison_rows(summary):
        lines.append(f"{label:<28} {interval_text(m['hr@10'], ci.get('hr@10')):>26} "
                     f"{interval_text(m['ndcg@10'], ci.get('ndcg@10')):>26} {m['hr@20']:8.4f} {m['ndcg@20']:8.4f}")  # fmt: skip
    gain = summary.test_gain_ci.get("ndcg@10")
    if gain:
        lines.append(f"federated − base, NDCG@10 (paired by user): [{gain[0]:+.4f}, {gain[1]:+.4f}]")
    lines.append("")
    flat = summary.to_dict()
    for key in ("rounds", "best_round", "epsilon", "delta", "noise_multiplier", "noise_to_signal", "adapter_dimension",
                "users_trained", "wall_seconds", "adapter_bytes", "adapter_parameters", "ceiling_scratch_epoch",
                "ceiling_full_epoch", "ceiling_transformer_epoch", "ceiling_same_epoch", "selection"):  # fmt: skip
        if key in flat:
            lines.append(f"{key}: {flat[key]}")
    return "\n".join(lines) + "\n"
