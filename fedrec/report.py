"""The final tables a person reads at the end of a run or a sweep."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rich.console import Console
from rich.table import Table

from fedrec.provenance import provenance
from fedrec.results import as_summary, comparison_rows, interval_text
from fedrec.summary import RunSummary


def print_comparison(summary: RunSummary | dict[str, Any], console: Console | None = None) -> None:
    console, summary = console or Console(), as_summary(summary)
    table = Table(title="Test split, full ranking over all items; [95% bootstrap interval over users]")
    for col in ("model", "HR@10", "NDCG@10", "vs base", "NDCG@20", "users"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    base = summary.base_test
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
    for gain, who in ((summary.test_gain_ci.get("ndcg@10"), "federated"),
                      ((summary.extra.get("local_test_gain_ci") or {}).get("ndcg@10"), "local only")):
        if gain:
            verdict = "beats the base" if gain[0] > 0 else "falls below the base" if gain[1] < 0 else "is within noise of the base"
            console.print(f"{who} − base, test NDCG@10 paired by user: [{gain[0]:+.4f}, {gain[1]:+.4f}]: {verdict}")


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _epsilon(value: float | None) -> str:
    """ε as spent; `none` for a run without noise (the spelling `target-epsilon=none` takes)."""
    return "none" if value is None else _num(value)


# Shown when any run of the sweep is private: what its ε rests on.
_PRIVACY_COLUMNS = (
    ("δ", "delta"), ("z", "noise_multiplier"), ("C", "clipping_norm"), ("q", "sampling_rate"),
    ("z·√d/m", "noise_to_signal"),
)  # fmt: skip


def write_sweep_table(
    points: list[dict[str, Any]], summaries: list[RunSummary | dict[str, Any]], root: Path, footer: str = ""
) -> list[dict[str, Any]]:
    """One row per run of a sweep: its swept values, test NDCG@10 and ε (and, when any run
    is private, δ, z, C, q and the noise-to-signal z·√d/m); printed, and written to
    ROOT/sweep.md and ROOT/sweep.json. Returns the rows."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    summaries = [as_summary(s) for s in summaries]
    private = any(s.epsilon is not None for s in summaries)
    rows = []
    for point, s in zip(points, summaries):
        rows.append({**{k: point.get(k) for k in keys}, "test_ndcg10": s.test["ndcg@10"],
                     "test_ndcg10_ci": s.test_ci.get("ndcg@10"), "best_round": s.best_round,
                     "last_round_ndcg10": s.last_round_test.get("ndcg@10"),
                     "base_ndcg10": s.base_test["ndcg@10"], "epsilon": s.epsilon,
                     **({key: getattr(s, key) for _, key in _PRIVACY_COLUMNS} if private else {}),
                     "adapter_dimension": s.adapter_dimension, "rounds": s.rounds,
                     "up_kb_per_user_round": s.per_user_kb("up"), "down_kb_per_user_round": s.per_user_kb("down"),
                     "wall_s": s.wall_seconds, "results_dir": s.results_dir})  # fmt: skip
    extra = _PRIVACY_COLUMNS if private else ()
    cols = [*keys, "test NDCG@10 [95% CI] (best round)", "last round", "base", "ε", *(c for c, _ in extra), "d",
            "KB down/up per user·round", "rounds", "wall s"]  # fmt: skip

    def cells(r: dict[str, Any]) -> list[str]:
        last = "–" if r["last_round_ndcg10"] is None else f"{r['last_round_ndcg10']:.4f}"
        return [*(str(r[k]) for k in keys), f"{interval_text(r['test_ndcg10'], r['test_ndcg10_ci'])} (r{r['best_round']})",
                last, f"{r['base_ndcg10']:.4f}", _epsilon(r["epsilon"]), *(_num(r[key]) for _, key in extra),
                str(r["adapter_dimension"]), f"{_num(r['down_kb_per_user_round'])} / {_num(r['up_kb_per_user_round'])}",
                str(r["rounds"]), "–" if r["wall_s"] is None else f"{r['wall_s']:.1f}"]  # fmt: skip

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


# ---------------------------------------------------------------- python -m fedrec.report
# Keys that say which run of a method this is, or how its ε was set: never part of a method's name.
_NOT_METHOD = {
    "seed", "output-dir", "cache-dir", "resume-from", "client-state-dir", "target-epsilon", "noise-multiplier",
    "max-epsilon", "sampling", "accountant", "target-delta", "audit-canaries", "mode",
}  # fmt: skip


