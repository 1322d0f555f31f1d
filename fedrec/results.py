"""The results directory of a run: everything a person or a sweep reads afterwards."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from fedrec.config import FedRecConfig
from fedrec.model.lora import AdapterState


def default_output_dir(mode: str) -> str:
    return str(Path("results") / f"{datetime.now():%Y%m%d-%H%M%S}-{mode}")


class ResultsDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.metrics_path.write_text("")

    def write_config(self, cfg: FedRecConfig) -> None:
        (self.path / "config.toml").write_text(cfg.to_toml())

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.path / "summary.txt").write_text(summary_text(summary))

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


def comparison_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(label, test metrics) for every model the summary holds, base first."""
    labels = [
        ("most_popular_test", "most popular"),
        ("base_test", "base model"),
        ("test", "federated LoRA"),
        ("last_round_test", "federated LoRA, last round"),
        ("centralized_full_test", "centralized full fine-tune"),
        ("centralized_lora_test", "centralized LoRA"),
    ]
    if summary.get("best_round") == summary.get("rounds"):
        labels.remove(("last_round_test", "federated LoRA, last round"))  # the same adapter
    return [(label, summary[key]) for key, label in labels if summary.get(key)]


def summary_text(summary: dict[str, Any]) -> str:
    lines = [f"fedrec {summary.get('mode', 'federated')} run", ""]
    lines.append(f"{'model':<28} {'HR@10':>8} {'NDCG@10':>8} {'HR@20':>8} {'NDCG@20':>8}")
    for label, m in comparison_rows(summary):
        lines.append(f"{label:<28} {m['hr@10']:8.4f} {m['ndcg@10']:8.4f} {m['hr@20']:8.4f} {m['ndcg@20']:8.4f}")
    lines.append("")
    for key in ("rounds", "best_round", "epsilon", "delta", "noise_multiplier", "noise_to_signal", "users_trained", "wall_seconds", "adapter_bytes", "adapter_parameters"):
        if key in summary:
            lines.append(f"{key}: {summary[key]}")
    return "\n".join(lines) + "\n"
