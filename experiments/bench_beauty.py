"""Base vs federated vs the centralized ceilings on Amazon Beauty, with timings.

    .venv/bin/python experiments/bench_beauty.py [--json PATH] [--run-config "k=v ..."]

Runs `experiments/beauty.toml` federated (Flower simulation) and centralized, then prints
one table. Skips with a message where ../shared/data is absent.
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
from fedrec.results import interval_text  # noqa: E402
CONFIG = ROOT / "experiments" / "beauty.toml"
DATA = ROOT.parent / "shared" / "data" / "amazon-s3rec" / "Beauty.txt"


def run(mode: str, out: Path, extra: str) -> tuple[dict, float]:
    t0 = time.time()
    cmd = [sys.executable, "-m", "fedrec.simulate", "--config", str(CONFIG), "--output-dir", str(out), "--overwrite",
           "--run-config", merge_run_config(f"mode={mode} data-path={DATA}", extra)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "summary.json").read_text()), time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench-beauty")
    ap.add_argument("--run-config", default="")
    args = ap.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} is absent (the Beauty file lives in ../shared/data)")
        return 0
    fed, fed_s = run("federated", args.out / "federated", args.run_config)
    cen, cen_s = run("centralized", args.out / "centralized", args.run_config)
    rows = [
        ("most popular", cen["most_popular_test"], cen.get("most_popular_test_ci")),
        ("base (public users only)", fed["base_test"], fed.get("base_test_ci")),
        ("federated", fed["test"], fed.get("test_ci")),
        *((f"ceiling: {name}", cen[f"ceiling_{name}_test"], cen.get(f"ceiling_{name}_test_ci"))
          for name in ("scratch", "full", "same") if f"ceiling_{name}_test" in cen),
    ]  # fmt: skip
    print(f"\n{'model':<28} {'HR@10':>7} {'NDCG@10 [95% interval]':>26} {'HR@20':>7} {'NDCG@20':>8}")
    for name, m, ci in rows:
        print(f"{name:<28} {m['hr@10']:7.4f} {interval_text(m['ndcg@10'], (ci or {}).get('ndcg@10')):>26} "
              f"{m['hr@20']:7.4f} {m['ndcg@20']:8.4f}")  # fmt: skip
    same = cen.get("ceiling_same_test")
    if same:
        print(f"federated / same ceiling: {fed['test']['ndcg@10'] / same['ndcg@10']:.0%}")
    print(
        f"\nfederated: {fed['rounds']} rounds, {fed['users_trained']:,} users trained, "
        f"{fed['users_per_second']:.0f} users/s in rounds, {fed_s:.0f} s wall (incl. start-up)"
    )
    print(f"centralized (every ceiling): {cen_s:.0f} s wall")
    if args.json:
        args.json.write_text(json.dumps({"rows": {n: m for n, m, _ci in rows}, "federated_wall_s": fed_s, "centralized_wall_s": cen_s,
                                         "users_per_s": fed["users_per_second"]}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
