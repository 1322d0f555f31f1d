"""What does ε cost? Runs one config at several target ε (and no DP), for each lora-train.

    .venv/bin/python experiments/sweep_privacy.py --config experiments/beauty.toml \\
        --epsilons none,8,4,1 --lora-train both,b-only --run-config "clipping-norm=0.5"

Every run is a whole fedrec run with its own results directory (what
`python -m fedrec.simulate` would write for the same config); the runs share one Flower
simulation (`fedrec.simulate.run_many`: Ray and the workers start once), or with
`--separate` each runs in its own `python -m fedrec.simulate` process. The table is the
one `python -m fedrec.simulate --sweep` ends with (`fedrec.report.write_sweep_table`:
printed, OUT/sweep.md, rows in OUT/sweep.json), and test NDCG@10 against ε is plotted to
OUT/ndcg_vs_epsilon.png.
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path)
    ap.add_argument("--epsilons", default="none,8,4,1")
    ap.add_argument("--lora-train", default="both,b-only")
    ap.add_argument("--run-config", default="", help="applied to every run (set clipping-norm here)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "sweep-privacy")
    ap.add_argument("--separate", action="store_true", help="one `python -m fedrec.simulate` process per run")
    args = ap.parse_args()
    runs = []
    for train in args.lora_train.split(","):
        for eps in args.epsilons.split(","):
            dp = "" if eps == "none" else f"sampling=poisson target-epsilon={eps}"
            argv = ["--output-dir", str(args.out / f"{train}-eps{eps}"),
                    "--run-config", f"{args.run_config} lora-train={train} {dp}"]  # fmt: skip
            runs.append((train, eps, (["--config", str(args.config)] if args.config else []) + argv))
    started = time.time()
    if args.separate:
        for train, eps, argv in runs:
            print(f"== {train}-eps{eps}", flush=True)
            subprocess.run([sys.executable, "-m", "fedrec.simulate", *argv], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        summaries = [json.loads((args.out / f"{t}-eps{e}" / "summary.json").read_text()) for t, e, _argv in runs]
    else:
        from fedrec.simulate import build_config, run_many

        summaries = run_many([build_config(argv) for _t, _e, argv in runs])
    total = time.time() - started
    from fedrec.report import write_sweep_table

    how = "one process per run" if args.separate else "one shared simulation"
    footer = f"wall s: each run's ServerApp, start-up excluded; the whole sweep ({how}) took {total:.1f} s."
    rows = write_sweep_table([{"lora-train": t, "target-epsilon": e} for t, e, _argv in runs], summaries, args.out, footer)
    print(f"plot: {plot(rows, args.out / 'ndcg_vs_epsilon.png')}")
    return 0


def plot(rows: list[dict], path: Path) -> Path:
    """Test NDCG@10 against target ε, one line per lora-train; no-DP runs and the base as
    horizontal lines (ε on a log axis: the question is usually 1 vs 4 vs 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, train in enumerate(dict.fromkeys(r["lora-train"] for r in rows)):
        color = f"C{i}"
        mine = [r for r in rows if r["lora-train"] == train]
        dp = sorted((float(r["target-epsilon"]), r["test_ndcg10"]) for r in mine if r["target-epsilon"] != "none")
        if dp:
            ax.plot([e for e, _ in dp], [v for _, v in dp], marker="o", color=color, label=f"{train}, DP")
        for r in mine:
            if r["target-epsilon"] == "none":
                ax.axhline(r["test_ndcg10"], color=color, linestyle=":", label=f"{train}, no DP")
    ax.axhline(rows[0]["base_ndcg10"], color="gray", linestyle="--", label="base model")
    ax.set_xscale("log")
    targets = sorted({float(r["target-epsilon"]) for r in rows if r["target-epsilon"] != "none"})
    ax.set_xticks(targets, [f"{e:g}" for e in targets])
    ax.minorticks_off()
    ax.set_xlabel("target ε (δ = 1/N)")
    ax.set_ylabel("test NDCG@10 (best validated round)")
    ax.set_title("What ε costs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
