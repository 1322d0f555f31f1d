"""The per-user engine: each user trains alone, one after another (the reference the
vectorized engine is tested against)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedrec.aggregate import NON_FINITE, UpdateSum
from fedrec.data.split import SplitData
from fedrec.local_state import UserStateStore, is_local
from fedrec.model.lora import adapter_parameters
from fedrec.model.types import AdapterState
from fedrec.privacy.clipping import clip_update
from fedrec.train.batches import next_item_batch, user_seed


def train_users(
    model: nn.Module,
    global_state: AdapterState,
    data: SplitData,
    users: Sequence[int],
    *,
    local_epochs: int,
    learning_rate: float,
    clipping_norm: float,
    user_weighting: str,
    max_seq_len: int,
    seed: int,
    round_: int,
    device: torch.device,
    local_store: UserStateStore | None = None,
) -> UpdateSum:
    """Train each user from the global adapter on their own sequence; sum clipped updates.

    One user's local training is `local_epochs` full-batch SGD steps on their training
    sequence (all positions). The update is clipped per user before it joins the sum.
    The reported loss is the one before the first local step: after it, the loss mostly
    measures how well one user's own sequence was memorized. With `local_store`
    (lora-share=a-only) each user starts from and keeps their own B; only the other
    tensors' updates join the sum.
    """
    params = adapter_parameters(model)
    names = list(params)
    plist = [params[k] for k in names]
    local_keys = [k for k in names if is_local(k)] if local_store is not None else []
    shared = [k for k in names if k not in local_keys]
    model.train()
    total = UpdateSum()
    for user in users:
        seq = data.train[user]
        inputs, targets = next_item_batch([seq], max_seq_len)
        inputs, targets = inputs.to(device), targets.to(device)
        n_targets = int((targets > 0).sum())
        with torch.no_grad():
            for k in names:
                params[k].copy_(global_state[k])
            own = local_store.load(user) if local_store is not None else None
            for k in local_keys if own else []:
                params[k].copy_(own[k])
        torch.manual_seed(user_seed(seed, round_, user))
        loss_value = 0.0
        if n_targets:
            for epoch in range(local_epochs):
                loss = model.loss(inputs, targets)
                grads = torch.autograd.grad(loss, plist)
                with torch.no_grad():
                    for p, g in zip(plist, grads):
                        p.sub_(g, alpha=learning_rate)
                if epoch == 0:  # the global adapter's loss on this user, before adapting to it
                    loss_value = float(loss.detach())
        with torch.no_grad():
            delta = {k: (params[k] - global_state[k]).cpu() for k in shared}
            finite = all(bool(torch.isfinite(params[k]).all()) for k in names) and (loss_value == loss_value)
        if not finite:  # NaN or Inf (a diverging step): left out of the sum, counted, never saved
            total.reject(NON_FINITE)
            continue
        if local_store is not None:
            local_store.save(user, {k: params[k] for k in local_keys})
        delta, norm = clip_update(delta, clipping_norm)
        weight = 1.0 if user_weighting == "uniform" else float(n_targets)
        clipped = clipping_norm > 0 and norm > clipping_norm
        total.add_user(delta, weight, loss_value, norm, clipped=clipped, clipped_norm=min(norm, clipping_norm) if clipped else norm)
    return total


