"""How many users does ε need? The population law, on Beauty-like and on synthetic users.

    # the teacher (once): Beauty's scratch ceiling
    .venv/bin/python -m fedrec.teacher --config experiments/beauty-dp.toml --out teachers/beauty.pt
    # calibration: the teacher's population against real Beauty at the real N (17,890 private users)
    .venv/bin/python experiments/population_law.py calibrate --teacher teachers/beauty.pt --temperatures 1.0
    # the law: N × ε × seeds, one base for every N; then the table and plot by fedrec.report
    .venv/bin/python experiments/population_law.py law --kind teacher --teacher teachers/beauty.pt
    .venv/bin/python experiments/population_law.py law --kind synthetic

The cohort plan: the same expected cohort (Poisson, m users per round) and the same rounds
at every N. A deployment's server and its devices bound the users a round can take, not the
share of the population; with m fixed, a larger N lowers the sampling rate q = m/N, so the
privacy amplification and the noise multiplier a given ε needs fall with N, while the
averaging over m users stays the same. Every N shares one base (the real data's for the
teacher; `public-users` for synthetic) and one set of evaluation users' draws
(`data-seed`); the seeds vary the cohorts, the noise and the adapter's start.

Output in OUT/<kind>: one results directory per run, and report.md with the population
law's table and plot (fedrec.report); calibrate writes OUT/calibration.md.
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

# The plan at every N: Poisson sampling of m users a round, T rounds, the base validated on
# public users (model-selection=public, beauty-dp.toml's), one data seed.
PLAN = ("sampling=poisson mechanism=gaussian cohort-size={m} num-rounds={rounds} eval-every={every} "
        "checkpoint-every=0 bootstrap-samples=500 data-seed=0")  # fmt: skip
# Beauty's private recipe (beauty-dp.toml: projection LoRA on the label-smoothed base); its
# Poisson plan was 1,000 users × 100 rounds at server learning rate 3e-4, here half the
# rounds at twice the rate.
BEAUTY = "server-learning-rate={lr}"
TEACHER = "dataset=teacher teacher-path={teacher} teacher-users={n} teacher-temperature={t} test-users={test}"
# Synthetic users: the default process and catalogue, 120 public users (as the default run has)
# pretraining the one base, stopped by patience alone (scale_population.py's recipe).
SYNTHETIC = ("synthetic-users={total} public-users=120 pretrain-min-epochs=0 clipping-norm=0.5 eval-users=2000 "
             "test-users={test} model-selection=public")  # fmt: skip
BEAUTY_PRIVATE = 17_890  # Beauty's private users under its split (public-fraction 0.2, data-seed 0)
TOLERANCE = 0.25


def _argv(out: Path, run_config: str, config: str | None) -> list[str]:
    return (["--config", config] if config else []) + ["--output-dir", str(out), "--overwrite", "--run-config", run_config]


def _dp(eps: str) -> str:
    return "target-epsilon=0 noise-multiplier=0" if eps == "none" else f"target-epsilon={eps}"


def calibrate(args) -> int:
    from fedrec.simulate import build_config, run_many

    plan = PLAN.format(m=args.cohort, rounds=args.rounds, every=args.eval_every) + " " + BEAUTY.format(lr=args.beauty_lr)
    real = build_config(_argv(args.out / "calibration" / "real", merge_run_config(
        f"{plan} test-users=0 {_dp('none')}", args.run_config), str(ROOT / "experiments" / "beauty-dp.toml")))
    done = (args.out / "calibration" / "real" / "summary.json").exists() and not args.rerun_real
    runs = [] if done else [("real", real)]  # real Beauty once per OUT: every temperature is read against it
    for t in [t for t in args.temperatures.split(",") if not (args.out / "calibration" / f"teacher-t{t}" / "summary.json").exists()]:
        rc = f"{plan} {TEACHER.format(teacher=args.teacher, n=0, t=t, test=0)} {_dp('none')}"
        runs.append((f"teacher τ={t}", build_config(_argv(args.out / "calibration" / f"teacher-t{t}",
                                                           merge_run_config(rc, args.run_config),
                                                           str(ROOT / "experiments" / "beauty-dp.toml")))))  # fmt: skip
    started = time.time()
    if runs:
        run_many([c for _n, c in runs])
        print(f"{len(runs)} runs in {time.time() - started:.0f} s")
    # Every population measured under OUT (runs of earlier calls too, same plan): real first.
    from fedrec.summary import RunSummary

    folders = [args.out / "calibration" / "real"] + sorted((args.out / "calibration").glob("teacher-t*"))
    rows = []
    for folder in folders:
        if not (folder / "summary.json").exists():
            continue
        s = RunSummary.from_dict(json.loads((folder / "summary.json").read_text()))
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        agreed = [r["train"]["snr-agreed"] for r in metrics if "snr-agreed" in r.get("train", {})]
        name = "real Beauty" if folder.name == "real" else f"teacher τ={folder.name.removeprefix('teacher-t')}"
        rows.append({"population": name, "private_users": s.private_users, "base": s.base_test["ndcg@10"],
                     "test": s.test["ndcg@10"], "gain": s.test["ndcg@10"] - s.base_test["ndcg@10"],
                     "gain_ci": s.test_gain_ci.get("ndcg@10"), "agreed": sum(agreed) / len(agreed) if agreed else None,
                     "agreed_first3": sum(agreed[:3]) / 3 if len(agreed) >= 3 else None, "wall_s": s.wall_seconds})  # fmt: skip
    (args.out / "calibration.json").write_text(json.dumps(rows, indent=1))
    text = calibration_table(rows)
    (args.out / "calibration.md").write_text(text)
    print(text)
    return 0


def calibration_table(rows: list[dict]) -> str:
    real = rows[0]
    lines = [f"Non-private, the law's plan; within ±{TOLERANCE:.0%} of real Beauty?", "",
             "| population | private users | base test NDCG@10 | non-private gain [95%, paired] | agreed/C (mean over rounds) |",
             "|---|---:|---|---|---|"]  # fmt: skip

    def cell(value: float | None, ref: float | None, fmt: str) -> str:
        if value is None:
            return "–"
        if ref is None or value is ref:
            return format(value, fmt)
        ratio = value / ref if ref else float("nan")
        return f"{value:{fmt}} (×{ratio:.2f}, {'within' if abs(ratio - 1) <= TOLERANCE else 'outside'})"

    for r in rows:
        ci = f" [{r['gain_ci'][0]:+.4f}, {r['gain_ci'][1]:+.4f}]" if r["gain_ci"] else ""
        lines.append(f"| {r['population']} | {r['private_users']:,} | {cell(r['base'], real['base'], '.4f')} | "
                     f"{cell(r['gain'], real['gain'], '+.4f')}{ci} | {cell(r['agreed'], real['agreed'], '.4f')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def law(args) -> int:
    from fedrec.report import write_report
    from fedrec.simulate import build_config, run_many

    # the smallest first: a study cut short keeps its smallest sizes whole; each larger one
    # grows the cached pool, of which every smaller population is a prefix
    sizes = sorted(int(n) for n in args.users.split(","))
    plan = PLAN.format(m=args.cohort, rounds=args.rounds, every=args.eval_every)
    out = args.out / args.kind
    runs = []
    for n in sizes:
        if args.kind == "teacher":
            data = TEACHER.format(teacher=args.teacher, n=n, t=args.temperature, test=args.test_users)
            data, config = f"{data} {BEAUTY.format(lr=args.beauty_lr)}", str(ROOT / "experiments" / "beauty-dp.toml")
        else:
            data, config = SYNTHETIC.format(total=n + 120, test=args.test_users), None
        for eps in args.epsilons.split(","):
            for seed in ([0] if eps == "none" else [int(s) for s in args.seeds.split(",")]):
                rc = merge_run_config(f"{plan} {data} {_dp(eps)} seed={seed}", args.run_config)
                runs.append((eps, build_config(_argv(out / f"users={n}" / f"eps{eps}" / f"seed={seed}", rc, config))))
    # The cells the question needs first: every size's non-private, ε = 8 and ε = 4 cells, then
    # the rest; a study cut short has the 50% points' cells.
    first = [c for eps, c in runs if eps in ("none", "8", "4")]
    runs = first + [c for eps, c in runs if eps not in ("none", "8", "4")]
    if args.keep_done:
        done = [c for c in runs if (Path(c.output_dir) / "summary.json").exists()]
        print(f"{len(done)} of {len(runs)} runs already done (--keep-done): left as they are")
        runs = [c for c in runs if c not in done]
    started = time.time()
    run_many(runs)
    print(f"{len(runs)} runs in {time.time() - started:.0f} s")
    print(f"report: {write_report([out], out)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("calibrate", "law"))
    ap.add_argument("--kind", choices=("teacher", "synthetic"), default="teacher")
    ap.add_argument("--teacher", default=str(ROOT / "teachers" / "beauty.pt"), help="the teacher file (fedrec.teacher)")
    ap.add_argument("--temperatures", default="1.0", help="calibrate: the teacher temperatures to compare")
    ap.add_argument("--rerun-real", action="store_true", help="calibrate: run real Beauty again even if OUT has it")
    ap.add_argument("--temperature", type=float, default=1.0, help="law: the calibrated temperature")
    ap.add_argument("--users", default=f"{BEAUTY_PRIVATE},56000,180000,560000,1800000", help="private users N")
    ap.add_argument("--epsilons", default="none,8,4,1")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of every DP cell (the non-private cell runs seed 0)")
    ap.add_argument("--cohort", type=int, default=1000, help="expected users per round m, the same at every N")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=10, help="validation on public users every this many rounds")
    ap.add_argument("--beauty-lr", type=float, default=0.0006, help="the teacher runs' server learning rate")
    ap.add_argument("--test-users", type=int, default=BEAUTY_PRIVATE, help="a seeded sample of this many, at every N")
    ap.add_argument("--run-config", default="", help="applied to every run")
    ap.add_argument("--keep-done", action="store_true", help="law: skip runs whose folder has a summary")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "population-law")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return calibrate(args) if args.what == "calibrate" else law(args)


if __name__ == "__main__":
    from fedrec.interrupt import guarded

    sys.exit(guarded(main))  # Ctrl-C stops the study cleanly (fedrec.interrupt)
