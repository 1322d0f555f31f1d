"""The shared-table path: `item-adapter=table` with one local step, without a per-user table.

It shares the stacked forward, the grouping and per-user state, and the clipping and
accumulation with the general path; only its step differs (`SharedTableStep`).
"""

from __future__ import annotations

import torch

from fedrec.aggregate import UpdateSum
from fedrec.model.types import AdapterState
from fedrec.train.accumulate import clip_and_count, finite_users, weighted_sum
from fedrec.train.dropout import DropoutMasks
from fedrec.train.groups import Group, dropout_for, user_stacks
from fedrec.train.scoring import ScoringCrossEntropy, in_chunk, user_spans
from fedrec.train.settings import LocalTraining, RoundContext
from fedrec.train.stacked import ITEM_PREFIX, FrozenBase


TABLE_KEY = ITEM_PREFIX + "T"  # the `table` adapter's one tensor


class SharedTableStep:
    """One local step of `item-adapter=table` for a whole group, without a per-user table.

    Why: in its only local step every user starts from the same global table T, so all
    of them score against one table E + T, as cheap as no item adapter. What differs per
    user is only the gradient G_u of their loss with respect to T, a dense N×d matrix of
    rank ≤ their positions: G_u = Σ_t w_t (p_t − e_{y_t}) h_tᵀ from the scores, plus the
    rows of their own input items from the lookups. Clipping needs only ‖G_u‖, which a few
    Gram matrices give (`user_norms2`), and the round needs only the clipped sum
    Σ_u c_u G_u, which one more pass over the scores forms as a single GEMM
    (`clipped_sum`). The general path instead held a whole N×d table per user and ran
    several times slower on Beauty (experiments/README.md#item-adapter-cost). Tested equal to the per-user loop.
    """

    def __init__(self, base: FrozenBase, table_delta: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                 chunk: int, dtype: torch.dtype) -> None:  # fmt: skip
        self.base, self.inputs, self.chunk, self.dtype = base, inputs, chunk, dtype
        self.keep = targets > 0
        self.row_user = self.keep.nonzero()[:, 0]
        self.y = targets[self.keep] - 1
        self.inv_count = 1.0 / self.keep.sum(dim=1).clamp(min=1).to(torch.float32)
        self.w = self.inv_count[self.row_user]
        self.table = (base.table + table_delta).contiguous()  # everyone's E + T in this step
        self.lookup = table_delta[(inputs - 1).clamp(min=0)].requires_grad_()  # padding is masked by the model
        users = inputs.shape[0]
        self.spans = user_spans(self.row_user, users)
        self.in_items = [inputs[u][inputs[u] > 0] - 1 for u in range(users)]  # each user's input items, 0-based

    def loss(self, stack: dict[str, torch.Tensor], drop: DropoutMasks | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.base.hidden(self.inputs, stack, drop, item_lookup=self.lookup)
        h = hidden[self.keep]
        self.h = h.detach()
        loss, ce = ScoringCrossEntropy.apply(h, self.table, self.y, self.w, self.chunk, self.dtype, self.base.absent,
                                              None, None, None)  # fmt: skip
        per_user = torch.zeros(len(self.inputs), device=ce.device).index_add_(0, self.row_user, ce) * self.inv_count
        return loss, per_user

    def gradients(self, stack: dict[str, torch.Tensor], params: list[torch.Tensor], drop: DropoutMasks | None,
                  has_targets: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:  # fmt: skip
        """(loss per user, gradient of each of `params`, gradient of the lookups); zeros for
        a group without targets, and for a tensor the loss does not reach."""
        first_loss = torch.zeros(len(self.inputs), device=self.inputs.device)
        grads = [torch.zeros_like(p) for p in params]
        grad_lookup = torch.zeros_like(self.lookup)
        if has_targets:
            loss, first_loss = self.loss(stack, drop)
            *grads, grad_lookup = torch.autograd.grad(loss, [*params, self.lookup], allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return first_loss, grads, grad_lookup

    @torch.no_grad()
    def norms(self, grads: list[torch.Tensor], grad_lookup: torch.Tensor, learning_rate: float,
              has_targets: bool) -> torch.Tensor:  # fmt: skip
        """‖Δ_u‖ per user of the one step −lr·G_u, in float64."""
        lr2 = learning_rate**2
        users = len(self.inputs)
        norm2 = lr2 * self.user_norms2(grad_lookup) if has_targets else torch.zeros(users, dtype=torch.float64)
        for g in grads:
            norm2 = norm2 + lr2 * (g.double() ** 2).flatten(1).sum(1)
        return torch.sqrt(norm2)

    def _probs(self):
        """(first row, end row, softmax) over chunks that hold whole users only."""
        table_c = self.table.to(self.dtype)
        start = 0
        while start < len(self.h):
            end = start
            for _u, a, b in in_chunk(self.spans, start, len(self.h)):  # whole users, up to `chunk` rows
                if b - start > self.chunk and end > start:
                    break
                end = b
            logits = self.h[start:end].to(self.dtype) @ table_c.T
            if self.base.absent is not None:
                logits.masked_fill_(self.base.absent, float("-inf"))
            yield start, end, torch.softmax(logits, dim=1)
            start = end

    @torch.no_grad()
    def user_norms2(self, grad_lookup: torch.Tensor) -> torch.Tensor:
        """‖G_u‖² per user, G_u the gradient of user u's loss with respect to T."""
        out = torch.zeros(len(self.inputs), dtype=torch.float64, device=self.h.device)
        for s, e, probs in self._probs():
            for u, a, b in in_chunk(self.spans, s, e):
                p = probs[a - s : b - s].to(self.h.dtype)
                y, wh = self.y[a:b], self.h[a:b] * self.w[a:b, None]
                # scores: Σ_{t,t'} w_t w_t' (p_t − e_t)·(p_t' − e_t') h_t·h_t'
                py = p[:, y]
                k = p @ p.T - py - py.T + (y[:, None] == y[None, :]).to(p.dtype)
                total = (k * (wh @ wh.T)).sum(dtype=torch.float64)
                # lookups: the rows of the user's input items, and their cross term with the scores
                x = self.in_items[u]
                g = grad_lookup[u][self.inputs[u] > 0]
                px = p[:, x] - (y[:, None] == x[None, :]).to(p.dtype)
                total += 2 * ((px * (wh @ g.T)).sum(dtype=torch.float64))
                total += ((x[:, None] == x[None, :]) * (g @ g.T)).sum(dtype=torch.float64)
                out[u] = total
        with_targets = {su for su, _a, _b in self.spans}
        for u in range(len(self.inputs)):  # users without a target: only their lookups (none: no loss)
            if u not in with_targets:
                g = grad_lookup[u][self.inputs[u] > 0]
                x = self.in_items[u]
                out[u] = ((x[:, None] == x[None, :]) * (g @ g.T)).sum(dtype=torch.float64)
        return out

    @torch.no_grad()
    def clipped_sum(self, coef: torch.Tensor, grad_lookup: torch.Tensor) -> torch.Tensor:
        """Σ_u coef_u · G_u."""
        acc = torch.zeros_like(self.table)
        cwh = self.h * (coef[self.row_user] * self.w)[:, None]
        for s, e, probs in self._probs():
            acc.addmm_(probs.T.to(acc.dtype), cwh[s:e])
        acc.index_add_(0, self.y, cwh, alpha=-1.0)
        for u, x in enumerate(self.in_items):
            acc.index_add_(0, x, grad_lookup[u][self.inputs[u] > 0] * coef[u])
        return acc


def shared_table_group(base: FrozenBase, global_state: AdapterState, trainable: list[str], group: Group,
                       local: LocalTraining, ctx: RoundContext) -> UpdateSum:  # fmt: skip
    """One group's clipped, weighted update sum for item-adapter=table with one local step."""
    others = [k for k in trainable if k != TABLE_KEY]
    stack = user_stacks({k: v for k, v in global_state.items() if k != TABLE_KEY}, group.users, None, [], ctx.device)
    params = [stack[k].requires_grad_() for k in others]
    step = SharedTableStep(base, global_state[TABLE_KEY], group.inputs, group.targets, local.scoring_chunk(ctx.device),
                           local.scoring_dtype)  # fmt: skip
    drop = dropout_for(base, group, local.seed, ctx.round, ctx.device)
    has_targets = bool(group.n_targets.sum())
    first_loss, grads, grad_lookup = step.gradients(stack, params, drop, has_targets)
    lr = local.learning_rate
    total = UpdateSum()
    with torch.no_grad():
        norm = step.norms(grads, grad_lookup, lr, has_targets)
        ok = finite_users(norm, first_loss, [], [*grads, grad_lookup], total)
        coef = clip_and_count(total, norm, first_loss, group.n_targets, ok, ctx.clipping_norm, local.user_weighting)
        delta = {k: weighted_sum(coef, g) * -lr for k, g in zip(others, grads)}
        delta[TABLE_KEY] = step.clipped_sum(coef, grad_lookup) * -lr if has_targets else \
            torch.zeros_like(global_state[TABLE_KEY])
    total.delta = {k: delta[k] for k in trainable}
    return total
