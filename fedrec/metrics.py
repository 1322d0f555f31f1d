"""Full-ranking top-K metrics on one held-out item per user."""

from __future__ import annotations

import numpy as np
import torch

KS = (5, 10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among all items (ties count in the target's favour).

    `scores` is (B, N) over items 1..N, `targets` holds 1-based ids, `exclude` is a
    (B, N) bool mask of items to drop from the ranking (the user's history); the target
    itself is never excluded.
    """
    idx = (targets - 1).unsqueeze(1)
    target_score = scores.gather(1, idx)
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    return (scores > target_score).sum(dim=1)


def metric_sums(ranks: np.ndarray | torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Sums (not means) of HR@K and NDCG@K, so shards from many clients can be added."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {"count": float(len(r))}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(hit.sum())
        out[f"ndcg@{k}"] = float((hit / np.log2(r + 2.0)).sum())
    return out


def metric_means(sums: dict[str, float]) -> dict[str, float]:
    n = sums.get("count", 0.0)
    if n <= 0:
        return {}
    return {k: v / n for k, v in sums.items() if k != "count"} | {"users": int(n)}


def add_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in set(a) | set(b)}
