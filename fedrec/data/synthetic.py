"""Deterministic synthetic interaction data, the built-in default dataset.

Designed so that the things a sequential recommender exploits are really there, and
most-popular is a weak baseline:
- items belong to clusters and follow a long-tailed (Zipf) popularity inside each;
- each user has a preference over clusters that drifts from an early to a late profile
  over the user's history, and stays in a cluster for a few steps before switching;
- within a cluster, items have a few preferred successors, so the previous item
  predicts the next one (the signal self-attention picks up).
"""

from __future__ import annotations

import numpy as np

from fedrec.data.interactions import Interactions

_STAY_IN_CLUSTER = 0.8
_FOLLOW_SUCCESSOR = 0.6
_NUM_SUCCESSORS = 3
_ZIPF_EXPONENT = 1.1
_DIRICHLET_CONCENTRATION = 0.3


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x5EED])


def _clusters(rng: np.random.Generator, num_items: int, num_clusters: int) -> np.ndarray:
    return rng.permutation(num_items) % min(num_clusters, num_items)


def synthetic_item_clusters(num_items: int, num_clusters: int, seed: int) -> np.ndarray:
    """Each item's cluster (item i+1 → entry i), exactly as `generate_synthetic` draws it:
    the synthetic data's public item metadata (item-adapter=features)."""
    return _clusters(_rng(seed), num_items, num_clusters)


def generate_synthetic(
    num_users: int,
    num_items: int,
    num_clusters: int,
    mean_length: int,
    seed: int,
    min_length: int = 5,
) -> Interactions:
    rng = _rng(seed)
    num_clusters = min(num_clusters, num_items)
    cluster_of = _clusters(rng, num_items, num_clusters)
    members = [np.flatnonzero(cluster_of == c) for c in range(num_clusters)]
    # Zipf popularity inside each cluster, with a random rank order.
    popularity = []
    for m in members:
        ranks = rng.permutation(len(m)) + 1
        w = ranks.astype(float) ** -_ZIPF_EXPONENT
        popularity.append(w / w.sum())
    # Each item's preferred successors, drawn by popularity from its own cluster.
    successors = np.empty((num_items, _NUM_SUCCESSORS), dtype=np.int64)
    for c, m in enumerate(members):
        for item in m:
            successors[item] = rng.choice(m, size=_NUM_SUCCESSORS, p=popularity[c])
    successor_p = np.array([0.6, 0.3, 0.1])

    sequences = []
    for _ in range(num_users):
        length = max(min_length, int(rng.poisson(mean_length)))
        length = min(length, num_items)
        early = rng.dirichlet(np.full(num_clusters, _DIRICHLET_CONCENTRATION))
        late = rng.dirichlet(np.full(num_clusters, _DIRICHLET_CONCENTRATION))
        seen: set[int] = set()
        seq = []
        cluster = int(rng.choice(num_clusters, p=early))
        prev = -1
        for t in range(length):
            if t and rng.random() > _STAY_IN_CLUSTER:
                mix = t / max(1, length - 1)
                pref = (1 - mix) * early + mix * late
                cluster = int(rng.choice(num_clusters, p=pref / pref.sum()))
            item = -1
            if prev >= 0 and cluster_of[prev] == cluster and rng.random() < _FOLLOW_SUCCESSOR:
                cand = int(successors[prev, rng.choice(_NUM_SUCCESSORS, p=successor_p)])
                if cand not in seen:
                    item = cand
            for _attempt in range(20):
                if item >= 0:
                    break
                cand = int(rng.choice(members[cluster], p=popularity[cluster]))
                if cand not in seen:
                    item = cand
            if item < 0:  # cluster exhausted: any unseen item
                unseen = np.setdiff1d(np.arange(num_items), np.fromiter(seen, dtype=np.int64))
                item = int(rng.choice(unseen))
            seen.add(item)
            seq.append(item + 1)
            prev = item
        sequences.append(np.asarray(seq, dtype=np.int64))
    return Interactions(
        sequences=sequences,
        user_ids=[str(u) for u in range(num_users)],
        num_items=num_items,
        source=f"synthetic(users={num_users}, items={num_items}, clusters={num_clusters}, seed={seed})",
    )
