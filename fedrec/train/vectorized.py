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
(experiments/bench_vectorize_methods.py; the numbers: experiments/README.md, section
"Throughput: how fast a cohort trains").

Dropout (the base's, as in the loop's train mode) is drawn per user from that user's own
seed at that user's own length, so a user trains identically in any group, on any worker,
in any placement. The per-user loop of `fedrec.train.loop` is the reference it is tested
against (with dropout off, where the two must agree to float tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fedrec.aggregate import NON_FINITE, UpdateSum
from fedrec.data.split import SplitData
from fedrec.local_state import UserStateStore, is_local
from fedrec.model.item_adapters import ItemAdapter, ScoringExtra
from fedrec.model.lora import adapter_parameters, adapter_state
from fedrec.model.sasrec import SASRec
from fedrec.model.types import ITEM_DELTA, AdapterState
from fedrec.privacy.clipping import clip_scales
from fedrec.train.batches import next_item_batch, user_seed


ITEM_PREFIX = "base_model.model." + ITEM_DELTA  # the item adapter's keys in an adapter state
# Bytes of per-user item-adapter stacks one group may hold (the tensors, their gradients and
# the deltas): `table` holds a whole N×d table per user.
ITEM_GROUP_BYTES = 256 * 2**20


@dataclass
class _Linear:
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora: tuple[str, str, float] | None  # (key of A, key of B, scaling) in the adapter state


class _DropoutMasks:
    """Each user's dropout masks, drawn from the user's own generator at the user's own length.

    Per step a user draws one vector of 16-bit random numbers: their (n_u, d) masks for
    every activation site, then their (heads, n_u, n_u) attention masks, in forward order.
    16 bits per mask entry, four from each 64-bit draw, because one 64-bit draw then
    serves four entries where a float draw serves one, which makes drawing the masks much
    cheaper (experiments/README.md, section "Throughput: how fast a cohort trains", "What
    moved"); the price is a drop rate rounded to a multiple of 1/65536. The buffers are laid out user-first, so a user as long as the group's
    width draws straight into their own slabs; a shorter one draws into scratch and is
    copied into the left-padded slices (padding always keeps: it never reaches a real
    position). Either way the same bits land in the same places.
    """

    def __init__(self, lengths: np.ndarray, n: int, d: int, heads: int, blocks: int, p: float,
                 seeds: Sequence[int], device: torch.device) -> None:  # fmt: skip
        self.device, self.blocks, self.n = device, blocks, n
        self.lengths = [int(k) for k in lengths]
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        drops = round(p * 65536)  # bits below the threshold drop: `drops` of the 65536 values
        self.threshold, self.scale = -32768 + drops, 65536 / (65536 - drops)
        self.vec = torch.full((len(seeds), 1 + 3 * blocks, n, d), 32767, dtype=torch.int16)
        self.att = torch.full((len(seeds), blocks, heads, n, n), 32767, dtype=torch.int16)
        self.draws = [((1 + 3 * blocks) * k * d, blocks * heads * k * k) for k in self.lengths]
        longest = max((a + b for a, b in self.draws), default=0)
        self.scratch = torch.empty((longest + 3) // 4, dtype=torch.int64)

    def _keep(self, bits: torch.Tensor) -> torch.Tensor:
        """scale where bits >= threshold, else 0. In float arithmetic, in place on one
        buffer, because that was faster than comparing to a bool tensor and converting it
        (experiments/README.md, section "Measurements behind design choices in the code").
        The bits cross to a GPU as int16, half the bytes of the float mask (a no-op on the
        CPU)."""
        t = self.threshold
        return bits.to(self.device).to(torch.float32).sub_(t - 1).clamp_(0, 1).mul_(self.scale)

    def draw(self) -> list[torch.Tensor]:
        vec, att = self.vec, self.att
        for row, (k, (nv, na), g) in enumerate(zip(self.lengths, self.draws, self.gens)):
            if k == 0:
                continue
            # Full width: the user's slabs are contiguous. With both counts whole 64-bit words,
            # drawing the slabs one after the other gives the scratch path's bits, no copy.
            if k == self.n and nv % 4 == 0 and na % 4 == 0:
                vec[row].view(-1).view(torch.int64).random_(-(2**63), None, generator=g)
                att[row].view(-1).view(torch.int64).random_(-(2**63), None, generator=g)
                continue
            words = self.scratch[: (nv + na + 3) // 4]
            r = words.random_(-(2**63), None, generator=g).view(torch.int16)  # the full 64-bit range
            vec[row, :, -k:, :] = r[:nv].view(vec.shape[1], k, vec.shape[-1])
            att[row, :, :, -k:, -k:] = r[nv : nv + na].view(att.shape[1], att.shape[2], k, k)
        vmask, amask = self._keep(vec), self._keep(att)
        # forward order: embedding, then per block attention probs, attention out, fc1, fc2
        out = [vmask[:, 0]]
        for b in range(self.blocks):
            out += [amask[:, b], vmask[:, 1 + 3 * b], vmask[:, 2 + 3 * b], vmask[:, 3 + 3 * b]]
        return out


class FrozenBase:
    """The frozen base's tensors, read once from the peft model, plus where each adapter sits."""

    def __init__(self, model: PeftModel) -> None:
        sasrec: SASRec = model.get_base_model()
        self.model = sasrec
        self.item: ItemAdapter | None = sasrec.item_delta
        self.heads = sasrec.blocks[0].attn.heads
        self.dropout = float(sasrec.emb_drop.p)
        # The scoring table as its own contiguous copy, because GEMMs against the row-offset
        # view `weight[1:]` ran slower in a micro-benchmark (experiments/README.md, section
        # "Measurements behind design choices in the code").
        self.table = sasrec.item_emb.weight[1:].contiguous()
        self.absent = sasrec.absent  # items outside the training softmax (SASRec.absent), or None
        self.blocks = []
        for i, block in enumerate(sasrec.blocks):
            prefix = f"base_model.model.blocks.{i}."
            lin = {
                name: self._linear(getattr(block.attn, name), prefix + f"attn.{name}.")
                for name in ("q_proj", "k_proj", "v_proj", "out_proj")
            }
            lin |= {name: self._linear(getattr(block, name), prefix + f"{name}.") for name in ("fc1", "fc2")}
            self.blocks.append((block.ln1, block.ln2, lin))

    def item_tensors(self, stack: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The item adapter's per-user stacks, by the adapter's own tensor names."""
        return {k[len(ITEM_PREFIX) :]: v for k, v in stack.items() if k.startswith(ITEM_PREFIX)}

    @staticmethod
    def _linear(module: torch.nn.Module, key: str) -> _Linear:
        if isinstance(module, LoraLayer):
            base = module.base_layer
            lora = (key + "lora_A.weight", key + "lora_B.weight", float(module.scaling["default"]))
            return _Linear(base.weight, base.bias, lora)
        return _Linear(module.weight, module.bias, None)

    def hidden(
        self, seqs: torch.Tensor, stack: dict[str, torch.Tensor], drop: _DropoutMasks | None = None,
        item_lookup: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """SASRec's forward with user u's adapter taken from row u of `stack`; dropout from `drop`.
        `item_lookup` (U, n, d), when given, is the item delta of the lookups.

        Written apart from `SASRec.forward` because that one runs one adapter per module and
        draws dropout from the global generator; a test holds the two equal."""
        m = self.model
        u, n = seqs.shape
        valid = seqs > 0
        pos = torch.arange(n, device=seqs.device) + (m.max_seq_len - n)
        masks = iter(drop.draw() if drop is not None else ())

        def dropped(t: torch.Tensor) -> torch.Tensor:
            return t * next(masks) if drop is not None else t

        emb = F.embedding(seqs, m.item_emb.weight)
        if item_lookup is not None:
            emb = emb + item_lookup
        elif self.item is not None:  # user u's own item delta on the lookups
            extra = self.item.lookup(self.item_tensors(stack), seqs)
            emb = emb if extra is None else emb + extra
        x = dropped(emb * m.scale + m.pos_emb.weight[pos]) * valid.unsqueeze(-1)
        causal = torch.ones(n, n, dtype=torch.bool, device=seqs.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=seqs.device)
        mask = ((causal & valid[:, None, :]) | eye).unsqueeze(1)
        d = x.shape[-1]

        bias = None

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(u, n, self.heads, d // self.heads).transpose(1, 2)

        for ln1, ln2, lin in self.blocks:
            h = F.layer_norm(x, (d,), ln1.weight, ln1.bias, ln1.eps)
            q, k, v = (self._apply(lin[name], h, stack) for name in ("q_proj", "k_proj", "v_proj"))
            if drop is None:
                att = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
            else:  # SDPA draws its own dropout; ours must come from each user's generator
                if bias is None:  # the mask as an additive term, shared by every block
                    bias = torch.zeros(u, 1, n, n, device=seqs.device).masked_fill_(~mask, float("-inf"))
                    bias = bias.expand(u, self.heads, n, n).reshape(-1, n, n)
                qh, kh, vh = (heads(t).reshape(-1, n, d // self.heads) for t in (q, k, v))
                # scale and mask ride in the scores' GEMM: no separate passes over (U·heads, n, n)
                scores = torch.baddbmm(bias, qh, kh.transpose(1, 2), alpha=(d // self.heads) ** -0.5)
                probs = dropped(scores.softmax(-1).view(u, self.heads, n, n))
                att = torch.bmm(probs.view(-1, n, n), vh).view(u, self.heads, n, -1)
            x = x + dropped(self._apply(lin["out_proj"], att.transpose(1, 2).reshape(u, n, d), stack))
            h = F.layer_norm(x, (d,), ln2.weight, ln2.bias, ln2.eps)
            x = x + dropped(self._apply(lin["fc2"], dropped(F.gelu(self._apply(lin["fc1"], h, stack))), stack))
        ln = m.ln_out
        return F.layer_norm(x, (d,), ln.weight, ln.bias, ln.eps)

    @staticmethod
    def _apply(lin: _Linear, x: torch.Tensor, stack: dict[str, torch.Tensor]) -> torch.Tensor:
        if lin.lora is None:
            return F.linear(x, lin.weight, lin.bias)  # one GEMM over all users' tokens
        a, b, scaling = lin.lora
        return _LoraLinear.apply(x, lin.weight, lin.bias, stack[a], stack[b], scaling)


class _LoraLinear(torch.autograd.Function):
    """x Wᵀ + bias + s · x Aᵤᵀ Bᵤᵀ for each user u: the frozen base as one GEMM over every
    user's tokens, then each user's own low-rank path added into its result in place.

    Written out for speed: forward + backward of one layer ran clearly faster this way
    than as `baddbmm(F.linear(x), x @ Aᵀ, Bᵀ)` under autograd (experiments/README.md,
    section "Throughput: how fast a cohort trains", "What moved"). Two things cost: (1) the
    orientation of each batched matmul: with r = 8, products whose result is (r × n) or
    (r × in) ran several times faster than the (n × r) or (in × r) ones autograd picks;
    (2) adding into the base output in place is a view write to autograd, whose backward
    zero-fills and copies the whole output. The base weights are frozen and get no gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float):  # fmt: skip
        users, n, d_in = x.shape
        flat = x.reshape(-1, d_in)
        y = (torch.addmm(bias, flat, weight.T) if bias is not None else flat @ weight.T).view(users, n, -1)
        zt = torch.bmm(a, x.transpose(1, 2))  # (U, r, n)
        y.baddbmm_(zt.transpose(1, 2), b.transpose(1, 2), alpha=scaling)
        ctx.save_for_backward(x, weight, a, b, zt)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, a, b, zt = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        grad = grad.contiguous()
        grad_zt = torch.bmm(b.transpose(1, 2), grad.transpose(1, 2)).mul_(s)  # (U, r, n)
        grad_a = torch.bmm(grad_zt, x) if need_a else None  # (U, r, in); A is frozen under b-only
        grad_b = torch.bmm(zt, grad).mul_(s).transpose(1, 2) if need_b else None  # (U, out, r)
        grad_x = None
        if need_x:
            grad_x = (grad.view(-1, grad.shape[-1]) @ weight).view_as(x)
            grad_x.baddbmm_(grad_zt.transpose(1, 2), a)  # (U, n, in)
        return grad_x, None, None, grad_a, grad_b, None


class _ScoringCrossEntropy(torch.autograd.Function):
    """Σ_t w_t · CE(h_t · Eᵀ + extra_t, y_t) with E frozen, in row chunks that stay in cache.

    Written here because no maintained CPU kernel does this (Liger's fused linear
    cross-entropy is Triton/GPU-only): the (positions × items) logits are never held
    whole, and since E needs no gradient, ∂loss/∂h is computed in the same pass and kept.
    Per chunk: one GEMM for the logits, torch's fused row softmax (max, exp, sum and
    scale while a row sits in L1), one GEMM for softmax·E; the one-hot part and the
    weights are applied to the (rows × d) result, never to the (rows × items) matrix:
    ∂/∂h_t = w_t (softmax_t·E − E[y_t]). That order ran faster than separate
    max/exp/sum/scale passes over the chunk (experiments/README.md, section "Measurements
    behind design choices in the code"). Returns the weighted loss and, not
    differentiable, each row's cross-entropy. With a `dtype` of bfloat16 the GEMMs run in
    it (several times the fp32 rate on CPUs with AVX512-BF16: experiments/README.md,
    section "Throughput: how fast a cohort trains", "bfloat16 scoring"); the softmax
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
        spans = _user_spans(extra.row_user, lstack.shape[0]) if lstack is not None else None
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




def _user_spans(row_user: torch.Tensor, users: int) -> list[tuple[int, int, int]]:
    """(user, first row, end row) of each user's rows; rows are grouped by user."""
    ends = torch.bincount(row_user, minlength=users).cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    return [(u, a, b) for u, (a, b) in enumerate(zip(starts, ends)) if b > a]


def _in_chunk(spans: list[tuple[int, int, int]], s: int, e: int):
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
        for u, a, b in _in_chunk(spans, s, e):
            sb = extra.lstack[u].to(lc.dtype)
            lc[a - s : b - s].mul_(1 + sb[:, 0]).add_(sb[:, 1])
    else:
        for u, a, b in _in_chunk(spans, s, e):
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
        for u, a, b in _in_chunk(spans, s, e):
            scale, y_u, w_u = extra.lstack[u][:, 0].detach(), yc[a - s : b - s], wc[a - s : b - s]
            r = pc[a - s : b - s].to(z.dtype) * w_u  # w·(p − e): the logits' gradient
            r[torch.arange(len(y_u), device=r.device), y_u] -= w_u[:, 0]
            grad_l[u][:, 0] += (r * plain[a - s : b - s].to(r.dtype)).sum(0)  # ∂/∂s: the plain logit times r
            grad_l[u][:, 1] += r.sum(0)
            grad_z[a:b] = (r * scale) @ table  # the scale's share of ∂/∂h: Σ_j r_j s_j E_j
    else:
        for u, a, b in _in_chunk(spans, s, e):
            lu, p_u, y_u = extra.lstack[u], pc[a - s : b - s].to(z.dtype), yc[a - s : b - s]
            w_u = wc[a - s : b - s]
            grad_z[a:b] = (p_u @ lu - lu[y_u]) * w_u
            wz = z[a:b].detach() * w_u
            grad_l[u].addmm_(p_u.T, wz).index_add_(0, y_u, wz, alpha=-1.0)


def _loss_per_user(base: FrozenBase, stack, inputs, targets, chunk: int, dtype: torch.dtype, drop: _DropoutMasks | None):
    """(Σ_u mean-CE_u, mean-CE_u per user); only positions with a target are scored."""
    hidden = base.hidden(inputs, stack, drop)
    keep = targets > 0
    rows = keep.nonzero()[:, 0]
    inv_count = 1.0 / keep.sum(dim=1).clamp(min=1).to(torch.float32)
    extra = base.item.scoring(base.item_tensors(stack), hidden, keep) if base.item is not None else None
    loss, ce = _ScoringCrossEntropy.apply(
        hidden[keep], base.table, targets[keep] - 1, inv_count[rows], chunk, dtype, base.absent, extra,
        None if extra is None else extra.z, None if extra is None else extra.lstack,
    )  # fmt: skip
    per_user = torch.zeros(len(inputs), device=ce.device).index_add_(0, rows, ce) * inv_count
    return loss, per_user


_TABLE_KEY = ITEM_PREFIX + "T"  # the `table` adapter's one tensor


class _SharedTableStep:
    """One local step of `item-adapter=table` for a whole group, without a per-user table.

    Why: in its only local step every user starts from the same global table T, so all
    of them score against one table E + T, as cheap as no item adapter. What differs per
    user is only the gradient G_u of their loss with respect to T, a dense N×d matrix of
    rank ≤ their positions: G_u = Σ_t w_t (p_t − e_{y_t}) h_tᵀ from the scores, plus the
    rows of their own input items from the lookups. Clipping needs only ‖G_u‖, which a few
    Gram matrices give (`user_norms2`), and the round needs only the clipped sum
    Σ_u c_u G_u, which one more pass over the scores forms as a single GEMM
    (`clipped_sum`). The general path instead held a whole N×d table per user and ran
    several times slower on Beauty (experiments/README.md, section "What an item adapter
    costs a worker"). Tested equal to the per-user loop.
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
        self.spans = _user_spans(self.row_user, users)
        self.in_items = [inputs[u][inputs[u] > 0] - 1 for u in range(users)]  # each user's input items, 0-based

    def loss(self, stack: dict[str, torch.Tensor], drop: _DropoutMasks | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.base.hidden(self.inputs, stack, drop, item_lookup=self.lookup)
        h = hidden[self.keep]
        self.h = h.detach()
        loss, ce = _ScoringCrossEntropy.apply(h, self.table, self.y, self.w, self.chunk, self.dtype, self.base.absent,
                                              None, None, None)  # fmt: skip
        per_user = torch.zeros(len(self.inputs), device=ce.device).index_add_(0, self.row_user, ce) * self.inv_count
        return loss, per_user

    def _probs(self):
        """(first row, end row, softmax) over chunks that hold whole users only."""
        table_c = self.table.to(self.dtype)
        start = 0
        while start < len(self.h):
            end = start
            for _u, a, b in _in_chunk(self.spans, start, len(self.h)):  # whole users, up to `chunk` rows
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
            for u, a, b in _in_chunk(self.spans, s, e):
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
        stack = {k: v.expand(len(users), *v.shape).clone() for k, v in shared.items()}
        for row, u in enumerate(users):
            own = store.load(u)
            for k in local_keys if own else []:
                stack[k][row] = own[k].to(inputs.device)
        return base.hidden(inputs, stack)[:, -1, :]

    return last_hidden


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


def train_users_vectorized(
    model: PeftModel,
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
    group_tokens: int = 8192,
    chunk: int | None = None,
    scoring_dtype: torch.dtype = torch.float32,
) -> UpdateSum:
    """Same contract and same result (to float tolerance) as `fedrec.train.train_users`.

    `group_tokens` bounds a group's padded tokens (the default sits inside a broad range
    of sizes that ran alike, above the sizes that ran slower: experiments/README.md,
    section "Throughput: how fast a cohort trains", "Tried, no gain"); `chunk` is the
    scoring layer's rows per GEMM: 128 on CPU, so that the (rows × items) buffers stay
    near L2 size (nearby sizes ran alike: experiments/README.md, section "Measurements
    behind design choices in the code"), 4096 on a GPU, where each chunk is a few kernel
    launches (a guess, not yet measured on a GPU).
    """
    chunk = chunk or (128 if device.type == "cpu" else 4096)
    base = FrozenBase(model)
    trainable = list(adapter_parameters(model))
    local_keys = [k for k in trainable if is_local(k)] if local_store is not None else []
    shared = [k for k in trainable if k not in local_keys]
    users = [int(u) for u in users]
    total = UpdateSum()
    sums = {k: torch.zeros_like(global_state[k], dtype=torch.float32) for k in shared}
    lengths = [len(data.train[u]) - 1 for u in users]
    # Users who keep their own tensors (lora-share=a-only) train them on the general path.
    shared_table = (base.item is not None and base.item.kind == "table" and local_epochs == 1 and not local_keys
                    and _TABLE_KEY in shared)  # fmt: skip
    max_users = None
    if base.item is not None and not shared_table:  # each user holds own item tensors (and grads, deltas)
        per_user = 4 * sum(v.numel() * 4 for k, v in global_state.items() if k.startswith(ITEM_PREFIX))
        max_users = max(1, ITEM_GROUP_BYTES // per_user)
    for idx in length_groups(lengths, max_seq_len, group_tokens, max_users):
        group = [users[i] for i in idx]
        inputs, targets = next_item_batch([data.train[u] for u in group], max_seq_len)
        inputs, targets = inputs.to(device), targets.to(device)
        n_targets = (targets > 0).sum(dim=1)
        if shared_table:
            total.merge(_shared_table_group(base, global_state, trainable, group, inputs, targets, n_targets,
                                            learning_rate=learning_rate, clipping_norm=clipping_norm,
                                            user_weighting=user_weighting, seed=seed, round_=round_, chunk=chunk,
                                            dtype=scoring_dtype, device=device))  # fmt: skip
            continue
        stack = {k: v.expand(len(group), *v.shape).clone() for k, v in global_state.items()}
        for row, u in enumerate(group if local_keys else []):
            own = local_store.load(u)
            for k in local_keys if own else []:
                stack[k][row] = own[k].to(device)
        params = [stack[k].requires_grad_() for k in trainable]
        first_loss = torch.zeros(len(group), device=device)
        drop = _dropout_for(base, group, inputs, seed, round_, device)
        if int(n_targets.sum()):
            for epoch in range(local_epochs):
                loss, per_user = _loss_per_user(base, stack, inputs, targets, chunk, scoring_dtype, drop)
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(g, alpha=learning_rate)
                if epoch == 0:
                    first_loss = per_user
        with torch.no_grad():
            delta = {k: stack[k] - global_state[k] for k in shared}  # shared tensors all start global
            norm = torch.sqrt(sum((d.double() ** 2).flatten(1).sum(1) for d in delta.values()))
            ok = _finite_users(norm, first_loss, [stack[k] for k in local_keys], [delta[k] for k in shared], total)
            clipped, weight, coef = _clip_coefficients(norm, n_targets, clipping_norm, user_weighting, ok)
            for k in shared:
                sums[k] += torch.einsum("u,u...->...", coef, delta[k])
            for row, u in enumerate(group if local_keys else []):
                if ok[row]:
                    local_store.save(u, {k: stack[k][row] for k in local_keys})
        total.num_users += int(ok.sum())
        total.weight += float(weight[ok].sum())
        total.loss_sum += float(first_loss[ok].sum())
        total.norm_sum += float(norm[ok].sum())
        _add_squares(total, coef, norm, weight, ok)
        total.num_clipped += int(clipped[ok].sum())
    if not shared_table:  # the shared-table groups merged their sums into `total` already
        total.delta = sums
    total.delta = {k: v.cpu() for k, v in total.delta.items()} if users else {}
    return total


def _clip_coefficients(norm: torch.Tensor, n_targets: torch.Tensor, clipping_norm: float, user_weighting: str,
                       ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(clipped?, weight, coefficient) per user: each user's update enters the sum times
    its coefficient, the clip scale (`fedrec.privacy.clipping.clip_scales`) times its weight;
    0 for users left out (`ok` false)."""
    clipped, scale = clip_scales(norm, clipping_norm)
    weight = torch.ones_like(norm) if user_weighting == "uniform" else n_targets.double()
    return clipped, weight, torch.where(ok, scale * weight, 0.0).to(torch.float32)


def _add_squares(total: UpdateSum, coef: torch.Tensor, norm: torch.Tensor, weight: torch.Tensor, ok: torch.Tensor) -> None:
    """The meter's Σ (w·‖clipped Δ‖)² and Σ w² over the users kept (coef = w·scale)."""
    total.sq_norm_sum += float(((coef.double() * norm)[ok] ** 2).sum())
    total.sq_weight_sum += float((weight[ok].double() ** 2).sum())


def _finite_users(norm: torch.Tensor, loss: torch.Tensor, own: list[torch.Tensor], rows: list[torch.Tensor],
                  total: UpdateSum) -> torch.Tensor:  # fmt: skip
    """Which users' updates are finite. The others (NaN or Inf: a diverging step) are counted
    as rejected and their rows of `rows` zeroed in place, as a 0 coefficient times NaN is NaN."""
    ok = torch.isfinite(norm) & torch.isfinite(loss.to(norm.device).double())
    for t in own:  # tensors a user keeps (never summed) must be finite too
        ok &= torch.isfinite(t.detach().flatten(1)).all(1).to(ok.device)
    if not bool(ok.all()):
        total.reject(NON_FINITE, int((~ok).sum()))
        for t in rows:
            t[~ok.to(t.device)] = 0
    return ok


def _dropout_for(base: FrozenBase, group: list[int], inputs: torch.Tensor, seed: int, round_: int,
                 device: torch.device) -> _DropoutMasks | None:  # fmt: skip
    if base.dropout <= 0:
        return None
    seeds = [user_seed(seed, round_, u) for u in group]
    real = (inputs > 0).sum(dim=1).cpu().numpy()
    d = base.model.item_emb.embedding_dim
    return _DropoutMasks(real, inputs.shape[1], d, base.heads, len(base.blocks), base.dropout, seeds, device)


def _shared_table_group(base: FrozenBase, global_state: AdapterState, trainable: list[str], group: list[int],
                        inputs: torch.Tensor, targets: torch.Tensor, n_targets: torch.Tensor, *, learning_rate: float,
                        clipping_norm: float, user_weighting: str, seed: int, round_: int, chunk: int,
                        dtype: torch.dtype, device: torch.device) -> UpdateSum:  # fmt: skip
    """One group's clipped, weighted update sum for item-adapter=table with one local step."""
    others = [k for k in trainable if k != _TABLE_KEY]
    stack = {k: v.expand(len(group), *v.shape).clone() for k, v in global_state.items() if k != _TABLE_KEY}
    params = [stack[k].requires_grad_() for k in others]
    step = _SharedTableStep(base, global_state[_TABLE_KEY], inputs, targets, chunk, dtype)
    drop = _dropout_for(base, group, inputs, seed, round_, device)
    first_loss = torch.zeros(len(group), device=device)
    grads = [torch.zeros_like(p) for p in params]
    grad_lookup = torch.zeros_like(step.lookup)
    has_targets = bool(n_targets.sum())
    if has_targets:
        loss, first_loss = step.loss(stack, drop)
        *grads, grad_lookup = torch.autograd.grad(loss, [*params, step.lookup], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    with torch.no_grad():
        lr2 = learning_rate**2
        norm2 = lr2 * step.user_norms2(grad_lookup) if has_targets else torch.zeros(len(group), dtype=torch.float64)
        for g in grads:
            norm2 = norm2 + lr2 * (g.double() ** 2).flatten(1).sum(1)
        norm = torch.sqrt(norm2)
        total = UpdateSum()
        ok = _finite_users(norm, first_loss, [], [*grads, grad_lookup], total)
        clipped, weight, coef = _clip_coefficients(norm, n_targets, clipping_norm, user_weighting, ok)
        delta = {k: torch.einsum("u,u...->...", coef, g) * -learning_rate for k, g in zip(others, grads)}
        delta[_TABLE_KEY] = step.clipped_sum(coef, grad_lookup) * -learning_rate if has_targets else \
            torch.zeros_like(global_state[_TABLE_KEY])
    total.delta = {k: delta[k] for k in trainable}
    total.num_users, total.weight, total.loss_sum = int(ok.sum()), float(weight[ok].sum()), float(first_loss[ok].sum())
    total.norm_sum, total.num_clipped = float(norm[ok].sum()), int(clipped[ok].sum())
    _add_squares(total, coef, norm, weight, ok)
    return total
