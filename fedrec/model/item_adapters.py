"""Item-side adapters: trainable deltas on the tied item table, federated beside LoRA.

On sparse data (Beauty: ~9 items per user) the gain of fine-tuning lives in the item
table, which a frozen base with adapters on its projections cannot reach. Each adapter
here is a delta Δ on the item-embedding table E. The model uses E + Δ for the input
lookups and for the tied output scores alike (peft's `lora.Embedding` changes lookups
only, FLOWER-NOTES.md), every Δ is zero at init, and its tensors travel, are clipped and
are noised together with the LoRA tensors as one update.

| kind | Δ | trained tensors |
|---|---|---|
| lowrank | s·A·B over all items | A (N×r, zero), B (r×d, seeded) |
| rows | R on a fixed set of K rows chosen from public data, 0 elsewhere | R (K×d) |
| table | T on every row | T (N×d) |
| features | mean over an item's public attributes of G[attribute] | G (attributes×d) |
| text | E·V: the items' frozen text embeddings E (items×384) through a delta V on the projection | V (384×d, zero) |
| affine | no table delta: each item's score h·E_i becomes (1 + s_i)·h·E_i + b_i | scale s, bias b (N each, zero) |
| subspace | A·B with A (N×r) fixed from public data, B trained | B (r×d, zero) |

Each kind gives its Δ two ways: `delta()`, the whole table for the one-model path (the
per-user loop, evaluation, centralized training), and `lookup`/`scoring` over per-user
stacks of its tensors for the vectorized engine (fedrec.train.vectorized), where the stacked
tables would not fit in memory for the scores. Tests hold the two paths equal.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedrec.data.item_features import ItemFeatures

KINDS = ("lowrank", "rows", "table", "features", "text", "affine", "subspace")


@dataclass
class ScoringExtra:
    """What an adapter adds to the scores of the kept positions: `z` (rows × k) in one of
    three forms, with L (items × k) such that the extra logits are z·Lᵀ:

    - `cols`: L selects columns `cols` (0-based items): logits[:, cols] += z;
    - `sparse`: L is a shared sparse matrix (`L`, and `LT` its transpose, both CSR), with
      L's rows also as padded (index, weight) pairs for gathering target rows;
    - `per-user`: L is user u's own dense `lstack[u]` (items × k), for the rows of user u
      (`row_user`, nondecreasing);
    - `dense`: L is one shared dense matrix (`L`, items × k);
    - `affine`: no z·Lᵀ: row t of user u's logits l (against the frozen table) becomes
      l ⊙ (1 + s_u) + b_u, with `lstack[u]` = (s_u, b_u) stacked as (items × 2) and `z`
      the hidden rows themselves (their extra gradient is ((p − e)⊙s_u)·E).
    """

    kind: str
    z: torch.Tensor
    cols: torch.Tensor | None = None
    col_pos: torch.Tensor | None = None  # item (0-based) → its position in cols, or -1
    L: torch.Tensor | None = None
    LT: torch.Tensor | None = None
    pad_idx: torch.Tensor | None = None  # (items, m) indices into k (k = padding)
    pad_w: torch.Tensor | None = None
    lstack: torch.Tensor | None = None
    row_user: torch.Tensor | None = None


def _per_user(stack: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Row items[u, t] of user u's own table stack[u]: (U, n) → (U, n, *)."""
    return stack[torch.arange(stack.shape[0], device=items.device)[:, None], items]


class ItemAdapter(nn.Module):
    kind = ""

    def __init__(self, num_items: int, hidden: int) -> None:
        super().__init__()
        self.num_items, self.hidden = num_items, hidden

    def delta(self) -> torch.Tensor | None:
        """Δ over rows 0..N of the table (row 0, padding, stays zero); None: the adapter
        leaves the table alone and changes only the scores (`adjust_scores`)."""
        raise NotImplementedError

    def adjust_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The model's scores over items 1..N (B, N) as this adapter changes them beyond Δ."""
        return scores

    def lookup(self, p: dict[str, torch.Tensor], items: torch.Tensor) -> torch.Tensor | None:
        """Δ[items] with user u's own tensors p[name][u]; items (U, n) 1-based, 0 = padding.
        None where the adapter does not change the lookups."""
        raise NotImplementedError

    def scoring(self, p: dict[str, torch.Tensor], hidden: torch.Tensor, keep: torch.Tensor) -> ScoringExtra:
        """The extra scores h·Δ_uᵀ of the kept positions of hidden (U, n, d)."""
        raise NotImplementedError

    def _pad_row(self, dense: torch.Tensor) -> torch.Tensor:
        return torch.cat([dense.new_zeros(1, dense.shape[-1]), dense])


