"""Train many users at once: per-user LoRA adapters stacked along a batch dimension.

Why not a loop over users: one user's step is a handful of small GEMMs plus Python and
autograd overhead per op, so a loop runs far below the machine's GEMM rate. Here the
frozen base's projections run as one GEMM over every token of every user in a group,
the adapters as batched matmuls (one small matrix per user), and the scoring layer as
one GEMM over all positions that have a target. Users never mix: the loss is the sum of
per-user mean losses, so the gradient of each user's slice of the stack is exactly that
user's own gradient, and clipping is applied per user before the sum.

Why not torch.func's `vmap(grad(functional_call))` over the peft model: it needs a
fixed-shape loss, so it scores padding positions too, and it ran no faster than the
per-user loop, while the stacked matmuls here ran several times faster than both
(experiments/bench_vectorize_methods.py; the numbers: experiments/README.md#vectorize-methods).

Dropout (the base's, as in the loop's train mode) is drawn per user from that user's own
seed at that user's own length, so a user trains identically in any group, on any worker,
in any placement. The per-user loop of `fedrec.train.loop` is the reference it is tested
against (with dropout off, where the two must agree to float tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel

from fedrec.aggregate import UpdateSum
from fedrec.data.split import SplitData
from fedrec.model.lora import adapter_parameters
from fedrec.model.types import AdapterState
from fedrec.train.accumulate import clip_and_count, finite_users, update_norms, weighted_sum
from fedrec.train.groups import Group, dropout_for, item_group_cap, save_kept, user_groups, user_stacks
from fedrec.train.settings import LocalTraining, RoundContext
from fedrec.train.shared_table import TABLE_KEY, shared_table_group
from fedrec.train.stacked import FrozenBase
from fedrec.train.step import local_sgd


def train_users_vectorized(model: PeftModel, global_state: AdapterState, data: SplitData, users: Sequence[int],
                           local: LocalTraining, ctx: RoundContext) -> UpdateSum:  # fmt: skip
    """Same contract and same result (to float tolerance) as `fedrec.train.loop.train_users`.

    Users train in groups of at most `local.vector_tokens` padded tokens (`fedrec.train.groups`);
    item-adapter=table with one local step takes the shared-table path (`fedrec.train.shared_table`).
    """
    base = FrozenBase(model)
    trainable = list(adapter_parameters(model))
    shared, kept = ctx.split_keys(trainable)
    users = [int(u) for u in users]
    # Users who keep their own tensors (lora-share=a-only) train them on the general path.
    shared_table = (base.item is not None and base.item.kind == "table" and local.local_epochs == 1 and not kept
                    and TABLE_KEY in shared)  # fmt: skip
    # each user holds own item tensors (and grads, deltas)
    max_users = item_group_cap(global_state) if base.item is not None and not shared_table else None
    groups = user_groups(data, users, local, ctx.device, max_users)
    if shared_table:  # each group brings its own sum
        total = UpdateSum()
        for group in groups:
            total.merge(shared_table_group(base, global_state, trainable, group, local, ctx))
    else:
        total = UpdateSum(delta={k: torch.zeros_like(global_state[k], dtype=torch.float32) for k in shared})
        for group in groups:
            _train_group(base, global_state, trainable, group, local, ctx, total)
    total.delta = {k: v.cpu() for k, v in total.delta.items()} if users else {}
    return total


def _train_group(base: FrozenBase, global_state: AdapterState, trainable: list[str], group: Group,
                 local: LocalTraining, ctx: RoundContext, total: UpdateSum) -> None:  # fmt: skip
    """One group's local steps; their clipped, weighted updates added into `total`."""
    shared, kept = ctx.split_keys(trainable)
    stack = user_stacks(global_state, group.users, ctx.local_store, kept, ctx.device)
    params = [stack[k].requires_grad_() for k in trainable]
    drop = dropout_for(base, group, local.seed, ctx.round, ctx.device)
    first_loss = local_sgd(base, stack, params, group, drop, local)
    with torch.no_grad():
        delta = {k: stack[k] - global_state[k] for k in shared}  # shared tensors all start global
        norm = update_norms(delta)
        ok = finite_users(norm, first_loss, [stack[k] for k in kept], [delta[k] for k in shared], total)
        coef = clip_and_count(total, norm, first_loss, group.n_targets, ok, ctx.clipping_norm, local.user_weighting)
        for k in shared:
            total.delta[k] += weighted_sum(coef, delta[k])
        save_kept(ctx.local_store, group.users, stack, kept, ok)
