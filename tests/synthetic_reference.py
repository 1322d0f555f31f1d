"""The synthetic generator as it was before it was vectorized (one user, one step at a time):
the reference `tests/test_data.py` holds the vectorized generator's distribution to."""

from __future__ import annotations

import numpy as np

from fedrec.data.synthetic import _DIRICHLET_CONCENTRATION, _FOLLOW_SUCCESSOR, _NUM_SUCCESSORS, _STAY_IN_CLUSTER, _rng, catalogue


def reference_sequences(
    num_users: int,
    num_items: int,
    num_clusters: int,
    mean_length: int,
    seed: int,
    min_length: int = 5,
) -> list[np.ndarray]:
    """The same catalogue (`catalogue`), then each user alone, step by step."""
    rng = _rng(seed)
    cluster_of, members, popularity, successors = catalogue(rng, num_items, num_clusters)
    num_clusters = len(members)
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