class LowRankItems(ItemAdapter):
    """Δ = s·A·B (A zero, B seeded): a low-rank image of the whole table's gradient."""

    kind = "lowrank"

    def __init__(self, num_items: int, hidden: int, rank: int, alpha: float) -> None:
        super().__init__(num_items, hidden)
        self.A = nn.Parameter(torch.zeros(num_items, rank))
        self.B = nn.Parameter(torch.randn(rank, hidden) / math.sqrt(hidden))
        self.scale = alpha / rank

    def delta(self) -> torch.Tensor:
        return self._pad_row((self.A @ self.B) * self.scale)

    def lookup(self, p, items):
        a = _per_user(p["A"], (items - 1).clamp(min=0))  # padding reads row 0; the model masks it
        return torch.bmm(a, p["B"]) * self.scale

    def scoring(self, p, hidden, keep):
        z = (torch.bmm(hidden, p["B"].transpose(1, 2)) * self.scale)[keep]
        return ScoringExtra("per-user", z, lstack=p["A"], row_user=keep.nonzero()[:, 0])


class RowItems(ItemAdapter):
    """A dense delta R on K fixed rows (chosen from public data only), zero elsewhere."""

    kind = "rows"

    def __init__(self, num_items: int, hidden: int, rows: np.ndarray) -> None:
        super().__init__(num_items, hidden)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0 or rows.min() < 1 or rows.max() > num_items or len(np.unique(rows)) != len(rows):
            raise ValueError(f"item rows must be distinct ids in 1..{num_items}")
        self.R = nn.Parameter(torch.zeros(len(rows), hidden))
        self.register_buffer("rows", torch.as_tensor(rows), persistent=False)
        pos = torch.full((num_items + 1,), len(rows), dtype=torch.long)  # K: not a trained row
        pos[self.rows] = torch.arange(len(rows))
        self.register_buffer("pos", pos, persistent=False)

    def delta(self) -> torch.Tensor:
        return torch.zeros(self.num_items + 1, self.hidden, device=self.R.device).index_add(0, self.rows, self.R)

    def lookup(self, p, items):
        r = p["R"]
        padded = torch.cat([r, r.new_zeros(r.shape[0], 1, r.shape[2])], dim=1)
        return _per_user(padded, self.pos[items])

    def scoring(self, p, hidden, keep):
        z = torch.bmm(hidden, p["R"].transpose(1, 2))[keep]  # (rows, K)
        col_pos = self.pos[1:].clone()
        col_pos[col_pos == len(self.rows)] = -1
        return ScoringExtra("cols", z, cols=self.rows - 1, col_pos=col_pos)


class TableItems(ItemAdapter):
    """A dense delta T on every row: the reference without privacy, the worst case under DP."""

    kind = "table"

    def __init__(self, num_items: int, hidden: int) -> None:
        super().__init__(num_items, hidden)
        self.T = nn.Parameter(torch.zeros(num_items, hidden))

    def delta(self) -> torch.Tensor:
        return self._pad_row(self.T)

    def lookup(self, p, items):
        return _per_user(p["T"], (items - 1).clamp(min=0))

    def scoring(self, p, hidden, keep):
        return ScoringExtra("per-user", hidden[keep], lstack=p["T"], row_user=keep.nonzero()[:, 0])


