"""What does ε cost? Runs one config at several target ε (and without DP), for each value of
one varied key (the item adapter, by default).

    .venv/bin/python experiments/sweep_privacy.py --config experiments/beauty-dp.toml \\
        --epsilons none,8,4,2,1 --vary "item-adapter=none+lora-train=both,rows,features,lowrank,table" \\
        --ceilings results/beauty-ceilings/summary.json

Every run is a whole fedrec run with its own results directory (what
`python -m fedrec.simulate` would write for the same config); the runs share one Flower
simulation (`fedrec.simulate.run_many`: Ray and the workers start once), or with
`--separate` each runs in its own `python -m fedrec.simulate` process. The ε = none runs
keep the config's sampling and clipping and drop only the noise. The table is the one
`python -m fedrec.simulate --sweep` ends with (`fedrec.report.write_sweep_table`: printed,
OUT/sweep.md, rows in OUT/sweep.json), followed by the share of each value's non-private
gain over the base that each ε keeps (OUT/gain_kept.md), and `python -m fedrec.report`'s
report.md with its figures in OUT (test NDCG@10 against ε in OUT/ndcg_vs_epsilon.png, with the
base and, from a `mode=centralized` summary (`--ceilings`), the ceilings as horizontal lines).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.config import merge_run_config  # noqa: E402

DEFAULT_CLIP = 0.5  # the synthetic default's clip in experiments/README.md#synthetic-dp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path)
    ap.add_argument("--epsilons", default="none,8,4,1")
    ap.add_argument("--vary", default="item-adapter=none",
                    help="KEY=v1,v2,...: one line of the plot per value; a value may carry its own settings, "
                         "e.g. none+lora-train=both")  # fmt: skip
    ap.add_argument("--run-config", default="", help="applied to every run")
    ap.add_argument("--dp", default="sampling=poisson", help="added to the runs with a target ε")
    ap.add_argument("--ceilings", type=Path, help="summary.json of a mode=centralized run, drawn as horizontal lines")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "sweep-privacy")
    ap.add_argument("--separate", action="store_true", help="one `python -m fedrec.simulate` process per run")
    ap.add_argument("--label-settings", action="store_true",
                    help="name each value with its own settings (affine+sampling=all), for values that differ only there")
    ap.add_argument("--keep-done", action="store_true",
                    help="read the runs whose directory already holds a summary.json instead of running them again "
                         "(a sweep cut short goes on where it stopped)")
    args = ap.parse_args()
    key, _, values = args.vary.partition("=")
    if not values:
        ap.error("--vary: expected KEY=v1,v2,...")
    from fedrec.config import ConfigError
    from fedrec.simulate import build_config

    try:
        clip = build_config((["--config", str(args.config)] if args.config else []) + ["--run-config", args.run_config])
    except ConfigError as e:
        print(f"sweep_privacy: config error: {e}", file=sys.stderr)
        return 2
    if clip.clipping_norm == 0:  # DP needs a per-user bound; the runs without noise clip the same, for a fair row
        args.run_config = merge_run_config(args.run_config, f"clipping-norm={DEFAULT_CLIP}")
        print(f"sweep_privacy: the config clips no update; every run clips at C = {DEFAULT_CLIP} "
              "(give clipping-norm in --run-config to choose)", flush=True)  # fmt: skip
    runs = []
    for spec in values.split(","):
        value, *own = spec.split("+")
        label = spec if own and args.label_settings else value  # e.g. affine+sampling=all apart from affine+sampling=poisson
        for eps in args.epsilons.split(","):
            # ε = none: the config's sampling and clipping, without noise
            dp = "target-epsilon=none noise-multiplier=0" if eps == "none" else f"{args.dp} target-epsilon={eps}"
            argv = ["--output-dir", str(args.out / f"{key}={label}" / f"eps{eps}"), "--overwrite",  # fresh results
                    "--run-config", merge_run_config(args.run_config, f"{key}={value}", " ".join(own), dp)]  # fmt: skip
            runs.append((label, eps, (["--config", str(args.config)] if args.config else []) + argv))

    def out_of(argv: list[str]) -> Path:
        return Path(argv[argv.index("--output-dir") + 1])

    done = {i for i, (_v, _e, argv) in enumerate(runs) if args.keep_done and (out_of(argv) / "summary.json").exists()}
    todo = [run for i, run in enumerate(runs) if i not in done]
    if done:
        print(f"--keep-done: {len(done)} of {len(runs)} runs read from their summary.json", flush=True)
    started = time.time()
    if args.separate:
        for value, eps, argv in todo:
            print(f"== {key}={value} eps{eps}", flush=True)
            subprocess.run([sys.executable, "-m", "fedrec.simulate", *argv], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    elif todo:
        from fedrec.simulate import build_config, run_many

        run_many([build_config(argv) for _v, _e, argv in todo])
    summaries = [json.loads((out_of(argv) / "summary.json").read_text()) for _v, _e, argv in runs]
    total = time.time() - started
    from fedrec.report import write_sweep_table

    how = "one process per run" if args.separate else "one shared simulation"
    footer = f"wall s: each run's ServerApp, start-up excluded; the whole sweep ({how}) took {total:.1f} s"
    footer += f" for the {len(todo)} runs it ran ({len(done)} read from an earlier sweep)." if done else "."
    rows = write_sweep_table([{key: v, "target-epsilon": e} for v, e, _argv in runs], summaries, args.out, footer)
    print(gain_kept(rows, key, args.out / "gain_kept.md"))
    # The figures and report.md: fedrec's report over the sweep (and the ceilings' run, whose lines it draws).
    from fedrec.report import write_report

    print(f"report: {write_report([args.out] + ([args.ceilings.parent] if args.ceilings else []), args.out)}")
    return 0


def gain_kept(rows: list[dict], key: str, path: Path) -> str:
    """Share of each value's non-private gain over the base kept at each ε, as a table.
    Rows of one value and ε from several runs (seeds, each with its own split and base) are
    taken per run against that run's base and averaged."""
    epsilons = [e for e in dict.fromkeys(r["target-epsilon"] for r in rows) if e != "none"]
    lines = [f"| {key} | non-private gain | " + " | ".join(f"kept at ε = {e}" for e in epsilons) + " |",
             "|---|---:|" + "---:|" * len(epsilons)]  # fmt: skip
    for value in dict.fromkeys(r[key] for r in rows):
        gains: dict[str, list[float]] = {}
        for r in rows:
            if r[key] == value:
                gains.setdefault(r["target-epsilon"], []).append(r["test_ndcg10"] - r["base_ndcg10"])
        if "none" not in gains:
            continue
        gain = sum(gains["none"]) / len(gains["none"])

        def kept(e: str) -> str:
            if e not in gains or gain <= 0:
                return "–"
            seeds = f" (n={len(gains[e])})" if len(gains[e]) > 1 else ""
            return f"{sum(gains[e]) / len(gains[e]) / gain:.0%}{seeds}"

        lines.append(f"| {value} | {gain:+.4f} | " + " | ".join(kept(e) for e in epsilons) + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


if __name__ == "__main__":
    from fedrec.interrupt import guarded

    sys.exit(guarded(main))  # Ctrl-C stops the sweep cleanly (fedrec.interrupt)