@dataclass
class Run:
    """One results directory, as the report reads it."""

    path: Path
    summary: RunSummary
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    method: str = ""  # the config keys that tell it from the other methods (`group_runs`)
    series: str = ""  # method and privacy: its line in the per-round figures (the mean over its seeds)
    label: str = ""  # method, privacy and seed

    @property
    def mode(self) -> str:
        return self.summary.mode


def load_runs(dirs: list[Path], skipped: list[str] | None = None) -> list[Run]:
    """Every results directory (one holding summary.json) under the given folders, sorted.

    A run's folder without a summary (stopped, failed, still running) and a run of another
    dataset than most are left out; each is named with why in `skipped`."""
    skipped = skipped if skipped is not None else []
    candidates = sorted({p.parent.resolve() for d in dirs for name in ("summary.json", "config.toml")
                         for p in ([Path(d) / name] if (Path(d) / name).exists() else Path(d).rglob(name))})  # fmt: skip
    runs = []
    for path in candidates:
        if not (path / "summary.json").exists():
            skipped.append(f"{path}: incomplete, no summary.json ({_why_incomplete(path)})")
            continue
        try:
            config = tomllib.loads((path / "config.toml").read_text()) if (path / "config.toml").exists() else {}
            summary = RunSummary.from_dict(json.loads((path / "summary.json").read_text()))
            rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()] \
                if (path / "metrics.jsonl").exists() else []  # fmt: skip
        except (ValueError, TypeError, OSError) as e:  # a damaged file: said, not fatal to the report
            skipped.append(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
            continue
        runs.append(Run(path, summary, config, rows))
    datasets = [_dataset(r) for r in runs]
    if len(set(datasets)) > 1:
        main = max(set(datasets), key=datasets.count)
        for r in [r for r in runs if _dataset(r) != main]:
            skipped.append(f"{r.path}: another dataset ({_dataset(r)}; the report's is {main})")
            runs.remove(r)
    return runs


# What names a dataset: the seed only draws a split (and synthetic data) of it, so seeds stay
# together; so do population sizes of one process (synthetic-users, teacher-users), which the
# population law compares.
DATASET_KEYS = ("dataset", "data-path", "min-user-interactions", "synthetic-items",
                "synthetic-clusters", "synthetic-mean-length")  # fmt: skip
# Population sizes: where one of these varies, the report adds the population law.
POPULATION_KEYS = ("teacher-users", "synthetic-users")
_T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 8: 2.365, 10: 2.262}  # Student t, 97.5%, by n


def population_law(runs: list[Run]) -> list[dict[str, Any]]:
    """Per method, population size N and ε: the share of the same N's non-private gain in test
    NDCG@10 that the private runs keep (mean over seeds, with a 95% t-interval over seeds),
    beside the non-private run's gain and the meter's agreement (mean agreed/C over its rounds).
    Empty unless a population key varies."""
    federated = [r for r in runs if r.mode == "federated"]
    varying = _method_keys(federated)
    if not any(k in varying for k in POPULATION_KEYS):
        return []
    others = [k for k in varying if k not in POPULATION_KEYS and k != "data-seed"]
    cells: dict[tuple, list[Run]] = {}
    for r in federated:
        method = ", ".join(f"{k}={r.config.get(k)}" for k in others) or "federated"
        eps = r.config.get("target-epsilon") or None
        if eps is None and r.config.get("noise-multiplier"):
            continue  # a fixed noise multiplier is no ε cell
        cells.setdefault((method, r.summary.private_users, eps), []).append(r)
    rows = []
    for (method, n, eps), members in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 1e9)):
        none = cells.get((method, n, None))
        gains, last = _gains(members, "test"), _gains(members, "last_round_test")
        row = {"method": method, "users": n, "epsilon": "none" if eps is None else f"{eps:g}", "seeds": len(members),
               "z": members[0].summary.noise_multiplier, "q": members[0].summary.sampling_rate,
               "base": float(np.mean([m.summary.base_test["ndcg@10"] for m in members])),
               "gain": float(np.mean(gains)), "gain_ci": members[0].summary.test_gain_ci.get("ndcg@10") if len(members) == 1 else None,
               "gain_last": float(np.mean(last)), "best_rounds": [m.summary.best_round for m in members],
               "agreed": _mean_meter(members, "snr-agreed"), "kept": None, "kept_ci": None,
               "kept_last": None, "kept_last_ci": None, "results_dirs": [str(m.path) for m in members]}  # fmt: skip
        if eps is not None and none:
            # The headline rounds (picked by the runs' model selection) and the last round (the
            # plan's T, no selection): a selection whose noise is larger than the differences
            # between rounds moves the non-private reference, and with it every share.
            for key, mine, reference in (("kept", gains, _gains(none, "test")), ("kept_last", last, _gains(none, "last_round_test"))):
                if np.mean(reference) > 0:
                    shares = np.array(mine) / float(np.mean(reference))
                    half = _T95.get(len(shares), 2.0) * shares.std(ddof=1) / np.sqrt(len(shares)) if len(shares) > 1 else None
                    row[key] = float(shares.mean())
                    row[f"{key}_ci"] = [row[key] - half, row[key] + half] if half is not None else None
                    row[f"{key}_seeds"] = shares.tolist()
        rows.append(row)
    return rows


