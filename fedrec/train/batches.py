"""Sequences into padded next-item batches, and the per-user seed every engine shares."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_left(seqs: Sequence[np.ndarray], length: int) -> torch.Tensor:
    """Left-pad (or left-truncate) each sequence to `length` with 0."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[i, length - len(s) :] = s
    return torch.from_numpy(out)


def next_item_batch(seqs: Sequence[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs s[:-1] and targets s[1:], padded only to the longest sequence in the batch."""
    n = max(1, min(max_len, max(len(s) - 1 for s in seqs)))
    return pad_left([s[:-1] for s in seqs], n), pad_left([s[1:] for s in seqs], n)


def user_seed(seed: int, round_: int, user: int) -> int:
    """Per-(run, round, user) seed: the same user trains identically on any worker."""
    return int(np.random.SeedSequence([seed, round_, user]).generate_state(1)[0])
