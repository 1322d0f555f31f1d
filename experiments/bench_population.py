"""Issue-18 benchmark: a million-user population against a 6,000-user one, same cohort.

    .venv/bin/python experiments/bench_population.py [--quick] [--json PATH]

For each population size N (default 6,000 and 1,000,000 users, 50,000 items, the synthetic
generator's default per-user process, mean length 20): the generator's own time in this
process, then two real `python -m fedrec.simulate` runs of cohort 5,000 on 2 workers:
- cold: nothing cached; start-up includes generating the data and pretraining the base
  (on a seeded `pretrain-users` sample of the public users);
- warm: data and base cached, the start-up a rerun or a sweep's later point pays.
Start-up is the wall time from launching the process to round 1. Users/s is the run's own
(`summary.json`: training rounds only, no evaluation), peak memory per worker the largest
peak RSS a worker reported (`worker_peak_rss_mb`; it counts the memory-mapped data pages a
worker touched, which the workers share), and the server's the simulate process's own.
Validation and test use seeded samples of 2,000 users (`eval-users`, `test-users`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_config(users: int, items: int, cohort: int, rounds: int, cache: str) -> str:
    keys = {
        "synthetic-users": users, "synthetic-items": items, "cohort-size": cohort, "num-rounds": rounds,
        "eval-every": 0, "eval-users": 2000, "test-users": 2000, "pretrain-users": 2000, "pretrain-epochs": 3,
        "num-workers": 2, "client-num-cpus": 1, "bootstrap-samples": 200, "checkpoint-every": 0, "cache-dir": cache,
    }  # fmt: skip
    return " ".join(f"{k}={v}" for k, v in keys.items())


def simulate(config: str, out: Path) -> dict:
    """One real run; its start-up measured from the process launch."""
    launched = time.time()
    proc = subprocess.run([sys.executable, "-m", "fedrec.simulate", "--output-dir", str(out), "--run-config", config],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    s = json.loads((out / "summary.json").read_text())
    return {
        "startup_s": round(s["round1_at"] - launched, 1),
        "users_per_s": round(s["users_per_second"], 1),
        "worker_peak_rss_mb": round(s["worker_peak_rss_mb"]),
        "server_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "wall_s": round(time.time() - launched, 1),
        "test_ndcg10": s["test"]["ndcg@10"],
        "base_test_ndcg10": s["base_test"]["ndcg@10"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 and 20,000 users, 2,000 items, cohort 200 (smoke check)")
    ap.add_argument("--users", default="", help="population sizes, e.g. 6000,1000000")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    from fedrec.data.synthetic import generate_synthetic

    sizes = [int(n) for n in args.users.split(",")] if args.users else ([2000, 20000] if args.quick else [6000, 1_000_000])
    items, cohort, rounds = (2000, 200, 2) if args.quick else (50_000, 5000, 3)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fedrec-population-") as tmp:
        for n in sizes:
            t = time.perf_counter()
            generate_synthetic(n, items, 8, 20, 0)
            row = {"generate_s": round(time.perf_counter() - t, 1)}
            config = run_config(n, items, cohort, rounds, str(Path(tmp, "cache")))
            for kind in ("cold", "warm"):
                print(f"N={n:,}: {kind} run, cohort {cohort:,}, {rounds} rounds ...", flush=True)
                row[kind] = simulate(config, Path(tmp, f"{n}-{kind}"))
                print(f"  {row[kind]}", flush=True)
            results[str(n)] = row
    small, large = results[str(sizes[0])], results[str(sizes[-1])]
    ratio = large["warm"]["users_per_s"] / small["warm"]["users_per_s"]
    print(f"\n{'users':>10} {'generate s':>10} {'start-up cold s':>15} {'start-up warm s':>15} {'users/s':>8} "
          f"{'worker MB':>9} {'server MB':>9}")  # fmt: skip
    for n, r in results.items():
        print(f"{int(n):>10,} {r['generate_s']:>10} {r['cold']['startup_s']:>15} {r['warm']['startup_s']:>15} "
              f"{r['warm']['users_per_s']:>8} {max(r['cold']['worker_peak_rss_mb'], r['warm']['worker_peak_rss_mb']):>9} "
              f"{r['warm']['server_peak_rss_mb']:>9}")  # fmt: skip
    print(f"users/s at {sizes[-1]:,} users = {ratio:.2f} x at {sizes[0]:,}")
    if args.json:
        args.json.write_text(json.dumps({"items": items, "cohort": cohort, "rounds": rounds, "results": results,
                                         "users_per_s_ratio": ratio}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
