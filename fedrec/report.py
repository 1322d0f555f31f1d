"""The final tables a person reads at the end of a run or a sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedrec.results import comparison_rows, interval_text


def print_comparison(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="Test split, full ranking over all items; [95% bootstrap interval over users]")
    for col in ("model", "HR@10", "NDCG@10", "vs base", "NDCG@20", "users"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    base = summary.get("base_test") or {}
    for label, m, ci in comparison_rows(summary):
        gain = ""
        if base and m is not base and base.get("ndcg@10"):
            gain = f"{(m['ndcg@10'] / base['ndcg@10'] - 1) * 100:+.1f}%"
        table.add_row(
            label, interval_text(m["hr@10"], ci.get("hr@10")), interval_text(m["ndcg@10"], ci.get("ndcg@10")), gain,
            f"{m['ndcg@20']:.4f}", str(int(m.get("users", 0))),
        )  # fmt: skip
    console = Console(width=max(console.width, console.measure(table, options=console.options.update(max_width=10_000)).maximum))
    console.print(table)
    for key, who in (("test_gain_ci", "federated"), ("local_test_gain_ci", "local only")):
        gain = summary.get(key, {}).get("ndcg@10")
        if gain:
            verdict = "beats the base" if gain[0] > 0 else "falls below the base" if gain[1] < 0 else "is within noise of the base"
            console.print(f"{who} − base, test NDCG@10 paired by user: [{gain[0]:+.4f}, {gain[1]:+.4f}]: {verdict}")


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


# Shown when any run of the sweep is private: what its ε rests on.
_PRIVACY_COLUMNS = (
    ("δ", "delta"), ("z", "noise_multiplier"), ("C", "clipping_norm"), ("q", "sampling_rate"),
    ("z·√d/m", "noise_to_signal"),
)  # fmt: skip


def write_sweep_table(
    points: list[dict[str, Any]], summaries: list[dict[str, Any]], root: Path, footer: str = ""
) -> list[dict[str, Any]]:
    """One row per run of a sweep: its swept values, test NDCG@10 and ε (and, when any run
    is private, δ, z, C, q and the noise-to-signal z·√d/m); printed, and written to
    ROOT/sweep.md and ROOT/sweep.json. Returns the rows."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    private = any(s.get("epsilon") is not None for s in summaries)
    rows = []
    for point, s in zip(points, summaries):
        rows.append({**{k: point.get(k) for k in keys}, "test_ndcg10": s["test"]["ndcg@10"],
                     "test_ndcg10_ci": (s.get("test_ci") or {}).get("ndcg@10"), "best_round": s.get("best_round"),
                     "last_round_ndcg10": (s.get("last_round_test") or {}).get("ndcg@10"),
                     "base_ndcg10": s["base_test"]["ndcg@10"], "epsilon": s.get("epsilon"),
                     **({key: s.get(key) for _, key in _PRIVACY_COLUMNS} if private else {}),
                     "adapter_dimension": s.get("adapter_dimension"), "rounds": s.get("rounds"),
                     "wall_s": s.get("wall_seconds"), "results_dir": s.get("results_dir")})  # fmt: skip
    extra = _PRIVACY_COLUMNS if private else ()
    cols = [*keys, "test NDCG@10 [95% CI] (best round)", "last round", "base", "ε", *(c for c, _ in extra), "d",
            "rounds", "wall s"]  # fmt: skip

    def cells(r: dict[str, Any]) -> list[str]:
        last = "–" if r["last_round_ndcg10"] is None else f"{r['last_round_ndcg10']:.4f}"
        return [*(str(r[k]) for k in keys), f"{interval_text(r['test_ndcg10'], r['test_ndcg10_ci'])} (r{r['best_round']})",
                last, f"{r['base_ndcg10']:.4f}", _num(r["epsilon"]), *(_num(r[key]) for _, key in extra),
                str(r["adapter_dimension"]), str(r["rounds"]), "–" if r["wall_s"] is None else f"{r['wall_s']:.1f}"]  # fmt: skip

    _print_sweep(f"Sweep: {len(rows)} runs under {root}", cols, [cells(r) for r in rows], len(keys), footer)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(cells(r)) + " |" for r in rows]
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.md").write_text("\n".join(lines) + (f"\n\n{footer}" if footer else "") + "\n")
    (root / "sweep.json").write_text(json.dumps(rows, indent=2))
    return rows


def _print_sweep(title: str, cols: list[str], cells: list[list[str]], swept: int, footer: str) -> None:
    """The sweep table on the console: columns equal in every run (δ, C, the base, ...)
    go to one line under it, and the console is made as wide as the table, so that no
    value is cut to "…" (rich's default width off a terminal is 80 columns)."""
    same = [i for i in range(swept, len(cols)) if len({c[i] for c in cells}) == 1 and len(cells) > 1]
    keep = [i for i in range(len(cols)) if i not in same]
    table = Table(title=title)
    for i in keep:
        table.add_column(cols[i], justify="left" if i < swept else "right", no_wrap=True)
    for c in cells:
        table.add_row(*(c[i] for i in keep))
    console = Console()
    natural = console.measure(table, options=console.options.update(max_width=10_000)).maximum
    console = Console(width=max(console.width, natural))
    console.print(table)
    if same:
        console.print("the same in every run: " + ", ".join(f"{cols[i]} {cells[0][i]}" for i in same))
    if footer:
        console.print(footer)
