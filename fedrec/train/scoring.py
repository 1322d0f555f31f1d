"""The scoring layer's fused cross-entropy: every scored position against every item, in chunks.

Why its own autograd function: the (positions × items) logits are the largest tensor of a
step, and nothing here ever holds them whole (see `ScoringCrossEntropy`).
"""

from __future__ import annotations

import torch

from fedrec.model.item_adapters import ScoringExtra


class ScoringCrossEntropy(torch.autograd.Function):
    """Σ_t w_t · CE(h_t · Eᵀ + extra_t, y_t) with E frozen, in row chunks that stay in cache.

    Written here because no maintained CPU kernel does this (Liger's fused linear
    cross-entropy is Triton/GPU-only): the (positions × items) logits are never held
    whole, and since E needs no gradient, ∂loss/∂h is computed in the same pass and kept.
    Per chunk: one GEMM for the logits, torch's fused row softmax (max, exp, sum and
    scale while a row sits in L1), one GEMM for softmax·E; the one-hot part and the
    weights are applied to the (rows × d) result, never to the (rows × items) matrix:
    ∂/∂h_t = w_t (softmax_t·E − E[y_t]). That order ran faster than separate
    max/exp/sum/scale passes over the chunk
    (experiments/README.md#fused-softmax). Returns the weighted loss and, not
    differentiable, each row's cross-entropy. With a `dtype` of bfloat16 the GEMMs run in
    it (several times the fp32 rate on CPUs with AVX512-BF16:
    experiments/README.md#bf16-scoring); the softmax
    accumulates in fp32. `absent` (bool per item, else None) sets those items' logits to
    −inf: no probability, so no gradient through them (cold items, `SASRec.absent`).

    `extra` (an item adapter's `ScoringExtra`, else None) adds z·Lᵀ to the logits, so each
    user scores against their own E + Δ_u without a per-user table ever being built; the
    gradients of its `z` and, per user, of its `lstack` are formed in the same pass from
    the chunk's softmax: ∂/∂z_t = w_t (softmax_t·L − L[y_t]) and
    ∂/∂L_u = Σ_{t of u} w_t (softmax_t − onehot(y_t))ᵀ z_t.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, w: torch.Tensor, chunk: int,
                dtype: torch.dtype, absent: torch.Tensor | None, extra: ScoringExtra | None, z: torch.Tensor | None,
                lstack: torch.Tensor | None):  # fmt: skip
        rows, items = h.shape[0], table.shape[0]
        ce = torch.empty(rows, dtype=h.dtype, device=h.device)
        grad = torch.empty_like(h)
        grad_z = torch.empty_like(z) if z is not None else None
        grad_l = torch.zeros_like(lstack) if lstack is not None else None
        table_c = table.to(dtype)
        logits = torch.empty(min(chunk, rows), items, dtype=dtype, device=h.device)
        probs = torch.empty_like(logits)
        spans = user_spans(extra.row_user, lstack.shape[0]) if lstack is not None else None
        for s in range(0, rows, chunk):
            e = min(s + chunk, rows)
            yc = targets[s:e]
            lc, pc = logits[: e - s], probs[: e - s]
            torch.mm(h[s:e].to(dtype), table_c.T, out=lc)
            plain = lc.clone() if extra is not None and extra.kind == "affine" else None  # the logits it rescales
            if extra is not None:
                _add_extra_logits(extra, lc, s, e, spans)
            if absent is not None:
                lc.masked_fill_(absent, float("-inf"))
            torch.softmax(lc, dim=1, out=pc)
            picked = pc.gather(1, yc[:, None])[:, 0].to(h.dtype)
            ce[s:e] = -picked.log()
            tiny = (picked < 1e-30).nonzero()[:, 0]  # p_y underflowed: the loss from the logits themselves
            if len(tiny):
                lt = lc[tiny].to(h.dtype)
                ce[s + tiny] = lt.logsumexp(1) - lt.gather(1, yc[tiny, None])[:, 0]
            expected = torch.mm(pc, table_c).to(h.dtype)  # softmax · E
            wc = w[s:e, None]
            grad[s:e] = (expected - table[yc]) * wc
            if extra is not None:
                _extra_grads(extra, pc, yc, wc, s, e, spans, grad_z, grad_l, plain, table)
        ctx.save_for_backward(grad, grad_z, grad_l)
        ctx.mark_non_differentiable(ce)
        return (ce * w).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_ce: torch.Tensor):
        grad, grad_z, grad_l = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss for g in (grad_z, grad_l)]
        return grad * grad_loss, None, None, None, None, None, None, None, *scaled


def user_spans(row_user: torch.Tensor, users: int) -> list[tuple[int, int, int]]:
    """(user, first row, end row) of each user's rows; rows are grouped by user."""
    ends = torch.bincount(row_user, minlength=users).cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    return [(u, a, b) for u, (a, b) in enumerate(zip(starts, ends)) if b > a]