def _gains(members: list[Run], which: str) -> list[float]:
    """Test NDCG@10 over the base, at the headline round (`test`) or the last (`last_round_test`,
    the headline's where a run kept no other)."""
    return [(getattr(m.summary, which) or m.summary.test)["ndcg@10"] - m.summary.base_test["ndcg@10"] for m in members]


def _mean_meter(members: list[Run], key: str) -> float | None:
    values = [r["train"][key] for m in members for r in m.rows if key in r.get("train", {})]
    return float(np.mean(values)) if values else None


def half_crossings(rows: list[dict[str, Any]], level: float = 0.5, kept: str = "kept") -> dict[tuple[str, str], dict[str, Any]]:
    """Per method and ε: the N at which the share kept (`kept`: at the headline rounds;
    `kept_last`: at the last) first reaches `level`, interpolated in log N between the sizes
    measured, and the same for the interval's two ends (the upper end reaches it at the
    smaller N). None where a curve never reaches it."""
    out = {}
    for key in dict.fromkeys((r["method"], r["epsilon"]) for r in rows if r.get(kept) is not None):
        mine = sorted((r for r in rows if (r["method"], r["epsilon"]) == key and r.get(kept) is not None), key=lambda r: r["users"])

        def cross(values: list[float]) -> float | None:
            for (n0, v0), (n1, v1) in zip(zip([r["users"] for r in mine], values), zip([r["users"] for r in mine][1:], values[1:])):
                if v0 < level <= v1:
                    return float(10 ** (np.log10(n0) + (level - v0) / (v1 - v0) * (np.log10(n1) - np.log10(n0))))
            return float(mine[0]["users"]) if values and values[0] >= level else None

        ci = [r[f"{kept}_ci"] or [r[kept], r[kept]] for r in mine]
        out[key] = {"at": cross([r[kept] for r in mine]), "from": cross([c[1] for c in ci]), "to": cross([c[0] for c in ci]),
                    "sizes": [mine[0]["users"], mine[-1]["users"]],
                    # already at the smallest size: the point is there or below it
                    "at_or_below": mine[0][kept] >= level, "from_or_below": ci[0][1] >= level,
                    "to_or_below": ci[0][0] >= level}  # fmt: skip
    return out


