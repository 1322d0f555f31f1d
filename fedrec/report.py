"""The final table a person reads at the end of a run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from fedrec.results import comparison_rows


def print_comparison(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="Test split, full ranking over all items")
    for col in ("model", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "users"):
        table.add_column(col, justify="left" if col == "model" else "right")
    base = summary.get("base_test") or {}
    for label, m in comparison_rows(summary):
        gain = ""
        if base and m is not base and base.get("ndcg@10"):
            gain = f" ({(m['ndcg@10'] / base['ndcg@10'] - 1) * 100:+.1f}%)"
        table.add_row(
            label, f"{m['hr@10']:.4f}", f"{m['ndcg@10']:.4f}{gain}", f"{m['hr@20']:.4f}", f"{m['ndcg@20']:.4f}",
            str(int(m.get("users", 0))),
        )  # fmt: skip
    console.print(table)
