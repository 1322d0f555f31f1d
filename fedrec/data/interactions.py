"""The in-memory form every loader produces: one chronological item sequence per user."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """Malformed input data; the message names the file and line where known."""


@dataclass
class Interactions:
    """Chronological item sequences, item ids remapped to 1..num_items (0 is padding)."""

    sequences: Sequence[np.ndarray]  # a list, or a Ragged (fedrec.data.ragged) for large populations
    user_ids: Sequence[str]
    num_items: int
    source: str
    dropped_users: int = 0
    notes: list[str] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)  # raw id of item 1..N (the catalogue)
    # generated populations: the first k users are the public ones (fedrec.data.split)
    leading_public: int = 0

    def __post_init__(self) -> None:
        if not self.item_ids:  # ids that are already 1..N
            self.item_ids = [str(i) for i in range(1, self.num_items + 1)]

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        lengths = getattr(self.sequences, "lengths", None)
        return int(lengths.sum()) if lengths is not None else int(sum(len(s) for s in self.sequences))

    def describe(self) -> str:
        text = (
            f"{self.source}: {self.num_users:,} users, {self.num_items:,} items, "
            f"{self.num_interactions:,} interactions"
        )
        if self.dropped_users:
            text += f" ({self.dropped_users:,} users with too few interactions left out)"
        return text


def build_interactions(
    per_user: dict[str, Sequence[object]],
    source: str,
    min_user_interactions: int,
) -> Interactions:
    """Remap raw item ids to 1..N and drop users too short for leave-one-out.

    Raw ids are sorted (numerically when all are integers) so that already-contiguous
    integer ids keep their order and the mapping is independent of file order.
    """
    kept = {u: items for u, items in per_user.items() if len(items) >= min_user_interactions}
    dropped = len(per_user) - len(kept)
    raw_items: set[object] = set()
    for items in kept.values():
        raw_items.update(items)
    if not kept:
        raise DataError(
            f"{source}: no user has at least {min_user_interactions} interactions "
            f"({len(per_user)} users read)"
        )
    ordered = sorted(raw_items, key=_sort_key(raw_items))
    index = {item: i + 1 for i, item in enumerate(ordered)}
    users = sorted(kept, key=_sort_key(kept))
    sequences = [np.fromiter((index[i] for i in kept[u]), dtype=np.int64) for u in users]
    return Interactions(
        sequences=sequences,
        user_ids=[str(u) for u in users],
        num_items=len(ordered),
        source=source,
        dropped_users=dropped,
        item_ids=[str(i) for i in ordered],
    )


def _sort_key(values: Iterable[object]):
    if all(isinstance(v, str) and v.lstrip("-").isdigit() for v in values):
        return lambda v: (int(v),)
    return lambda v: (str(v),)
