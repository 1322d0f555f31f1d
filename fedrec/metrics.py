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


def per_user_values(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> tuple[list[str], np.ndarray]:
    """Each user's HR@K and NDCG@K from their target's rank: (metric names, (users × metrics))."""
    r = np.asarray(ranks, dtype=np.float64)
    names, cols = [], []
    for k in ks:
        hit = r < k
        names += [f"hr@{k}", f"ndcg@{k}"]
        cols += [hit.astype(np.float64), hit / np.log2(r + 2.0)]
    return names, np.stack(cols, axis=1) if len(r) else np.zeros((0, len(names)))


def bootstrap_intervals(
    ranks: np.ndarray, *, baseline: np.ndarray | None = None, samples: int = 1000, seed: int = 0,
    level: float = 0.95, ks: tuple[int, ...] = KS,
) -> dict[str, list[float]]:  # fmt: skip
    """Percentile bootstrap interval of each mean metric over users (resampled with replacement).

    With `baseline` (the same users' ranks under another model, aligned), the interval is
    of the paired difference, mean(model) − mean(baseline): whether a model beats another
    on the same users, which two overlapping marginal intervals cannot say. Written with
    numpy rather than scipy.stats.bootstrap to resample all metrics with one set of draws
    and without a scipy dependency of our own.
    """
    names, values = per_user_values(ranks, ks)
    if baseline is not None:
        values = values - per_user_values(baseline, ks)[1]
    n = len(values)
    if n == 0 or samples <= 0:
        return {}
    rng = np.random.default_rng([seed, 0xB007])
    means = np.empty((samples, values.shape[1]))
    step = max(1, 2_000_000 // n)  # resamples per batch: ~2M drawn indices at a time
    for s in range(0, samples, step):
        idx = rng.integers(0, n, size=(min(step, samples - s), n))
        means[s : s + len(idx)] = values[idx].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail], axis=0)
    return {name: [float(a), float(b)] for name, a, b in zip(names, lo, hi)}


def user_intervals(
    ranks: dict[int, int], baseline: dict[int, int] | None = None, *, samples: int = 1000, seed: int = 0
) -> dict[str, list[float]]:
    """`bootstrap_intervals` over ranks keyed by user (paired with `baseline` on the users both hold)."""
    users = sorted(ranks if baseline is None else set(ranks) & set(baseline))
    own = np.asarray([ranks[u] for u in users], dtype=np.int64)
    base = None if baseline is None else np.asarray([baseline[u] for u in users], dtype=np.int64)
    return bootstrap_intervals(own, baseline=base, samples=samples, seed=seed)