def _law_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## The population law", "",
             "Share of the same population's non-private gain (test NDCG@10 over the base) that each ε keeps: mean "
             "over seeds [95% t-interval over seeds], at the runs' headline rounds (their model selection) and at "
             "their last round (no selection); the non-private run's gain with its paired 95% interval over "
             "users; agreed/C: the signal-to-noise meter's agreement, the mean over the run's rounds.", "",
             "| method | N | ε | seeds | z | q | base | gain | share kept | headline rounds | gain, last round | "
             "share kept, last round | agreed/C |",
             "|---|---:|---|---:|---:|---:|---:|---|---|---|---:|---|---:|"]  # fmt: skip

    def share(r: dict[str, Any], key: str) -> str:
        if r.get(key) is None:
            return "–"
        ci = r.get(f"{key}_ci")
        return f"{r[key]:.0%}" + (f" [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else "")

    for r in rows:
        gain = f"{r['gain']:+.4f}" + (f" [{r['gain_ci'][0]:+.4f}, {r['gain_ci'][1]:+.4f}]" if r["gain_ci"] else "")
        lines.append(f"| {r['method']} | {r['users']:,} | {r['epsilon']} | {r['seeds']} | {_num(r['z'])} | {_num(r['q'])} | "
                     f"{r['base']:.4f} | {gain} | {share(r, 'kept')} | {', '.join(str(b) for b in r['best_rounds'])} | "
                     f"{r['gain_last']:+.4f} | {share(r, 'kept_last')} | {_num(r['agreed'])} |")  # fmt: skip
    lines += ["", "| method | ε | N at which it keeps 50% [interval], headline rounds | at the last round |", "|---|---|---|---|"]
    last = half_crossings(rows, kept="kept_last")

    def n(c: dict[str, Any] | None) -> str:
        if c is None:
            return "–"

        def one(v: float | None, below: bool = False) -> str:
            return f"beyond {c['sizes'][1]:,}" if v is None else ("≤ " if below else "") + f"{v:,.0f}"

        return f"{one(c['at'], c['at_or_below'])} [{one(c['from'], c['from_or_below'])}, {one(c['to'], c['to_or_below'])}]"

    for (method, eps), c in half_crossings(rows).items():
        lines.append(f"| {method} | {eps} | {n(c)} | {n(last.get((method, eps)))} |")
    return lines


def _dataset(run: Run) -> str:
    if run.config:
        kind = run.config.get("dataset", "synthetic")
        keys = [k for k in DATASET_KEYS if k != "dataset" and (k.startswith("synthetic") == (kind == "synthetic"))]
        return f"{kind}(" + ", ".join(f"{k}={run.config.get(k)}" for k in keys if run.config.get(k) not in (None, "")) + ")"
    return re.sub(r", seed=\d+", "", (run.summary.dataset or "").split(":")[0])


def _why_incomplete(path: Path) -> str:
    manifest = path / "checkpoint" / "manifest.json"
    if manifest.exists():
        done = json.loads(manifest.read_text()).get("round")
        return f"stopped after round {done}; python -m fedrec.simulate --resume {path} finishes it"
    return "stopped or failed before its first checkpoint"


def _method_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config} - _NOT_METHOD)
    return [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def group_runs(runs: list[Run]) -> list[dict[str, Any]]:
    """Federated runs grouped by method and privacy setting; each group's seeds summarized."""
    from fedrec.figures import mean_interval  # scipy: loaded only for reports, not by every run

    federated = [r for r in runs if r.mode == "federated"]
    keys = _method_keys(federated)
    seeds = len({r.config.get("seed", 0) for r in federated}) > 1
    by: dict[tuple, list[Run]] = {}
    for r in federated:
        r.method = ", ".join(f"{k}={r.config.get(k)}" for k in keys) or "federated"
        eps, z = r.config.get("target-epsilon", 0.0), r.config.get("noise-multiplier", 0.0)
        privacy = f"ε={eps:g}" if eps else f"z={z:g}" if z else "ε=none"
        # Its own name in the per-round figures: method, privacy and seed.
        r.series = f"{r.method}, {privacy}"  # its line in the per-round figures: seeds are its mean and band
        r.label = r.series + (f", seed {r.config.get('seed', 0)}" if seeds else "")
        by.setdefault((r.method, eps, z), []).append(r)
    groups = []
    for (label, _target, _z), members in by.items():
        s = [m.summary for m in members]
        eps = [x.epsilon for x in s if x.epsilon is not None]
        ndcg = [x.test["ndcg@10"] for x in s]
        audit = [x.audit or {} for x in s]
        ci = s[0].test_ci.get("ndcg@10") if len(s) == 1 else None  # one run: its bootstrap interval
        groups.append({
            "method": label,
            "seeds": sorted(m.config.get("seed", 0) for m in members),
            "epsilon": float(np.mean(eps)) if eps else None,
            "whatif": s[0].whatif,  # a what-if run: its ε is a stated population's (simulated)
            "target_epsilon": _target or None,
            "delta": s[0].delta,
            "z": s[0].noise_multiplier,
            "q": s[0].sampling_rate,
            "C": s[0].clipping_norm,
            "d": s[0].adapter_dimension,
            "noise_to_signal": s[0].noise_to_signal,
            "test_ndcg10": ndcg,
            "test_hr10": [x.test["hr@10"] for x in s],
            "test_ndcg10_ci": ci,
            "ndcg_mean_interval": mean_interval(ndcg, ci),
            "base_ndcg10": [x.base_test["ndcg@10"] for x in s],
            # the gain over the base on the same test users, paired by user (one run's interval)
            "gain_ndcg10": [x.test["ndcg@10"] - x.base_test["ndcg@10"] for x in s],
            "gain_ndcg10_ci": s[0].test_gain_ci.get("ndcg@10") if len(s) == 1 else None,
            "best_round": [x.best_round for x in s],
            "selection": [x.selection or "private" for x in s],
            # Under DP: the round un-noised private validation would have picked (a diagnostic only).
            "diagnostic_private_best": [(x.diagnostic_private_best.get("test") or x.test)["ndcg@10"]
                                        for x in s if x.diagnostic_private_best],
            "snr_agreed_first": [_first_meter(m.rows, "snr-agreed") for m in members],
            "snr_run_last": [_last_meter(m.rows, "snr-run") for m in members],
            "wall_s": [x.wall_seconds for x in s],
            "audit_lower_bound": [a.get("epsilon_lower_bound") for a in audit if a],
            "audit_estimate": [a.get("epsilon_estimate") for a in audit if a],
            "bytes_up_per_user_round": _per_user_bytes(s[0], "up"),
            "bytes_down_per_user_round": _per_user_bytes(s[0], "down"),
            "results_dirs": [str(m.path) for m in members],
        })  # fmt: skip
    return sorted(groups, key=lambda g: (g["method"], g["epsilon"] is None, g["epsilon"] or 0.0))


def _per_user_bytes(summary: RunSummary, way: str) -> float | None:
    return ((summary.communication or {}).get("per_user_round") or {}).get(way)


def _first_meter(rows: list[dict[str, Any]], key: str) -> float | None:
    return next((r["train"][key] for r in rows if key in r.get("train", {})), None)


def _last_meter(rows: list[dict[str, Any]], key: str) -> float | None:
    return next((r["train"][key] for r in reversed(rows) if key in r.get("train", {})), None)


def same_users(local: Run, federated: list[Run]) -> bool:
    """Whether a local-only run ranked the users the federated runs were tested on: both
    covered every private user (a sample of each is drawn differently) of the same split
    (the seed draws the split)."""
    seeds = {r.config.get("seed", 0) for r in federated}
    everyone = local.summary.extra.get("local_users") == local.summary.private_users and local.config.get("seed", 0) in seeds
    return everyone and all(r.summary.test_users in (None, r.summary.private_users)
                            and r.summary.private_users == local.summary.private_users for r in federated)  # fmt: skip


def references(runs: list[Run], notes: list[str] | None = None) -> dict[str, float]:
    """The reference lines: base, most popular, local-only and the centralized ceilings (test
    NDCG@10). A local-only run on other users than the federated runs' is not one: it goes to
    `notes`, with its own base and its gain paired by user."""
    out: dict[str, float] = {}
    notes = notes if notes is not None else []
    federated = [r for r in runs if r.mode == "federated"]
    for r in [r for r in runs if r.mode == "local"]:
        if federated and not same_users(r, federated):
            s, gain = r.summary, (r.summary.extra.get("local_test_gain_ci") or {}).get("ndcg@10")
            own = (s.extra.get("local_test") or {}).get("ndcg@10")
            notes.append(f"local only ({r.path.name}) ranked {s.extra.get('local_users'):,} of {s.private_users:,} private "
                         f"users, not the federated runs' test users: {own:.4f} against its own base "
                         f"{s.base_test['ndcg@10']:.4f} on those users" + (f", paired gain [{gain[0]:+.4f}, {gain[1]:+.4f}]"
                                                                           if gain else "") + "; not drawn")  # fmt: skip
            runs = [x for x in runs if x is not r]
    # The base over all users: a local-only run on a user sample has its own base, for its pairing only.
    with_base = [r for r in runs if r.mode == "federated"] or runs
    bases = sorted({r.summary.base_test["ndcg@10"] for r in with_base if r.summary.base_test})
    if bases:
        out["base model" + (f" (mean of {len(bases)})" if len(bases) > 1 else "")] = float(np.mean(bases))
    found: dict[str, list[float]] = {}  # several seeds of a reference: their mean, as for the base
    for r in runs:
        for key, label in (("most_popular_test", "most popular"), ("local_test", "local only"),
                           ("ceiling_scratch_test", "ceiling: from scratch"), ("ceiling_full_test", "ceiling: full fine-tune"),
                           ("ceiling_transformer_test", "ceiling: transformer, items frozen"),
                           ("ceiling_same_test", "ceiling: same parameters")):  # fmt: skip
            metrics, _ci = r.summary.model_metrics(key)
            if metrics:
                found.setdefault(label, []).append(metrics["ndcg@10"])
    for label, values in found.items():
        out[label + (f" (mean of {len(values)})" if len(values) > 1 else "")] = float(np.mean(values))
    return out


def _spread(values: list[float], ci: list[float] | None = None, digits: int = 4, signed: bool = False) -> str:
    """One run: value [95% CI]; several seeds: mean ± std (n)."""
    if not values:
        return "–"
    sign = "+" if signed else ""
    if len(values) == 1:
        if signed:
            return f"{values[0]:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")
        return interval_text(values[0], ci, digits)
    return f"{np.mean(values):{sign}.{digits}f} ± {np.std(values, ddof=1):.{digits}f} (n={len(values)})"


