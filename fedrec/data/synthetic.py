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
from fedrec.data.ragged import IndexIds, Ragged

# Bumped when the same config draws other sequences (2: users drawn together, vectorized),
# so that no cached dataset or base model of an older draw is reused.
GENERATOR_VERSION = 2
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


def catalogue(rng: np.random.Generator, num_items: int, num_clusters: int):
    """The items' side of the process: each item's cluster, each cluster's members and
    Zipf popularity (a random rank order), and each item's preferred successors, drawn by
    popularity from its own cluster."""
    num_clusters = min(num_clusters, num_items)
    cluster_of = _clusters(rng, num_items, num_clusters)
    members = [np.flatnonzero(cluster_of == c) for c in range(num_clusters)]
    popularity = []
    for m in members:
        ranks = rng.permutation(len(m)) + 1
        w = ranks.astype(float) ** -_ZIPF_EXPONENT
        popularity.append(w / w.sum())
    successors = np.empty((num_items, _NUM_SUCCESSORS), dtype=np.int64)
    for c, m in enumerate(members):
        successors[m] = rng.choice(m, size=(len(m), _NUM_SUCCESSORS), p=popularity[c])
    return cluster_of, members, popularity, successors


def generate_synthetic(
    num_users: int,
    num_items: int,
    num_clusters: int,
    mean_length: int,
    seed: int,
    min_length: int = 5,
    stream: int | None = None,
) -> Interactions:
    """`num_users` sequences drawn by the process in the module docstring.

    With `stream`, the users come from their own generator, seeded by (seed, stream), over
    the same catalogue: two streams are two independent populations of one process (the
    public and the private users of `public-users`, fedrec.workload).

    Users are drawn together, one time step at a time over blocks of users, with numpy:
    a Python loop per user and step took minutes at a million users
    (experiments/README.md#populations); the per-user distribution is unchanged
    (tests/test_data.py compares it with a per-user reference).
    """
    rng = _rng(seed)
    cluster_of, members, popularity, successors = catalogue(rng, num_items, num_clusters)
    if stream is not None:
        rng = np.random.default_rng([seed, 0x5EED, stream])
    num_clusters = len(members)
    picker = _ClusterPicker(members, popularity)

    lengths = np.minimum(np.maximum(min_length, rng.poisson(mean_length, num_users)), num_items)
    ends = np.cumsum(lengths, dtype=np.int64)
    flat = np.empty(int(ends[-1]) if num_users else 0, dtype=np.int32)
    for lo in range(0, num_users, _BLOCK):
        hi = min(num_users, lo + _BLOCK)
        block = _draw_block(rng, lengths[lo:hi], num_items, num_clusters, cluster_of, successors, picker)
        start = int(ends[lo - 1]) if lo else 0
        flat[start : int(ends[hi - 1])] = block[np.arange(block.shape[1]) < lengths[lo:hi, None]] + 1
    return Interactions(
        sequences=Ragged.from_ends(flat, ends),
        user_ids=IndexIds(num_users),
        num_items=num_items,
        source=f"synthetic(users={num_users}, items={num_items}, clusters={num_clusters}, seed={seed})",
    )


_BLOCK = 65536  # users drawn together: bounds the (users × length) working arrays
_SUCCESSOR_P = np.array([0.6, 0.3, 0.1])
_ATTEMPTS = 20


class _ClusterPicker:
    """Draws an item from each user's cluster by the cluster's popularity, for many users
    at once: all clusters' CDFs laid end to end, cluster c's shifted by c, so one
    searchsorted serves every cluster."""

    def __init__(self, members: list[np.ndarray], popularity: list[np.ndarray]) -> None:
        self.items = np.concatenate(members)
        self.cdf = np.concatenate([c + np.cumsum(p) for c, p in enumerate(popularity)])
        sizes = np.array([len(m) for m in members])
        self.last = np.cumsum(sizes) - 1  # each cluster's last slot, against rounding at its top

    def __call__(self, rng: np.random.Generator, clusters: np.ndarray) -> np.ndarray:
        slot = np.searchsorted(self.cdf, clusters + rng.random(len(clusters)), side="right")
        return self.items[np.minimum(slot, self.last[clusters])]


def _categorical(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One draw per row of `weights` (rows need not sum to 1)."""
    cdf = np.cumsum(weights, axis=1)
    u = rng.random(len(weights)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(axis=1), weights.shape[1] - 1)


def _draw_block(rng, lengths, num_items, num_clusters, cluster_of, successors, picker) -> np.ndarray:
    """Item indices (users × max length, 0-based; beyond a user's length: unused)."""
    n, width = len(lengths), int(lengths.max())
    alpha = np.full(num_clusters, _DIRICHLET_CONCENTRATION)
    early, late = rng.dirichlet(alpha, n), rng.dirichlet(alpha, n)
    seq = np.full((n, width), -1, dtype=np.int32)
    cluster = _categorical(rng, early)
    prev = np.full(n, -1, dtype=np.int64)
    for t in range(width):
        live = np.flatnonzero(t < lengths)
        if t:
            switch = live[rng.random(len(live)) > _STAY_IN_CLUSTER]
            mix = (t / np.maximum(1, lengths[switch] - 1))[:, None]
            cluster[switch] = _categorical(rng, (1 - mix) * early[switch] + mix * late[switch])
        item = np.full(n, -1, dtype=np.int64)
        seen = seq[:, :t]
        p = prev[live]
        follow = live[(p >= 0) & (cluster_of[np.maximum(p, 0)] == cluster[live]) & (rng.random(len(live)) < _FOLLOW_SUCCESSOR)]
        if len(follow):
            cand = successors[prev[follow], rng.choice(_NUM_SUCCESSORS, size=len(follow), p=_SUCCESSOR_P)]
            fresh = ~(seen[follow] == cand[:, None]).any(axis=1)
            item[follow[fresh]] = cand[fresh]
        todo = live[item[live] < 0]
        for _attempt in range(_ATTEMPTS):
            if not len(todo):
                break
            cand = picker(rng, cluster[todo])
            fresh = ~(seen[todo] == cand[:, None]).any(axis=1)
            item[todo[fresh]] = cand[fresh]
            todo = todo[~fresh]
        for u in todo:  # cluster exhausted: any unseen item (rare, so one user at a time)
            unseen = np.setdiff1d(np.arange(num_items), seq[u, :t])
            item[u] = rng.choice(unseen)
        seq[live, t] = item[live]
        prev[live] = item[live]
    return seq
