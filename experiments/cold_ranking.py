"""How finished runs with `cold-items` rank cold items: among all items, and among the
cold items alone.

A cold item's score is only as good as its representation. An ID model has none (its row
is the untrained init), so how high it ranks cold items depends on how the warm items'
scores move, not on which cold item fits. Ranking the cold target among the cold items
alone removes that: chance there is HR@10 = 10 / (cold items); a representation that
carries the item's content beats it. The share of a warm-target user's top 10 taken by
cold items shows where the run places cold items against warm ones.

    .venv/bin/python experiments/cold_ranking.py RESULTS_DIR...

Reads each run's `config.toml`, the cached base model and `adapter.safetensors`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fedrec.config import FedRecConfig
from fedrec.metrics import target_ranks
from fedrec.model.lora import adapter_state, load_adapter_state
from fedrec.train.batches import pad_left
from fedrec.workload import load_workload

K = 10


@torch.no_grad()
def _scores(model, data, users: list[int], max_seq_len: int) -> torch.Tensor:
    """Test scores over all items under `rank_users`' full-sort protocol: the user's seen
    items leave the ranking (-inf), their target always stays in."""
    out = []
    for s in range(0, len(users), 256):
        chunk = users[s : s + 256]
        hists = [data.history(u, "test") for u in chunk]
        targets = torch.as_tensor([data.target(u, "test") for u in chunk]) - 1
        scores = model.item_scores(model(pad_left(hists, max_seq_len))[:, -1]).float()
        kept = scores.gather(1, targets[:, None])
        for row, h in enumerate(hists):
            scores[row, torch.as_tensor(h - 1)] = float("-inf")
        out.append(scores.scatter_(1, targets[:, None], kept))
    return torch.cat(out)


def cold_report(model, data, max_seq_len: int, warm_sample: int = 2000, seed: int = 0) -> dict[str, float]:
    model.eval()
    cold = torch.as_tensor(data.cold) - 1
    users = [int(u) for u in data.cold_target_users(data.private)]
    targets = torch.as_tensor([data.target(u, "test") for u in users])
    scores = _scores(model, data, users, max_seq_len)
    rank_all = target_ranks(scores, targets)  # as the run's own evaluation ranks them
    rank_cold = (scores[:, cold] > scores.gather(1, targets[:, None] - 1)).sum(1)
    warm = np.setdiff1d(data.private, users)
    warm = np.random.default_rng(seed).choice(warm, min(warm_sample, len(warm)), replace=False)
    top = _scores(model, data, [int(u) for u in warm], max_seq_len).topk(K, dim=1).indices
    is_cold = torch.zeros(data.num_items, dtype=torch.bool)
    is_cold[cold] = True
    return {"cold_users": len(users), "cold_items": len(cold),
            "hr10_all_items": float((rank_all < K).float().mean()),
            "hr10_among_cold": float((rank_cold < K).float().mean()),
            "chance_among_cold": K / len(cold),
            "cold_share_of_warm_top10": float(is_cold[top].float().mean()),
            "cold_share_of_catalogue": len(cold) / data.num_items}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | model | cold-target users | HR@10 over all items | HR@10 among cold items (chance) "
          "| cold items in warm users' top 10 (catalogue share) |")
    print("|---|---|---:|---:|---:|---:|")
    for run in args.runs:
        cfg = FedRecConfig.from_toml(str(run / "config.toml"), FedRecConfig())
        if not cfg.cold_items:
            sys.exit(f"{run}: the run has no cold items (cold-items=0)")
        work = load_workload(cfg)
        model = work.model()
        base = adapter_state(model)
        for label, state in (("base", base), ("federated", load_file(str(run / "adapter.safetensors")))):
            load_adapter_state(model, state)
            r = cold_report(model, work.data, cfg.max_seq_len, seed=cfg.seed)
            print(f"| {run.name} ({cfg.item_encoder}, {cfg.item_kind}) | {label} | {r['cold_users']:,} | "
                  f"{r['hr10_all_items']:.4f} | {r['hr10_among_cold']:.4f} ({r['chance_among_cold']:.4f}) | "
                  f"{r['cold_share_of_warm_top10']:.3f} ({r['cold_share_of_catalogue']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
