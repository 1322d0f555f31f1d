"""The per-user engine: each user trains alone, one after another (the reference the
vectorized engine is tested against)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedrec.aggregate import NON_FINITE, UpdateSum
from fedrec.data.split import SplitData
from fedrec.model.lora import adapter_parameters
from fedrec.model.types import AdapterState
from fedrec.privacy.clipping import clip_update
from fedrec.train.batches import next_item_batch, user_seed
from fedrec.train.settings import LocalTraining, RoundContext


def train_users(model: nn.Module, global_state: AdapterState, data: SplitData, users: Sequence[int],
                local: LocalTraining, ctx: RoundContext) -> UpdateSum:  # fmt: skip
    """Train each user from the global adapter on their own sequence; sum clipped updates.

    One user's local training is `local_epochs` full-batch SGD steps on their training
    sequence (all positions). The update is clipped per user before it joins the sum.
    The reported loss is the one before the first local step: after it, the loss mostly
    measures how well one user's own sequence was memorized. With a `local_store`
    (lora-share=a-only) each user starts from and keeps their own B; only the other
    tensors' updates join the sum.
    """
    params = adapter_parameters(model)
    names = list(params)
    shared, kept = ctx.split_keys(names)
    store = ctx.local_store
    model.train()
    total = UpdateSum()
    for user in users:
        inputs, targets = next_item_batch([data.train[user]], local.max_seq_len)
        inputs, targets = inputs.to(ctx.device), targets.to(ctx.device)
        n_targets = int((targets > 0).sum())
        with torch.no_grad():
            for k in names:
                params[k].copy_(global_state[k])
            own = store.load(user) if store is not None else None
            for k in kept if own else []:
                params[k].copy_(own[k])
        torch.manual_seed(user_seed(local.seed, ctx.round, user))
        loss_value = _local_steps(model, [params[k] for k in names], inputs, targets, local) if n_targets else 0.0
        with torch.no_grad():
            delta = {k: (params[k] - global_state[k]).cpu() for k in shared}
            finite = all(bool(torch.isfinite(params[k]).all()) for k in names) and (loss_value == loss_value)
        if not finite:  # NaN or Inf (a diverging step): left out of the sum, counted, never saved
            total.reject(NON_FINITE)
            continue
        if store is not None:
            store.save(user, {k: params[k] for k in kept})
        delta, norm = clip_update(delta, ctx.clipping_norm)
        weight = 1.0 if local.user_weighting == "uniform" else float(n_targets)
        clipped = ctx.clipping_norm > 0 and norm > ctx.clipping_norm
        total.add_user(delta, weight, loss_value, norm, clipped=clipped,
                       clipped_norm=min(norm, ctx.clipping_norm) if clipped else norm)  # fmt: skip
    return total


def _local_steps(model: nn.Module, plist: list[torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
                 local: LocalTraining) -> float:  # fmt: skip
    """`local_epochs` SGD steps in place; the loss before the first."""
    loss_value = 0.0
    for epoch in range(local.local_epochs):
        loss = model.loss(inputs, targets)
        grads = torch.autograd.grad(loss, plist)
        with torch.no_grad():
            for p, g in zip(plist, grads):
                p.sub_(g, alpha=local.learning_rate)
        if epoch == 0:  # the global adapter's loss on this user, before adapting to it
            loss_value = float(loss.detach())
    return loss_value
