"""The synthetic generator as it was before it was vectorized (one user, one step at a time):
the reference `tests/test_data.py` holds the vectorized generator's distribution to."""

from __future__ import annotations

import numpy as np

from fedrec.data.synthetic import (
    _DIRICHLET_CONCENTRATION, _FOLLOW_SUCCESSOR, _NUM_SUCCESSORS, _STAY_IN_CLUSTER, _ZIPF_EXPONENT, _clusters, _rng,
)  # fmt: skip


def reference_sequences(
    num_users: int,
    num_items: int,
    num_clusters: int,
    mean_length: int,
    seed: int,
    min_length: int = 5,
) -> list[np.ndarray]:
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
    return sequences
