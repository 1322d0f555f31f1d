"""What an item adapter costs a cohort worker: users trained per second, one core, in-process.

    .venv/bin/python experiments/bench_item_adapters.py [--config experiments/beauty.toml] [--users 256]

For each `item-adapter`, the vectorized engine trains the same users from the same
global adapter (`--repeats` times, best kept), with the config's local epochs, dropout,
clipping and `lora-train` (`none` always trains LoRA: it has nothing else); printed with the adapter's dimension d. Reads Beauty from ../shared/data
(skips with a message where it is absent) unless `--config` names another dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "experiments" / "beauty.toml")
    ap.add_argument("--run-config", default="")
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", default="none,rows,features,lowrank,table")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    from fedrec.config import FedRecConfig, parse_run_config
    from fedrec.model.lora import adapter_parameters, adapter_state
    from fedrec.train.settings import LocalTraining, RoundContext
    from fedrec.train.vectorized import train_users_vectorized
    from fedrec.workload import prepare_workload

    torch.set_num_threads(1)
    base = FedRecConfig.from_mapping(parse_run_config(args.run_config), FedRecConfig.from_toml(args.config))
    if base.data_path and not Path(base.data_path).exists():
        print(f"skipped: {base.data_path} is absent")
        return 0
    results = {}
    for kind in args.kinds.split(","):
        # `none` is projection LoRA alone, so it trains LoRA even where the config freezes it
        cfg = base.replace(item_adapter=kind, **({"lora_train": "both"} if kind == "none" else {}))
        work = prepare_workload(cfg, log=print)
        model = work.model()
        state = adapter_state(model)
        users = [int(u) for u in work.data.private[: args.users]]
        d = sum(p.numel() for p in adapter_parameters(model).values())
        best = float("inf")
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            ctx = RoundContext(round=rep + 1, clipping_norm=cfg.clipping_norm, device=torch.device("cpu"))
            train_users_vectorized(model, state, work.data, users, LocalTraining.from_config(cfg), ctx)
            best = min(best, time.perf_counter() - t0)
        results[kind] = {"d": d, "users_per_s": len(users) / best}
        print(f"{kind:>9}: d = {d:>9,}  {len(users) / best:8.0f} users/s  (one core, {cfg.local_epochs} local steps)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
