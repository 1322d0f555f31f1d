"""What does ε cost? Runs one config at several target ε (and no DP), for each lora-train.

    .venv/bin/python experiments/sweep_privacy.py --config experiments/beauty.toml \\
        --epsilons none,8,4,1 --lora-train both,b-only --run-config "clipping-norm=0.5"

Every run is a whole fedrec run with its own results directory (what
`python -m fedrec.simulate` would write for the same config); the runs share one Flower
simulation (`fedrec.simulate.run_many`: Ray and the workers start once), or with
`--separate` each runs in its own `python -m fedrec.simulate` process. The table
(markdown) is printed and written to OUT/table.md, the rows to OUT/sweep.json, and
test NDCG@10 against ε is plotted to OUT/ndcg_vs_epsilon.png.
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
        walls = []
        for train, eps, argv in runs:
            print(f"== {train}-eps{eps}", flush=True)
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "fedrec.simulate", *argv], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            walls.append(time.time() - t0)
    else:
        from fedrec.simulate import build_config, run_many

        summaries = run_many([build_config(argv) for _t, _e, argv in runs])
        walls = [s["wall_seconds"] for s in summaries]  # each run inside the shared simulation
    total = time.time() - started
    rows = []
    for (train, eps, _argv), wall in zip(runs, walls):
        name = f"{train}-eps{eps}"
        s = json.loads((args.out / name / "summary.json").read_text())
        cfg = (args.out / name / "config.toml").read_text()
        clip = next(line.split("=")[1].strip() for line in cfg.splitlines() if line.startswith("clipping-norm"))
        rows.append({
            "lora-train": train, "target": eps, "epsilon": s["epsilon"], "delta": s["delta"],
            "z": s["noise_multiplier"], "C": float(clip), "q": None if eps == "none" else
            json.loads((args.out / name / "privacy.json").read_text())["rounds"][0]["q"],
            "rounds": s["rounds"], "d": s["adapter_dimension"], "noise_to_signal": s["noise_to_signal"],
            "base_ndcg10": s["base_test"]["ndcg@10"], "test_ndcg10": s["test"]["ndcg@10"],
            "last_round_ndcg10": s["last_round_test"]["ndcg@10"], "best_round": s["best_round"],
            "wall_s": round(wall, 1),
        })  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps({"rows": rows, "total_wall_s": round(total, 1),
                                                     "separate": args.separate}, indent=2))  # fmt: skip
    head = "| lora-train | target ε | ε spent | δ | z | C | q | rounds | d | z·√d/m | test NDCG@10 (best val round) | last round | base | wall s |"
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        f = lambda v, p=3: "–" if v is None else f"{v:.{p}g}"  # noqa: E731
        lines.append(
            f"| {r['lora-train']} | {r['target']} | {f(r['epsilon'])} | {f(r['delta'])} | {f(r['z'])} | {r['C']} | "
            f"{f(r['q'])} | {r['rounds']} | {r['d']} | {f(r['noise_to_signal'])} | {r['test_ndcg10']:.4f} "
            f"(r{r['best_round']}) | {r['last_round_ndcg10']:.4f} | {r['base_ndcg10']:.4f} | {r['wall_s']} |"
        )
    how = "one process per run, start-up included" if args.separate else "inside one shared simulation"
    lines.append(f"\nwall s: each run {how}; the whole sweep took {total:.1f} s.")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
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
        dp = sorted((float(r["target"]), r["test_ndcg10"]) for r in mine if r["target"] != "none")
        if dp:
            ax.plot([e for e, _ in dp], [v for _, v in dp], marker="o", color=color, label=f"{train}, DP")
        for r in mine:
            if r["target"] == "none":
                ax.axhline(r["test_ndcg10"], color=color, linestyle=":", label=f"{train}, no DP")
    ax.axhline(rows[0]["base_ndcg10"], color="gray", linestyle="--", label="base model")
    ax.set_xscale("log")
    targets = sorted({float(r["target"]) for r in rows if r["target"] != "none"})
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
