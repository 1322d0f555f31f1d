"""Many users trained alone at once, each ranked with their own adapter (`mode=local`).

The local-only baseline trains every private user's own adapter from the same start on
their own sequence, with no clipping and nothing shared. One user at a time through the
peft model (the loop engine, then a ranking per user) ran at about one user a second on
the default data, so a run over every user took longer than a sweep of federated runs
(experiments/README.md#local-only). Here the stacked engine trains a group of users at once, as for a
cohort, but keeps each user's trained adapter rows apart instead of summing them, and
ranks the group's users with those rows (`rank_users`' `last_hidden`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from peft import PeftModel

from fedrec.data.split import SplitData
from fedrec.model.lora import adapter_parameters
from fedrec.model.types import AdapterState
from fedrec.train.evaluate import rank_users
from fedrec.train.groups import dropout_for, user_groups, user_stacks
from fedrec.train.settings import LocalTraining
from fedrec.train.stacked import FrozenBase
from fedrec.train.step import local_sgd

SPLITS = ("valid", "test")


def train_and_rank_alone(
    model: PeftModel, initial: AdapterState, data: SplitData, users: Sequence[int], local: LocalTraining,
    device: torch.device, on_group: Callable[[int], None] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Each user's `local.local_epochs` SGD steps from `initial`, alone; then their ranks on
    the validation and test items with their own adapter: {split: (full ranks, sampled
    ranks)}, aligned with `users`. The same steps as the loop engine's for one user (equal
    to float tolerance with dropout off; with dropout each user draws from their own seed).
    `on_group(n)` is called after each group of n users."""
    users = [int(u) for u in users]
    base = FrozenBase(model)
    trainable = list(adapter_parameters(model))
    at = {u: i for i, u in enumerate(users)}
    out = {s: (np.zeros(len(users), dtype=np.int64), np.zeros(len(users), dtype=np.int64)) for s in SPLITS}
    for group in user_groups(data, users, local, device, None):
        stack = user_stacks(initial, group.users, None, [], device)
        params = [stack[k].requires_grad_() for k in trainable]
        local_sgd(base, stack, params, group, dropout_for(base, group, local.seed, 1, device), local)
        own = {k: v.detach() for k, v in stack.items()}
        # A user whose steps diverged (NaN or Inf) keeps the starting adapter, as the loop engine rejects that update.
        finite = torch.stack([torch.isfinite(v.reshape(len(group.users), -1)).all(dim=1) for v in own.values()]).all(dim=0)
        for k, v in own.items():
            v[~finite] = initial[k].to(v.device, v.dtype)
        row = {u: i for i, u in enumerate(group.users)}

        @torch.no_grad()
        def last_hidden(chunk: list[int], inputs: torch.Tensor) -> torch.Tensor:
            pick = torch.as_tensor([row[u] for u in chunk], device=inputs.device)
            return base.hidden(inputs, {k: v[pick] for k, v in own.items()})[:, -1, :]

        where = [at[u] for u in group.users]
        for split in SPLITS:
            full, sampled = rank_users(model, data, group.users, split, max_seq_len=local.max_seq_len, device=device,
                                       last_hidden=last_hidden)  # fmt: skip
            out[split][0][where], out[split][1][where] = full, sampled
        if on_group is not None:
            on_group(len(group.users))
    return out
