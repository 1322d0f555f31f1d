"""The stacked step: every user of a group takes their local SGD steps at once.

Users never mix: the loss is the sum of per-user mean losses, so the gradient of each
user's slice of the stack is exactly that user's own gradient.
"""

from __future__ import annotations

import torch

from fedrec.train.dropout import DropoutMasks
from fedrec.train.groups import Group
from fedrec.train.scoring import ScoringCrossEntropy
from fedrec.train.settings import LocalTraining
from fedrec.train.stacked import FrozenBase


def loss_per_user(base: FrozenBase, stack: dict[str, torch.Tensor], group: Group, chunk: int, dtype: torch.dtype,
                  drop: DropoutMasks | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(Σ_u mean-CE_u, mean-CE_u per user); only positions with a target are scored."""
    inputs, targets = group.inputs, group.targets
    hidden = base.hidden(inputs, stack, drop)
    keep = targets > 0
    rows = keep.nonzero()[:, 0]
    inv_count = 1.0 / keep.sum(dim=1).clamp(min=1).to(torch.float32)
    extra = base.item.scoring(base.item_tensors(stack), hidden, keep) if base.item is not None else None
    loss, ce = ScoringCrossEntropy.apply(
        hidden[keep], base.table, targets[keep] - 1, inv_count[rows], chunk, dtype, base.absent, extra,
        None if extra is None else extra.z, None if extra is None else extra.lstack,
    )  # fmt: skip
    per_user = torch.zeros(len(inputs), device=ce.device).index_add_(0, rows, ce) * inv_count
    return loss, per_user


def local_sgd(base: FrozenBase, stack: dict[str, torch.Tensor], params: list[torch.Tensor], group: Group,
              drop: DropoutMasks | None, local: LocalTraining) -> torch.Tensor:  # fmt: skip
    """`local_epochs` SGD steps on every user's rows of `params` at once, in place; each
    user's loss before the first step (0 for a group without targets, which takes none)."""
    device = group.inputs.device
    chunk = local.scoring_chunk(device)
    first_loss = torch.zeros(len(group.users), device=device)
    if int(group.n_targets.sum()):
        for epoch in range(local.local_epochs):
            loss, per_user = loss_per_user(base, stack, group, chunk, local.scoring_dtype, drop)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(g, alpha=local.learning_rate)
            if epoch == 0:
                first_loss = per_user
    return first_loss
