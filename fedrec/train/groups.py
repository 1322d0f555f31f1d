"""Users into groups for the stacked engine, and each group's per-user state.

A group is users of similar length padded to one width, so padding stays small. Per-user
state is what makes a user train as if alone: their own adapter row in each stack
(the global adapter, or their own kept tensors under lora-share=a-only) and their own
dropout seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel

from fedrec.data.split import SplitData
from fedrec.local_state import UserStateStore, is_local
from fedrec.model.lora import adapter_state
from fedrec.model.types import AdapterState
from fedrec.train.batches import next_item_batch, user_seed
from fedrec.train.dropout import DropoutMasks
from fedrec.train.settings import LocalTraining
from fedrec.train.stacked import ITEM_PREFIX, FrozenBase

# Bytes of per-user item-adapter stacks one group may hold (the tensors, their gradients and
# the deltas): `table` holds a whole N×d table per user.
ITEM_GROUP_BYTES = 256 * 2**20


@dataclass
class Group:
    """Some users' next-item batch, left-padded to the longest of them."""

    users: list[int]
    inputs: torch.Tensor
    targets: torch.Tensor
    n_targets: torch.Tensor  # per user: positions with a target


def length_groups(lengths: Sequence[int], max_len: int, tokens: int, max_users: int | None = None) -> list[np.ndarray]:
    """Indices grouped by similar length, each group padded to at most `tokens` tokens
    (and holding at most `max_users` users)."""
    clipped = np.minimum(np.asarray(lengths), max_len)
    order = np.argsort(-clipped, kind="stable")
    groups, start = [], 0
    while start < len(order):
        width = max(1, int(clipped[order[start]]))
        size = max(1, tokens // width if max_users is None else min(tokens // width, max_users))
        groups.append(order[start : start + size])
        start += size
    return groups


def item_group_cap(global_state: AdapterState) -> int:
    """Most users per group whose own item-adapter stacks fit `ITEM_GROUP_BYTES`."""
    per_user = 4 * sum(v.numel() * 4 for k, v in global_state.items() if k.startswith(ITEM_PREFIX))
    return max(1, ITEM_GROUP_BYTES // per_user)


def user_groups(data: SplitData, users: list[int], local: LocalTraining, device: torch.device,
                max_users: int | None) -> Iterator[Group]:  # fmt: skip
    """`users` in `length_groups` of at most `vector_tokens` padded tokens, batched on `device`."""
    lengths = [len(data.train[u]) - 1 for u in users]
    for idx in length_groups(lengths, local.max_seq_len, local.vector_tokens, max_users):
        group = [users[i] for i in idx]
        inputs, targets = next_item_batch([data.train[u] for u in group], local.max_seq_len)
        inputs, targets = inputs.to(device), targets.to(device)
        yield Group(group, inputs, targets, (targets > 0).sum(dim=1))


def user_stacks(state: AdapterState, users: list[int], store: UserStateStore | None, kept: list[str],
                device: torch.device) -> dict[str, torch.Tensor]:  # fmt: skip
    """Each of `state`'s tensors stacked once per user (row u: user u's), with the `kept`
    tensors of users who have their own in `store` in place of the global ones."""
    stack = {k: v.expand(len(users), *v.shape).clone() for k, v in state.items()}
    for row, u in enumerate(users if kept else []):
        own = store.load(u)
        for k in kept if own else []:
            stack[k][row] = own[k].to(device)
    return stack


def save_kept(store: UserStateStore | None, users: list[int], stack: dict[str, torch.Tensor], kept: list[str],
              ok: torch.Tensor) -> None:  # fmt: skip
    """The `kept` rows of the users whose update was finite, back into `store`."""
    for row, u in enumerate(users if kept else []):
        if ok[row]:
            store.save(u, {k: stack[k][row] for k in kept})


def dropout_for(base: FrozenBase, group: Group, seed: int, round_: int, device: torch.device) -> DropoutMasks | None:
    """The base's dropout for `group`, each user's from their own seed (None with it off)."""
    if base.dropout <= 0:
        return None
    seeds = [user_seed(seed, round_, u) for u in group.users]
    real = (group.inputs > 0).sum(dim=1).cpu().numpy()
    d = base.model.item_emb.embedding_dim
    return DropoutMasks(real, group.inputs.shape[1], d, base.heads, len(base.blocks), base.dropout, seeds, device)


def own_state_hidden(model: PeftModel, store: UserStateStore):
    """Last hidden state of many users at once, each with their own B (lora-share=a-only).

    The shared tensors are the model's current (global) adapter; a user who never trained
    keeps the global B.
    """
    base = FrozenBase(model)
    shared = adapter_state(model)
    local_keys = [k for k in shared if is_local(k)]

    @torch.no_grad()
    def last_hidden(users: list[int], inputs: torch.Tensor) -> torch.Tensor:
        return base.hidden(inputs, user_stacks(shared, users, store, local_keys, inputs.device))[:, -1, :]

    return last_hidden
