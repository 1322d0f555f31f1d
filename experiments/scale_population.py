"""What ε costs as the population grows: synthetic populations of 10k, 100k and 1M users.

    .venv/bin/python experiments/scale_population.py [--users 10000,100000,1000000]
        [--epsilons none,8,4,1] [--q 0.005] [--rounds 20] [--out results/scale-population]

Every population has the same per-user data (the synthetic default's process and its
400-item catalogue), the same sampling rate q of the private users (Poisson, so the
expected cohort is q·N), the same rounds, clipping and recipe, and a base pretrained on
the same number of public users (`pretrain-users`, see RECIPE); validation and test use seeded
samples of the same size (`eval-users`, `test-users`). Only N and ε change. At a fixed q,
rounds and ε the noise multiplier barely moves, while the noise on the mean update falls
as 1/(qN): the share of the non-private gain that a private run keeps should rise with N.

All runs share one Flower simulation (`fedrec.simulate.run_many`). Output in OUT:
- scale.md: per N and ε, test NDCG@10, its gain over the base with the 95% paired
  bootstrap interval, z, and the share of the non-private gain kept;
- gain_kept_vs_users.png: that share against N, one line per ε;
- one results directory per run (OUT/users=N/epsX).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.config import merge_run_config  # noqa: E402
from fedrec.summary import RunSummary  # noqa: E402

# The base: 120 public users (as the default 1,200-user run has), stopped by patience alone
# (pretrain-min-epochs=0), which leaves it on the early plateau: a weak start with a large
# non-private gain, so the share of it each ε keeps is measured precisely.
RECIPE = ("clipping-norm=0.5 sampling=poisson eval-every=5 eval-users=2000 test-users=5000 pretrain-users=120 "
          "pretrain-min-epochs=0 checkpoint-every=0 bootstrap-samples=500")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", default="10000,100000,1000000")
    ap.add_argument("--epsilons", default="none,8,4,1")
    ap.add_argument("--q", type=float, default=0.005, help="sampling rate of the private users, the same at every N")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--run-config", default="", help="applied to every run")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "scale-population")
    ap.add_argument("--table-only", action="store_true", help="redraw the table and plot from OUT/scale.json")
    args = ap.parse_args()
    if args.table_only:
        return report(json.loads((args.out / "scale.json").read_text()), args)
    from fedrec.config import FedRecConfig
    from fedrec.simulate import build_config, run_many

    sizes = [int(n) for n in args.users.split(",")]
    epsilons = args.epsilons.split(",")
    runs = []
    for n in sizes:
        private = n - round(FedRecConfig().public_fraction * n)
        cohort = max(1, round(args.q * private))
        for eps in epsilons:
            dp = "noise-multiplier=0" if eps == "none" else f"target-epsilon={eps}"
            argv = ["--output-dir", str(args.out / f"users={n}" / f"eps{eps}"), "--overwrite", "--run-config",
                    merge_run_config(f"synthetic-users={n} cohort-size={cohort} num-rounds={args.rounds} {RECIPE} {dp}",
                                     args.run_config)]  # fmt: skip
            runs.append((n, eps, build_config(argv)))
    started = time.time()
    summaries = run_many([c for _n, _e, c in runs])
    print(f"{len(runs)} runs in {time.time() - started:.0f} s")
    rows = [row(n, eps, c, s) for (n, eps, c), s in zip(runs, summaries)]
    for r in rows:
        none = next(x for x in rows if x["users"] == r["users"] and x["epsilon"] == "none")
        r["kept"], r["kept_ci"] = kept(r, none)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(rows, indent=1))
    return report(rows, args)


def report(rows: list[dict], args) -> int:
    text = table(rows, args)
    (args.out / "scale.md").write_text(text)
    print(text)
    from fedrec.figures import gain_kept_vs_users

    print(f"figure: {gain_kept_vs_users(rows, args.out / 'gain_kept_vs_users.png')}")
    return 0


def row(n: int, eps: str, cfg, s: RunSummary) -> dict:
    return {"users": n, "epsilon": eps, "private_users": s.private_users, "cohort": cfg.cohort_size,
            "q": s.sampling_rate, "z": s.noise_multiplier, "reported_epsilon": s.epsilon,
            "base": s.base_test["ndcg@10"], "test": s.test["ndcg@10"], "gain_ci": s.test_gain_ci["ndcg@10"],
            "best_round": s.best_round, "test_users": s.test_users, "wall_s": s.wall_seconds}  # fmt: skip


def kept(r: dict, none: dict) -> tuple[float | None, list[float] | None]:
    """Share of the same N's non-private gain that this run keeps; the interval is this run's
    paired gain interval over that gain (the non-private gain taken as exact)."""
    gain = none["test"] - none["base"]
    if gain <= 0:
        return None, None
    return (r["test"] - r["base"]) / gain, [g / gain for g in r["gain_ci"]]


def table(rows: list[dict], args) -> str:
    lines = [f"q = {args.q}, {args.rounds} rounds; test NDCG@10 on a seeded sample of each population's private users",
             "", "| users | cohort | ε | z | base | test | gain [95%] | share of the non-private gain kept [95%] |",
             "|---:|---:|---|---:|---:|---:|---|---|"]  # fmt: skip
    for r in rows:
        k = "–" if r["kept"] is None else f"{r['kept']:.0%} [{r['kept_ci'][0]:.0%}, {r['kept_ci'][1]:.0%}]"
        z = "–" if r["z"] is None else f"{r['z']:.3g}"
        lines.append(f"| {r['users']:,} | {r['cohort']:,} | {r['epsilon']} | {z} | {r['base']:.4f} | "
                     f"{r['test']:.4f} | {r['test'] - r['base']:+.4f} [{r['gain_ci'][0]:+.4f}, {r['gain_ci'][1]:+.4f}] | {k} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from fedrec.interrupt import guarded

    sys.exit(guarded(main))  # Ctrl-C stops the sweep cleanly (fedrec.interrupt)
