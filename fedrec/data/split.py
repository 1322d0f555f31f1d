"""Leave-one-out split and the public/private user split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedrec.data.interactions import Interactions
from fedrec.data.ragged import Ragged


@dataclass
class SplitData:
    """Leave-one-out views of every user, and which users are public or private.

    `train[u]` is all but the last two items, `valid[u]` the second-last, `test[u]` the
    last. Private users are the federated clients; a private user's index in `private`
    is the user id the server samples and the clients train.
    """

    num_items: int
    train: Sequence[np.ndarray]  # a list, or a Ragged view of the loaded sequences
    valid: np.ndarray
    test: np.ndarray
    public: np.ndarray
    private: np.ndarray
    user_ids: Sequence[str]
    item_ids: list[str]  # the catalogue: raw id of item 1..N
    cold: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # held-out items (1-based)

    def cold_target_users(self, users: np.ndarray, split: str = "test") -> np.ndarray:
        """Those of `users` whose `split` target is a cold item."""
        users = np.asarray(users, dtype=np.int64)
        targets = np.array([self.target(int(u), split) for u in users], dtype=np.int64)
        return users[np.isin(targets, self.cold)]

    def public_sequences(self, users: Sequence[int] | None = None) -> list[np.ndarray]:
        """What pretraining sees of the public users (or of `users` among them): all but
        their last item (which picks the stopping epoch), without cold items, which never train."""
        seqs = [self.history(int(u), "test") for u in (self.public if users is None else users)]
        return [s[~np.isin(s, self.cold)] for s in seqs] if len(self.cold) else seqs

    def history(self, user: int, split: str) -> np.ndarray:
        """What the model sees when predicting `split`'s target for this user."""
        if split == "valid":
            return self.train[user]
        if split == "test":
            return np.append(self.train[user], self.valid[user])
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def target(self, user: int, split: str) -> int:
        return int(self.valid[user] if split == "valid" else self.test[user])

    def full_sequence(self, user: int) -> np.ndarray:
        return np.append(self.train[user], [self.valid[user], self.test[user]])


def leave_one_out(sequences: Sequence[np.ndarray]) -> tuple[Sequence[np.ndarray], np.ndarray, np.ndarray]:
    if isinstance(sequences, Ragged):  # views into the same flat array, no per-user copies
        if (sequences.lengths < 3).any():
            raise ValueError("leave-one-out needs at least 3 interactions per user")
        return sequences.trimmed(2), sequences.item_at_end(2), sequences.item_at_end(1)
    if any(len(s) < 3 for s in sequences):
        raise ValueError("leave-one-out needs at least 3 interactions per user")
    train = [np.asarray(s[:-2]) for s in sequences]
    valid = np.array([s[-2] for s in sequences], dtype=np.int64)
    test = np.array([s[-1] for s in sequences], dtype=np.int64)
    return train, valid, test


def public_count(users: int, public_fraction: float) -> int:
    """How many of `users` the split makes public: at least one on each side."""
    return min(max(1, int(round(public_fraction * users))), users - 1)


def split_users(data: Interactions, public_fraction: float, seed: int, cold_items: float = 0.0,
                all_public: bool = False) -> SplitData:  # fmt: skip
    """Seeded public/private split; at least one user ends up on each side, unless
    `all_public` (a server whose private users are the devices that enroll: it holds none).
    A generated population with `leading_public` = k has its first k users public.

    With `cold_items` = F, a seeded fraction F of the catalogue is held out: removed from
    every training prefix, so those items are only ever validation or test targets (and,
    at test time, the validation item in a user's history). Pretraining removes them too
    (`fedrec.train.pretrain.ensure_base`).
    """
    n = data.num_users
    if n < 2 and not all_public:
        raise ValueError(f"need at least 2 users for a public/private split, got {n}")
    order = np.random.default_rng([seed, 0xB1C]).permutation(n)
    n_public = n if all_public else public_count(n, public_fraction)
    if data.leading_public and not all_public:  # a generated population says which users are public
        order, n_public = np.arange(n), data.leading_public
    train, valid, test = leave_one_out(data.sequences)
    cold = np.zeros(0, dtype=np.int64)
    if cold_items > 0:
        pick = np.random.default_rng([seed, 0xC01D]).choice(data.num_items, int(round(cold_items * data.num_items)), replace=False)
        cold = np.sort(pick + 1).astype(np.int64)
        train = [t[~np.isin(t, cold)] for t in train]
    return SplitData(
        num_items=data.num_items,
        train=train,
        valid=valid,
        test=test,
        public=np.sort(order[:n_public]),
        private=np.sort(order[n_public:]),
        user_ids=data.user_ids,
        item_ids=data.item_ids,
        cold=cold,
    )


def one_user_split(sequence: np.ndarray, user: int, user_id: str, item_ids: list[str]) -> SplitData:
    """A device's view: only its own user, under the index the server knows it by."""
    train, valid, test = leave_one_out([np.asarray(sequence, dtype=np.int64)])
    return SplitData(
        num_items=len(item_ids),
        train={user: train[0]},  # type: ignore[arg-type]  (indexed by the server's user index)
        valid={user: valid[0]},  # type: ignore[arg-type]
        test={user: test[0]},  # type: ignore[arg-type]
        public=np.zeros(0, dtype=np.int64),
        private=np.array([user]),
        user_ids=[user_id],
        item_ids=item_ids,
    )