def in_chunk(spans: list[tuple[int, int, int]], s: int, e: int):
    """Each user's part of rows [s, e): (user, first, end)."""
    for u, a, b in spans:
        if b > s and a < e:
            yield u, max(a, s), min(b, e)


def _add_extra_logits(extra: ScoringExtra, lc: torch.Tensor, s: int, e: int, spans) -> None:
    z = extra.z
    if extra.kind == "cols":
        lc.index_add_(1, extra.cols, z[s:e].to(lc.dtype))
    elif extra.kind == "sparse":
        lc.add_(torch.sparse.mm(extra.L, z[s:e].T).T.to(lc.dtype))
    elif extra.kind == "dense":
        lc.addmm_(z[s:e].to(lc.dtype), extra.L.T.to(lc.dtype))
    elif extra.kind == "affine":
        for u, a, b in in_chunk(spans, s, e):
            sb = extra.lstack[u].to(lc.dtype)
            lc[a - s : b - s].mul_(1 + sb[:, 0]).add_(sb[:, 1])
    else:
        for u, a, b in in_chunk(spans, s, e):
            lc[a - s : b - s].addmm_(z[a:b].to(lc.dtype), extra.lstack[u].T.to(lc.dtype))


def _extra_grads(extra: ScoringExtra, pc: torch.Tensor, yc: torch.Tensor, wc: torch.Tensor, s: int, e: int,
                 spans, grad_z: torch.Tensor, grad_l: torch.Tensor | None, plain: torch.Tensor | None = None,
                 table: torch.Tensor | None = None) -> None:  # fmt: skip
    """`plain`: the chunk's logits before an affine adapter rescaled them; `table`: the frozen E."""
    z = extra.z
    if extra.kind == "cols":
        gz = pc.index_select(1, extra.cols).to(z.dtype)
        pos = extra.col_pos[yc]
        hit = (pos >= 0).nonzero()[:, 0]
        gz[hit, pos[hit]] -= 1.0
        grad_z[s:e] = gz * wc
    elif extra.kind == "sparse":
        k = z.shape[1]
        expected = torch.sparse.mm(extra.LT, pc.T.to(z.dtype)).T  # softmax · L
        at_target = torch.zeros(e - s, k + 1, dtype=z.dtype, device=z.device)
        at_target.scatter_add_(1, extra.pad_idx[yc], extra.pad_w[yc].to(z.dtype))
        grad_z[s:e] = (expected - at_target[:, :k]) * wc
    elif extra.kind == "dense":
        grad_z[s:e] = (pc.to(z.dtype) @ extra.L - extra.L[yc]) * wc  # softmax · L − L[target]
    elif extra.kind == "affine":
        for u, a, b in in_chunk(spans, s, e):
            scale, y_u, w_u = extra.lstack[u][:, 0].detach(), yc[a - s : b - s], wc[a - s : b - s]
            r = pc[a - s : b - s].to(z.dtype) * w_u  # w·(p − e): the logits' gradient
            r[torch.arange(len(y_u), device=r.device), y_u] -= w_u[:, 0]
            grad_l[u][:, 0] += (r * plain[a - s : b - s].to(r.dtype)).sum(0)  # ∂/∂s: the plain logit times r
            grad_l[u][:, 1] += r.sum(0)
            grad_z[a:b] = (r * scale) @ table  # the scale's share of ∂/∂h: Σ_j r_j s_j E_j
    else:
        for u, a, b in in_chunk(spans, s, e):
            lu, p_u, y_u = extra.lstack[u], pc[a - s : b - s].to(z.dtype), yc[a - s : b - s]
            w_u = wc[a - s : b - s]
            grad_z[a:b] = (p_u @ lu - lu[y_u]) * w_u
            wz = z[a:b].detach() * w_u
            grad_l[u].addmm_(p_u.T, wz).index_add_(0, y_u, wz, alpha=-1.0)