class FeatureItems(ItemAdapter):
    """Δ[i] = mean of G[a] over item i's public attributes a; items without any are unchanged.

    Attributes are shared by many items, so a user's update moves every item that shares
    an attribute with what they touched, including items nobody trained on.
    """

    kind = "features"

    def __init__(self, num_items: int, hidden: int, features: ItemFeatures) -> None:
        super().__init__(num_items, hidden)
        if features.num_items != num_items:
            raise ValueError(f"item features cover {features.num_items} items, the model has {num_items}")
        a = features.num_attrs
        self.G = nn.Parameter(torch.zeros(a, hidden))
        counts = np.diff(features.indptr)
        m = max(1, int(counts.max(initial=0)))
        idx = np.full((num_items + 1, m), a, dtype=np.int64)  # a: the zero row of padded G
        w = np.zeros((num_items + 1, m), dtype=np.float32)
        for i in range(num_items):
            own = features.indices[features.indptr[i] : features.indptr[i + 1]]
            idx[i + 1, : len(own)] = own
            w[i + 1, : len(own)] = 1.0 / len(own) if len(own) else 0.0
        self.register_buffer("pad_idx", torch.as_tensor(idx), persistent=False)
        self.register_buffer("pad_w", torch.as_tensor(w), persistent=False)
        rows = np.repeat(np.arange(num_items), counts)
        vals = (1.0 / np.maximum(counts, 1))[rows].astype(np.float32)
        self._coo = (torch.as_tensor(np.stack([rows, features.indices])), torch.as_tensor(vals), (num_items, a))
        self._sparse: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _matrices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """F (items × attributes, mean weights) and Fᵀ, CSR, built once per device."""
        key = str(device)
        if key not in self._sparse:
            ij, v, shape = self._coo
            f = torch.sparse_coo_tensor(ij, v, shape, check_invariants=True).coalesce()
            with warnings.catch_warnings():  # "sparse CSR support is in beta": its mm is what we use
                warnings.simplefilter("ignore", UserWarning)
                self._sparse[key] = (f.to_sparse_csr().to(device), f.t().coalesce().to_sparse_csr().to(device))
        return self._sparse[key]

    def delta(self) -> torch.Tensor:
        f, _ = self._matrices(self.G.device)
        return self._pad_row(torch.sparse.mm(f, self.G))

    def lookup(self, p, items):
        g = p["G"]
        padded = torch.cat([g, g.new_zeros(g.shape[0], 1, g.shape[2])], dim=1)
        u = torch.arange(g.shape[0], device=items.device)[:, None, None]
        picked = padded[u, self.pad_idx[items]]  # (U, n, m, d)
        return (picked * self.pad_w[items].unsqueeze(-1)).sum(2)

    def scoring(self, p, hidden, keep):
        f, ft = self._matrices(hidden.device)
        z = torch.bmm(hidden, p["G"].transpose(1, 2))[keep]  # (rows, attributes)
        return ScoringExtra("sparse", z, L=f, LT=ft, pad_idx=self.pad_idx[1:], pad_w=self.pad_w[1:])


class TextItems(ItemAdapter):
    """Δ = E·V: every item's frozen text embedding (a row of E) through a trained map V.

    The base's item table already holds E·P (the projection P learned in pretraining,
    baked in); V is the federated change of that projection, zero at init. V is shared by
    all items, so a user's update moves every item by its text, items nobody trained on
    (cold items) included, and d stays 384×hidden whatever the catalogue's size.
    """

    kind = "text"

    def __init__(self, num_items: int, hidden: int, text: torch.Tensor, init_std: float = 0.0) -> None:
        super().__init__(num_items, hidden)
        if text.shape[0] != num_items:
            raise ValueError(f"text embeddings cover {text.shape[0]} items, the model has {num_items}")
        self.V = nn.Parameter(torch.randn(text.shape[1], hidden) * init_std)
        self.register_buffer("E", text.to(torch.float32).contiguous(), persistent=False)
        self.register_buffer("E_pad", torch.cat([text.new_zeros(1, text.shape[1]), text]).float(), persistent=False)

    def delta(self) -> torch.Tensor:
        return self._pad_row(self.E @ self.V)

    def lookup(self, p, items):
        return torch.bmm(self.E_pad[items], p["V"])

    def scoring(self, p, hidden, keep):
        z = torch.bmm(hidden, p["V"].transpose(1, 2))[keep]  # (rows, 384)
        return ScoringExtra("dense", z, L=self.E)


