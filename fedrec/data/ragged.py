"""Many short sequences in one flat array: the form a million-user population fits in.

A Python list of a million small arrays costs about 100 bytes of object header per
array before any data, and every worker process would hold its own copy. One flat array
with start and end offsets holds the same sequences, can be memory-mapped from the
cache so that all workers share the operating system's pages, and its leave-one-out
views (all but the last two items, the second last, the last) are offsets into the same
array, not copies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class Ragged(Sequence):
    """Sequence i is `flat[starts[i]:ends[i]]` (a view, no copy)."""

    def __init__(self, flat: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        if len(starts) != len(ends):
            raise ValueError("Ragged: starts and ends differ in length")
        self.flat, self.starts, self.ends = flat, np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)

    @classmethod
    def from_ends(cls, flat: np.ndarray, ends: np.ndarray) -> Ragged:
        """Back-to-back sequences: sequence i ends at ends[i] where sequence i+1 starts."""
        ends = np.asarray(ends, dtype=np.int64)
        return cls(flat, np.concatenate([[0], ends[:-1]]).astype(np.int64), ends)

    @classmethod
    def from_list(cls, seqs: Sequence[np.ndarray]) -> Ragged:
        ends = np.cumsum([len(s) for s in seqs], dtype=np.int64)
        flat = np.concatenate([np.asarray(s) for s in seqs]) if len(seqs) else np.zeros(0, dtype=np.int64)
        return cls.from_ends(flat, ends)

    def followed_by(self, other: Ragged) -> Ragged:
        """Both sets of back-to-back sequences, `other`'s after this one's (a new flat array)."""
        shift = self.ends[-1] if len(self.ends) else 0
        return Ragged.from_ends(np.concatenate([np.asarray(self.flat), np.asarray(other.flat)]),
                                np.concatenate([self.ends, other.ends + shift]))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return Ragged(self.flat, self.starts[i], self.ends[i])
        return self.flat[self.starts[i] : self.ends[i]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for s, e in zip(self.starts.tolist(), self.ends.tolist()):
            yield self.flat[s:e]

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def trimmed(self, end_cut: int) -> Ragged:
        """Every sequence without its last `end_cut` items (the same flat array)."""
        return Ragged(self.flat, self.starts, self.ends - end_cut)

    def item_at_end(self, back: int) -> np.ndarray:
        """The item `back` places from each sequence's end (1 = the last), as int64."""
        return np.asarray(self.flat[self.ends - back], dtype=np.int64)


class IndexIds(Sequence):
    """Raw user ids that are just each user's index ("0", "1", ...), without a million strings."""

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [str(j) for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return str(i % self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == self.n and all(a == b for a, b in zip(self, other))


class LeadingIds(Sequence):
    """Raw user ids of a generated population: the real ids of its leading users (the real
    data's public users), then `prefix`0, `prefix`1, ... for the drawn ones."""

    def __init__(self, leading: Sequence[str], drawn: int, prefix: str) -> None:
        self.leading, self.drawn, self.prefix = list(leading), int(drawn), prefix

    def __len__(self) -> int:
        return len(self.leading) + self.drawn

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.leading[i] if i < len(self.leading) else f"{self.prefix}{i - len(self.leading)}"
