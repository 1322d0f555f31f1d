"""The canary audit on the synthetic workload: a run without noise, honest runs at ε = 1, 4, 8,
and runs whose mechanism adds half the noise it accounts for (the tests' switch).

    .venv/bin/python experiments/audit_check.py --out results/audit-check

Each row is a whole run in this process (`fedrec.inprocess.run_in_process`: real training,
the real mechanism and accountant) with 1,000 canaries; the table goes to OUT/audit.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fedrec.privacy.mechanism as mechanism  # noqa: E402
from fedrec.config import FedRecConfig, parse_run_config  # noqa: E402
from fedrec.inprocess import run_in_process  # noqa: E402

CASES = [("no noise", 0.0, 1.0)] + [(f"honest ε={e:g}", e, 1.0) for e in (1, 4, 8)] + \
        [(f"half the noise, claims ε={e:g}", e, 0.5) for e in (1, 4)]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "audit-check")
    ap.add_argument("--run-config", default="", help="changes to the audited config, e.g. 'audit-canaries=500'")
    args = ap.parse_args()
    base = FedRecConfig.from_mapping({
        "synthetic-users": 200, "synthetic-items": 60, "synthetic-clusters": 4, "synthetic-mean-length": 12,
        "public-fraction": 0.25, "hidden-size": 32, "num-heads": 2, "num-blocks": 1, "max-seq-len": 20,
        "pretrain-epochs": 5, "bootstrap-samples": 0, "eval-every": 0, "clipping-norm": 1.0,
        "server-optimizer": "sgd", "server-learning-rate": 1.0, "local-epochs": 1, "num-rounds": 20,
        "cohort-size": 150, "sampling": "poisson", "target-delta": 1e-5, "audit-canaries": 1000,
        "output-dir": str(args.out), "cache-dir": str(args.out / "cache"), "overwrite": True,  # re-runnable
    } | parse_run_config(args.run_config))  # fmt: skip
    lines = ["| run | ε claimed | z | q | d | 95% lower bound (ceiling) | guesses right | one-shot estimate | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, eps, factor in CASES:
        mechanism._TEST_NOISE_FACTOR = factor
        t0 = time.time()
        s = run_in_process(base.replace(target_epsilon=eps), args.out / name.replace(" ", "-"), log=lambda _m: None)
        mechanism._TEST_NOISE_FACTOR = 1.0
        a = s.audit
        one_run = json.loads((Path(s.results_dir) / "audit.json").read_text())["one_run"]
        claimed = "–" if s.epsilon is None else f"{s.epsilon:.2f}"
        z = "–" if s.noise_multiplier is None else f"{s.noise_multiplier:.3f}"
        lines.append(f"| {name} | {claimed} | {z} | {a['sampling_rate']:.3f} | {a['dimension']:,} | "
                     f"{a['epsilon_lower_bound']:.2f} ({one_run['ceiling']:.2f}) | {one_run['correct']}/{one_run['guesses']} | "
                     f"{a['epsilon_estimate']:.2f} | {time.time() - t0:.1f} |")  # fmt: skip
        print(lines[-1], flush=True)
    (args.out / "audit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