def _kb(value: float | None) -> str:
    return "–" if value is None else f"{value / 1024:,.1f}"


def write_report(dirs: list[Path], out: Path) -> Path:
    """report.md with its PNG figures in `out`, from every run under `dirs`."""
    from fedrec import figures

    skipped: list[str] = []
    runs = load_runs(dirs, skipped)
    for line in skipped:
        print(f"fedrec.report: skipped {line}", file=sys.stderr)
    if not runs:
        raise ValueError(f"no results directory (summary.json) under {', '.join(map(str, dirs))}")
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    notes: list[str] = []
    refs = references(runs, notes)
    federated = [r for r in runs if r.mode == "federated"]
    private = any(g["epsilon"] is not None for g in groups)
    made = {}
    if groups:
        made["Test NDCG@10 against ε"] = figures.ndcg_vs_epsilon(groups, refs, out / "ndcg_vs_epsilon.png")
    plots = (
        ("Validation NDCG@10 against rounds", "valid_vs_rounds.png",
         {"valid": lambda _run, r: r.get("valid", {}).get("ndcg@10")}, "validation NDCG@10", False),
        ("Update norm and clip against rounds", "norm_vs_rounds.png",
         {"mean update norm": lambda _run, r: r.get("train", {}).get("update-norm"),
          "clip C": lambda _run, r: r.get("train", {}).get("clipping-norm") or None}, "L2 norm", True),
        ("ε spent against rounds", "epsilon_vs_rounds.png",
         {"ε": lambda _run, r: r.get("train", {}).get("epsilon")}, "ε", False),
        # The signal-to-noise meter (fedrec.privacy.snr), in units of the clip C.
        ("Signal and noise per round (units of C)", "snr_vs_rounds.png",
         {"agreed signal": lambda _run, r: r.get("train", {}).get("snr-agreed"),
          "noise on the mean": lambda _run, r: r.get("train", {}).get("snr-noise") or None}, "norm / C", True),
        ("Signal over the run against the noise on it", "snr_run_vs_rounds.png",
         {"Σ agreed / noise on Σ means": lambda _run, r: r.get("train", {}).get("snr-run")}, "ratio", True),
    )  # fmt: skip
    for title, name, series, ylabel, log in plots:
        target = (lambda run: run.config.get("target-epsilon") or run.config.get("max-epsilon")) if name.startswith("epsilon") else None
        path = figures.per_round(federated, out / name, title, series, ylabel, log, target=target)
        if path:
            made[title] = path
    traffic = [r for r in federated if (r.summary.communication or {}).get("per_user_round")]
    if traffic:
        def payload(way: str):
            def pick(run: Run, row: dict[str, Any]) -> float | None:
                per_user = _per_user_bytes(run.summary, way)
                return row["train"]["users"] * per_user if "train" in row and per_user else None

            return pick

        path = figures.per_round(traffic, out / "bytes_vs_rounds.png", "Bytes per round: the round's users × their payload",
                                 {"down": payload("down"), "up": payload("up")}, "bytes", True)  # fmt: skip
        if path:
            made["Bytes per round"] = path
    cols = ["method", "ε", "δ", "z", "q", "C", "d", "z·√d/m", "test NDCG@10", "− base (paired by user)", "test HR@10",
            "round (picked by)",
            "diagnostic: private-best round's test NDCG@10", "agreed/C (round 1)", "run SNR (last)", "wall s",
            "audit ε LB / est.", "KB up / user·round"]  # fmt: skip
    lines = [f"# fedrec report", "", f"{len(runs)} runs from {', '.join(str(d) for d in dirs)}.", "",
             "Test metrics: full ranking over all items at each run's result round: without DP the best round on "
             "private validation, under DP the last round or the best on public users' held-out items "
             "(`model-selection`), so that the headline stays inside the privacy guarantee. The diagnostic column is "
             "the round that un-noised private validation would have picked: outside the guarantee, never a "
             "headline. One run shows its 95% bootstrap interval over users, several seeds mean ± std over seeds "
             "(n). ε is what the accountant spent at δ. agreed/C and run SNR are the signal-to-noise meter's "
             "readings (`fedrec.privacy.snr`). The audit columns are the canary audit's 95% lower bound and one-shot "
             "estimate (`audit-canaries`).", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
    for g in groups:
        audit = "–"
        if g["audit_lower_bound"]:
            audit = f"{np.mean(g['audit_lower_bound']):.2f} / " + (f"{np.mean(g['audit_estimate']):.2f}"
                                                                     if all(e is not None for e in g["audit_estimate"]) else "–")  # fmt: skip
        eps_cell = _epsilon(g["epsilon"]) + (f" (what-if: ε for a population of {g['whatif']['population']:,})"
                                             if g.get("whatif") else "")  # fmt: skip
        cells = [g["method"], eps_cell, _num(g["delta"]), _num(g["z"]), _num(g["q"]), _num(g["C"]),
                 str(g["d"]), _num(g["noise_to_signal"]), _spread(g["test_ndcg10"], g["test_ndcg10_ci"]),
                 _spread(g["gain_ndcg10"], g["gain_ndcg10_ci"], signed=True), _spread(g["test_hr10"]),
                 ",".join(str(b) for b in g["best_round"]) + f" ({','.join(sorted(set(g['selection'])))})",
                 _spread(g["diagnostic_private_best"]), _spread([a for a in g["snr_agreed_first"] if a is not None]),
                 _spread([a for a in g["snr_run_last"] if a is not None], digits=3),
                 _spread([w for w in g["wall_s"] if w is not None], digits=1), audit, _kb(g["bytes_up_per_user_round"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if refs:
        lines += ["", "| reference | test NDCG@10 |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in refs.items()]
    lines += [""] + [f"Not a reference: {n}." for n in notes] if notes else []
    lines += ["", "Skipped:", ""] + [f"- {s}" for s in skipped] if skipped else []
    if not private:
        lines += ["", "No run here is private (ε = none)."]
    law = population_law(runs)
    if law:
        lines += _law_lines(law)
        for method in dict.fromkeys(r["method"] for r in law):
            name = "gain_kept_vs_users.png" if method == law[0]["method"] else f"gain_kept_vs_users_{len(made)}.png"
            made[f"Share of the non-private gain kept against N ({method})"] = figures.gain_kept_vs_users(
                [r for r in law if r["method"] == method and r["epsilon"] != "none"], out / name, last_round=True)
    for title, path in made.items():
        lines += ["", f"## {title}", "", f"![{title}]({path.name})"]
    (out / "report.json").write_text(json.dumps({"groups": groups, "references": refs, "not_references": notes,
                                                 "population_law": law,
                                                 "skipped": skipped, "provenance": provenance()}, indent=2) + "\n")  # fmt: skip
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fedrec.report", description="runs and sweeps → report.md with PNG figures")
    ap.add_argument("dirs", nargs="+", type=Path, help="results directories, or folders holding them (searched)")
    ap.add_argument("--out", type=Path, help="where report.md and the figures go (default: the first DIR)")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.dirs, args.out or args.dirs[0])
    except ValueError as e:
        print(f"fedrec.report: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
