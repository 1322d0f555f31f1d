"""The fixed item basis A (items × r) of `item-adapter=subspace`, from public information only.

Two sources, chosen by `item-basis`:
- `cooccurrence`: the public users' sequences. Items that follow one another in a public
  user's sequence are linked (symmetric counts of consecutive pairs); A is the top r
  eigenvectors of the degree-normalized link matrix D^-1/2·M·D^-1/2 (a spectral
  embedding: items public users move between get nearby rows). An item no public user
  touched has a zero row: the adapter cannot move it.
- `text`: the items' text embeddings (the frozen sentence encoder of `item-encoder`), centred
  and projected on their top r principal directions: items described alike get nearby
  rows, every item has one.
Each column is scaled to unit norm, so that B's scale does not depend on the catalogue's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

BASES = ("cooccurrence", "text")
AFFINE_GROUPS = ("items", "popularity", "features", "popularity+features")


def cooccurrence_basis(public_sequences: Sequence[np.ndarray], num_items: int, rank: int) -> torch.Tensor:
    """Top-`rank` spectral embedding of consecutive-pair links among public users' items."""
    from scipy import sparse
    from scipy.sparse.linalg import eigsh

    src, dst = [], []
    for seq in public_sequences:
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) > 1:
            src.append(seq[:-1] - 1)
            dst.append(seq[1:] - 1)
    if not src:
        raise ValueError("item-basis=cooccurrence: the public users have no consecutive items")
    a, b = np.concatenate(src), np.concatenate(dst)
    links = sparse.coo_matrix((np.ones(len(a)), (a, b)), shape=(num_items, num_items)).tocsr()
    links = links + links.T
    degree = np.asarray(links.sum(1)).ravel()
    inv = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0)
    norm = sparse.diags(inv) @ links @ sparse.diags(inv)
    k = min(rank, num_items - 2)
    _vals, vecs = eigsh(norm, k=k, which="LA", v0=np.full(num_items, 1.0 / np.sqrt(num_items)))
    return _unit_columns(vecs[:, ::-1].copy())


def text_basis(embeddings: torch.Tensor, rank: int) -> torch.Tensor:
    """The text embeddings on their top-`rank` principal directions."""
    x = embeddings.double() - embeddings.double().mean(0)
    _u, _s, v = torch.linalg.svd(x, full_matrices=False)
    return _unit_columns((x @ v[:rank].T).numpy())


def _unit_columns(a: np.ndarray) -> torch.Tensor:
    a = a * np.sign(a.sum(0, keepdims=True) + 1e-30)  # eigenvectors' signs are arbitrary: fix them
    norms = np.linalg.norm(a, axis=0, keepdims=True)
    return torch.as_tensor(a / np.maximum(norms, 1e-12), dtype=torch.float32)


def popularity_groups(public_sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """One-hot (items × buckets) of how often public users saw each item, in powers of two:
    never, once, 2–3, 4–7, ... Only public data enters."""
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in public_sequences]) if public_sequences else \
        np.zeros(0, dtype=np.int64)  # fmt: skip
    counts = np.bincount(flat, minlength=num_items + 1)[1:]
    bucket = np.floor(np.log2(counts + 1)).astype(np.int64)
    out = np.zeros((num_items, int(bucket.max()) + 1), dtype=np.float32)
    out[np.arange(num_items), bucket] = 1.0
    return out


def feature_groups(indptr: np.ndarray, indices: np.ndarray, num_attrs: int) -> np.ndarray:
    """(items × attributes): each item's public attributes, weighted 1/count (an item
    without any has a zero row)."""
    out = np.zeros((len(indptr) - 1, num_attrs), dtype=np.float32)
    for i in range(len(indptr) - 1):
        own = indices[indptr[i] : indptr[i + 1]]
        if len(own):
            out[i, own] = 1.0 / len(own)
    return out
