"""The report's figures (matplotlib, Agg): one function per PNG, each from loaded runs.

`runs` are `fedrec.report.Run` records; `groups` are runs that differ only in their seed,
keyed by the method's label and ε (`fedrec.report.group_runs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def style(i: int) -> dict[str, Any]:
    """The i-th line's colour and marker: ten colours, then each again with the next marker,
    so that 100 methods stay distinct (matplotlib's cycle repeats after ten)."""
    return {"color": f"C{i % 10}", "marker": MARKERS[(i // 10) % len(MARKERS)]}


def mean_interval(values: Sequence[float], ci: list[float] | None = None) -> tuple[float, float, float]:
    """(mean, low, high): over seeds the 95% t-interval of the mean; one run, its bootstrap interval."""
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        lo, hi = ci if ci else (v[0], v[0])
        return float(v[0]), float(lo), float(hi)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def ndcg_vs_epsilon(groups: list[dict[str, Any]], references: dict[str, float], path: Path) -> Path:
    """Test NDCG@10 against ε, one line per method with its 95% intervals; the runs without
    DP as dotted lines in the method's colour; base, ceilings and local-only as grey lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    methods = list(dict.fromkeys(g["method"] for g in groups))
    private = [g for g in groups if g["epsilon"] is not None]
    for i, method in enumerate(methods):
        look = style(i)
        pts = sorted((g["epsilon"], *g["ndcg_mean_interval"]) for g in private if g["method"] == method)
        if pts:
            eps, mean, lo, hi = (np.array(c) for c in zip(*pts))
            shift = 1 + 0.025 * (i - (len(methods) - 1) / 2)  # side by side on the log axis: bars apart
            ax.errorbar(eps * shift, mean, yerr=[mean - lo, hi - mean], capsize=3, label=method, **look)
        for g in groups:
            if g["method"] == method and g["epsilon"] is None:  # the run without noise, with its interval
                mean, lo, hi = g["ndcg_mean_interval"]
                ax.axhline(mean, color=look["color"], linestyle=":", label=f"{method}, ε = none")
                ax.axhspan(lo, hi, color=look["color"], alpha=0.07, linewidth=0)
    styles = ["--", "-.", (0, (1, 2)), (0, (5, 2, 1, 2)), "-"]
    for j, (name, value) in enumerate(references.items()):
        ax.axhline(value, color="gray", linestyle=styles[j % len(styles)], linewidth=1, label=name)
    # Horizontal lines do not move matplotlib's limits: frame every value drawn.
    values = [v for g in groups for v in g["ndcg_mean_interval"]] + list(references.values())
    lo, hi = min(values), max(values)
    ax.set_ylim(max(0.0, lo - 0.1 * (hi - lo + 1e-3)), hi + 0.1 * (hi - lo + 1e-3))
    if private:
        ax.set_xscale("log")
        # Ticks at the targets asked for (8, not the 7.99 an accountant spent); points at what was spent.
        ticks = sorted({g.get("target_epsilon") or g["epsilon"] for g in private})
        ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
        ax.minorticks_off()
    ax.set_xlabel("ε spent (accountant, at the run's δ)")
    ax.set_ylabel("test NDCG@10 (result round)")
    ax.set_title("Test NDCG@10 against ε (95% intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def per_round(runs: list[Any], path: Path, title: str, series: dict[str, Any], ylabel: str, log: bool = False,
              target: Any = None) -> Path | None:  # fmt: skip
    """A per-round quantity from metrics.jsonl: one line per method (`run.series`), the mean
    over its seeds with a band from the lowest to the highest seed; `series` maps a name to
    pick(run, row) → value or None. Lines with the same values (a payload shared by several
    methods) are drawn once and named together. `target(run)` → a value drawn as a dashed
    line in the method's colour (ε's target)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    buckets: dict[str, list[Any]] = {}
    for run in runs:
        buckets.setdefault(getattr(run, "series", "") or run.label, []).append(run)
    lines: dict[tuple, list[tuple[int, str]]] = {}  # the drawn values → (method's index, name) of those sharing them
    for i, (name, members) in enumerate(buckets.items()):
        for j, (what, pick) in enumerate(series.items()):
            by_round: dict[int, list[float]] = {}
            for run in members:
                for r in run.rows:
                    if (y := pick(run, r)) is not None:
                        by_round.setdefault(r["round"], []).append(float(y))
            if by_round:
                key = (j, tuple((x, tuple(v)) for x, v in sorted(by_round.items())))
                lines.setdefault(key, []).append((i, name + (f" ({what})" if len(series) > 1 else "")))
    if not lines:
        plt.close(fig)
        return None
    methods = list(buckets)
    for (j, pts), names in lines.items():
        look = style(names[0][0])
        x = np.array([p[0] for p in pts])
        mean = np.array([np.mean(p[1]) for p in pts])
        label = names[0][1] if len(names) == 1 else f"{names[0][1]} (and {len(names) - 1} more with the same values)"
        seeds = max(len(p[1]) for p in pts)
        ax.plot(x, mean, color=look["color"], linestyle=["-", "--", ":"][j % 3], marker=look["marker"],
                markevery=max(1, len(x) // 12), markersize=4, label=label + (f", mean of {seeds} seeds" if seeds > 1 else ""))  # fmt: skip
        if seeds > 1:
            ax.fill_between(x, [min(p[1]) for p in pts], [max(p[1]) for p in pts], color=look["color"], alpha=0.15, linewidth=0)
    targets = sorted({t for members in buckets.values() if target and (t := target(members[0]))})
    for value in targets:  # one line per distinct target, whichever methods share it
        ax.axhline(value, color="gray", linestyle="--", linewidth=0.8)
        ax.annotate(f"target {value:g}", (1.0, value), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=7, color="gray")  # fmt: skip
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # Below the axes, one entry per line: a sweep's labels name several keys and would be cut at the side.
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0.0, -0.14), frameon=False)
    return _save(fig, path, layout=False)


def gain_kept_vs_users(rows: list[dict[str, Any]], path: Path, last_round: bool = False) -> Path:
    """Share of the non-private gain each ε keeps, against the population size (log x), with
    its interval (experiments/scale_population.py's rows, fedrec.report's population law);
    `last_round`: also the share at every run's last round (dashed, the same colour)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for eps in dict.fromkeys(r["epsilon"] for r in rows if r["epsilon"] != "none"):
        colour = None
        for key, style, name in (("kept", "-", ""), ("kept_last", "--", ", last round"))[: 2 if last_round else 1]:
            mine = sorted((r for r in rows if r["epsilon"] == eps and r.get(key) is not None), key=lambda r: r["users"])
            if not mine:
                continue
            x = [r["users"] for r in mine]
            y = np.array([r[key] for r in mine])
            err = np.abs(np.array([r[f"{key}_ci"] or [r[key], r[key]] for r in mine]).T - y)
            line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, ls=style, color=colour, label=f"ε = {eps}{name}")
            colour = line[0].get_color()
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="non-private")
    ax.axhline(0.0, color="black", lw=0.8, ls=":", label="base")
    ax.set_xscale("log")
    ax.set_xlabel("users in the population (N)")
    ax.set_ylabel("share of the non-private gain kept")
    ax.set_title("test NDCG@10 gain over the base: private vs non-private", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path, layout: bool = True) -> Path:
    """layout=False for a legend outside the axes: tight_layout would shrink the axes to make
    room for it; bbox_inches="tight" grows the image instead."""
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")  # vector, for a paper
    _plt().close(fig)
    return path