class AffineScores(ItemAdapter):
    """Each item's score h·E_i becomes (1 + s_i)·h·E_i + b_i: a per-item scale and bias.

    Why: on a sparse catalogue most of what private users can teach a frozen base, and
    agree on, is how sharply the base scores an item (s_i: the base is over-confident on
    users it never saw) and how popular the item is among them (b_i). With `groups`
    (items × K, fixed from public data, `fedrec.data.item_basis`), s = groups·σ and
    b = groups·β: items of a group (e.g. as often seen by public users) move together,
    and only 2K numbers are trained, clipped, noised and sent instead of 2N. The lookups
    keep the base's rows; σ and β start at zero, so the untrained adapter is the base.
    """

    kind = "affine"

    def __init__(self, num_items: int, hidden: int, groups: torch.Tensor | None = None) -> None:
        super().__init__(num_items, hidden)
        k = num_items if groups is None else groups.shape[1]
        if groups is not None and groups.shape[0] != num_items:
            raise ValueError(f"affine groups cover {groups.shape[0]} items, the model has {num_items}")
        self.scale = nn.Parameter(torch.zeros(k))
        self.bias = nn.Parameter(torch.zeros(k))
        self._dense = None if groups is None else groups.to(torch.float32)
        self._sparse: dict[str, torch.Tensor] = {}

    def per_item(self, v: torch.Tensor) -> torch.Tensor:
        """(…, K) group values → (…, N) item values (identity without groups)."""
        if self._dense is None:
            return v
        key = str(v.device)
        if key not in self._sparse:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": its mm is what we use
                warnings.simplefilter("ignore", UserWarning)
                self._sparse[key] = self._dense.to_sparse_csr().to(v.device)
        flat = v.reshape(-1, v.shape[-1])
        return torch.sparse.mm(self._sparse[key], flat.T).T.reshape(*v.shape[:-1], self.num_items)

    def delta(self) -> None:
        return None

    def adjust_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores * (1 + self.per_item(self.scale)) + self.per_item(self.bias)

    def lookup(self, p, items):
        return None

    def scoring(self, p, hidden, keep):
        stack = torch.stack([self.per_item(p["scale"]), self.per_item(p["bias"])], -1)  # (U, N, 2)
        return ScoringExtra("affine", hidden[keep], lstack=stack, row_user=keep.nonzero()[:, 0])


class SubspaceItems(ItemAdapter):
    """Δ = A·B: A (items × r) fixed from public information, only B (r × d) trained.

    Every item moves within the span of A's columns: items that A places alike move alike,
    so a user's update spreads over items they never touched, and only r·d numbers are
    clipped, noised and sent (the public-subspace projection of Yu et al., ICLR 2021, and
    Zhou et al., ICLR 2021, applied to the item table). A is built by
    `fedrec.data.item_basis` from public users and public item data only.
    """

    kind = "subspace"

    def __init__(self, num_items: int, hidden: int, basis: torch.Tensor) -> None:
        super().__init__(num_items, hidden)
        if basis.shape[0] != num_items:
            raise ValueError(f"item basis covers {basis.shape[0]} items, the model has {num_items}")
        self.B = nn.Parameter(torch.zeros(basis.shape[1], hidden))
        self.register_buffer("A", basis.to(torch.float32).contiguous(), persistent=False)
        self.register_buffer("A_pad", torch.cat([basis.new_zeros(1, basis.shape[1]), basis]).float(), persistent=False)

    def delta(self) -> torch.Tensor:
        return self._pad_row(self.A @ self.B)

    def lookup(self, p, items):
        return torch.bmm(self.A_pad[items], p["B"])

    def scoring(self, p, hidden, keep):
        z = torch.bmm(hidden, p["B"].transpose(1, 2))[keep]  # (rows, r)
        return ScoringExtra("dense", z, L=self.A)


def make_item_adapter(
    kind: str, num_items: int, hidden: int, *, rank: int = 8, alpha: float = 16.0,
    rows: np.ndarray | None = None, features: ItemFeatures | None = None, text: torch.Tensor | None = None,
    basis: torch.Tensor | None = None,
) -> ItemAdapter:  # fmt: skip
    if kind == "lowrank":
        return LowRankItems(num_items, hidden, rank, alpha)
    if kind == "rows":
        if rows is None:
            raise ValueError("item-adapter=rows needs the row set (chosen from public data)")
        return RowItems(num_items, hidden, rows)
    if kind == "table":
        return TableItems(num_items, hidden)
    if kind == "features":
        if features is None:
            raise ValueError("item-adapter=features needs item features")
        return FeatureItems(num_items, hidden, features)
    if kind == "text":
        if text is None:
            raise ValueError("item-encoder=text needs the items' text embeddings")
        return TextItems(num_items, hidden, text)
    if kind == "affine":
        return AffineScores(num_items, hidden, basis)
    if kind == "subspace":
        if basis is None:
            raise ValueError("item-adapter=subspace needs the public item basis (fedrec.data.item_basis)")
        return SubspaceItems(num_items, hidden, basis)
    raise ValueError(f"unknown item adapter {kind!r}; choose from {', '.join(KINDS)}")
