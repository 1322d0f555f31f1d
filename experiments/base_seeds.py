"""How much the base model depends on the seed: pretrain the default run's base for each seed
(in a fresh cache) and print where pretraining stopped, the epoch it kept and the base's
private validation NDCG@10, the number a run's round 0 reports.

    .venv/bin/python experiments/base_seeds.py --seeds 0,1,2,3,4
    .venv/bin/python experiments/base_seeds.py --seeds 0,1,2,3,4 --run-config "pretrain-loss-tolerance=0"

Results: experiments/README.md#sturdy-base.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fedrec.cohort import validation_users  # noqa: E402
from fedrec.config import FedRecConfig, parse_run_config  # noqa: E402
from fedrec.metrics import metric_means  # noqa: E402
from fedrec.train.evaluate import evaluate_users  # noqa: E402
from fedrec.workload import prepare_workload  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--run-config", default="", help="changes to the default config, as fedrec.simulate takes them")
    args = parser.parse_args()
    scores = []
    print("| seed | epochs run | epoch kept | base valid NDCG@10 | seconds |")
    print("|---:|---:|---:|---:|---:|")
    for seed in [int(s) for s in args.seeds.split(",")]:
        with tempfile.TemporaryDirectory(prefix="fedrec-base-") as cache:
            cfg = FedRecConfig.from_mapping(parse_run_config(args.run_config) | {"seed": seed, "cache-dir": cache})
            lines: list[str] = []
            t0 = time.time()
            work = prepare_workload(cfg, log=lines.append)
            seconds = time.time() - t0
            users = validation_users(work.data.private, cfg.eval_users, cfg.seed)
            sums = evaluate_users(work.model(), work.data, users, "valid", max_seq_len=cfg.max_seq_len,
                                  device=torch.device("cpu"))  # fmt: skip
        ndcg = metric_means(sums)["ndcg@10"]
        scores.append(ndcg)
        kept, ran = next(map(int, m.groups()) for line in lines if (m := re.search(r"keeping epoch (\d+) \(of (\d+) run\)", line)))
        print(f"| {seed} | {ran} | {kept} | {ndcg:.4f} | {seconds:.0f} |", flush=True)
    print(f"\nbase valid NDCG@10 over {len(scores)} seeds: min {min(scores):.4f}, max {max(scores):.4f}, "
          f"mean {statistics.mean(scores):.4f}" + (f", sd {statistics.stdev(scores):.4f}" if len(scores) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
