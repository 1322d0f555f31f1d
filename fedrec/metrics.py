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


def metric_sums(ranks: np.ndarray | torch.Tensor, ks: tuple[int, ...] = KS, prefix: str = "") -> dict[str, float]:
    """Sums (not means) of HR@K and NDCG@K, so shards from many clients can be added."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {} if prefix else {"count": float(len(r))}
    for k in ks:
        hit = r < k
        out[f"{prefix}hr@{k}"] = float(hit.sum())
        out[f"{prefix}ndcg@{k}"] = float((hit / np.log2(r + 2.0)).sum())
    return out


SAMPLED_PREFIX = "sampled100-"
NUM_SAMPLED_NEGATIVES = 100


def sample_negatives(user: int, history: np.ndarray, target: int, num_items: int, n: int = NUM_SAMPLED_NEGATIVES) -> np.ndarray:
    """`n` distinct items the user never interacted with, seeded by user id.

    For the sampled-negatives protocol of older papers (e.g. SASRec's 100 negatives),
    reported beside full ranking only for comparison: it overstates accuracy and can
    reorder models (Krichene & Rendle, KDD 2020).
    """
    rng = np.random.default_rng([user, 0x100])
    seen = set(history.tolist()) | {target}
    n = min(n, num_items - len(seen))
    out: list[int] = []
    taken: set[int] = set()
    while len(out) < n:
        for item in rng.integers(1, num_items + 1, size=2 * n).tolist():
            if item not in seen and item not in taken:
                taken.add(item)
                out.append(item)
                if len(out) == n:
                    break
    return np.asarray(out, dtype=np.int64)


def metric_means(sums: dict[str, float]) -> dict[str, float]:
    n = sums.get("count", 0.0)
    if n <= 0:
        return {}
    return {k: v / n for k, v in sums.items() if k != "count"} | {"users": int(n)}


def add_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in set(a) | set(b)}
