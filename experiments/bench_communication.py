"""What each adapter costs on the wire: a sampled user's bytes per round, down and up, and
what a device downloads once (the frozen base and the catalogue), side by side.

    .venv/bin/python experiments/bench_communication.py --config experiments/beauty.toml

Built from the config's own model (the base is pretrained or read from the cache); no
training. The per-user numbers are `fedrec.communication.per_user_round`, which a test
holds equal to the arrays in the real Flower messages (tests/integration/test_simulation.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.communication import per_user_round, state_bytes  # noqa: E402
from fedrec.config import FedRecConfig, parse_run_config  # noqa: E402
from fedrec.workload import describe_adapter, prepare_workload  # noqa: E402

VARIANTS = {
    "LoRA (A and B)": "item-adapter=none lora-train=both",
    "LoRA, B only (FFA)": "item-adapter=none lora-train=b-only",
    "rows": "item-adapter=rows lora-train=none",
    "features": "item-adapter=features lora-train=none",
    "lowrank": "item-adapter=lowrank lora-train=none",
    "table": "item-adapter=table lora-train=none",
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path)
    ap.add_argument("--run-config", default="")
    args = ap.parse_args()
    base = FedRecConfig.from_toml(args.config) if args.config else FedRecConfig()
    base = FedRecConfig.from_mapping(parse_run_config(args.run_config), base)
    print("| adapter | d (sent) | KB down / user·round | KB up / user·round | MB for 1,000 users·rounds |")
    print("|---|---:|---:|---:|---:|")
    once = None
    for name, spec in VARIANTS.items():
        cfg = FedRecConfig.from_mapping(parse_run_config(spec), base)
        work = prepare_workload(cfg, log=lambda _m: None)
        model = work.model()
        info = describe_adapter(cfg, model, work.item_side, log=lambda _m: None)
        pay = per_user_round(info.initial, info.sent)
        print(f"| {name} | {info.dimension:,} | {pay['down'] / 1024:,.1f} | {pay['up'] / 1024:,.1f} | "
              f"{1000 * (pay['down'] + pay['up']) / 2**20:,.1f} |", flush=True)  # fmt: skip
        if once is None:
            shipped = torch.load(work.base_path, map_location="cpu", weights_only=True)
            once = (state_bytes(shipped), sum(len(str(i).encode()) for i in work.data.item_ids))
    print(f"\nonce per device (device placement): base {once[0] / 2**20:,.2f} MB, catalogue {once[1] / 1024:,.1f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
