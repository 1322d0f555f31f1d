"""Train many users at once: per-user LoRA adapters stacked along a batch dimension.

Why not a loop over users: one user's step is a handful of small GEMMs plus Python and
autograd overhead per op, so a loop runs far below the machine's GEMM rate. Here the
frozen base's projections run as one GEMM over every token of every user in a group,
the adapters as batched matmuls (one small matrix per user), and the scoring layer as
one GEMM over all positions that have a target. Users never mix: the loss is the sum of
per-user mean losses, so the gradient of each user's slice of the stack is exactly that
user's own gradient, and clipping is applied per user before the sum.

Measured against torch.func's `vmap(grad(functional_call))` over the peft model (which
needs a fixed-shape loss, so it scores padding too): 772 vs 475 users/s, per-user loop
211 (experiments/bench_vectorize_methods.py, 300 users, 1 thread, dropout off).

Dropout (the base's, as in the loop's train mode) is drawn per user from that user's own
seed at that user's own length, so a user trains identically in any group, on any worker,
in any placement. The per-user loop of `fedrec.train` is the reference it is tested
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

from fedrec.aggregate import UpdateSum
from fedrec.data.split import SplitData
from fedrec.local_state import UserStateStore, is_local
from fedrec.model.lora import AdapterState, adapter_parameters, adapter_state
from fedrec.model.sasrec import SASRec
from fedrec.privacy.clipping import CLIP_SHAVE
from fedrec.train import next_item_batch, user_seed


@dataclass
class _Linear:
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora: tuple[str, str, float] | None  # (key of A, key of B, scaling) in the adapter state


class _DropoutMasks:
    """Each user's dropout masks, drawn from the user's own generator at the user's own length.

    Per step a user draws one vector: their (n_u, d) masks for every activation site, then
    their (heads, n_u, n_u) attention masks, in forward order. One slice copy per user and
    kind lays it into the group's left-padded buffers; padding stays 1 (it never reaches a
    real position).
    """

    def __init__(self, lengths: np.ndarray, n: int, d: int, heads: int, blocks: int, p: float,
                 seeds: Sequence[int], device: torch.device) -> None:  # fmt: skip
        self.p, self.device, self.blocks = p, device, blocks
        self.lengths = [int(k) for k in lengths]
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.vec = torch.ones(1 + 3 * blocks, len(seeds), n, d)
        self.att = torch.ones(blocks, len(seeds), heads, n, n)
        self.draws = [((1 + 3 * blocks) * k * d, blocks * heads * k * k) for k in self.lengths]
        self.scratch = torch.empty(max((a + b for a, b in self.draws), default=0))

    def draw(self) -> list[torch.Tensor]:
        vec, att = self.vec, self.att
        for row, (k, (nv, na), g) in enumerate(zip(self.lengths, self.draws, self.gens)):
            if k == 0:
                continue
            r = torch.rand(nv + na, generator=g, out=self.scratch[: nv + na])
            vec[:, row, -k:, :] = r[:nv].view(vec.shape[0], k, vec.shape[-1])
            att[:, row, :, -k:, -k:] = r[nv:].view(att.shape[0], att.shape[2], k, k)
        scale = 1.0 / (1.0 - self.p)
        vmask = (vec >= self.p).to(self.device, torch.float32).mul_(scale)
        amask = (att >= self.p).to(self.device, torch.float32).mul_(scale)
        # forward order: embedding, then per block attention probs, attention out, fc1, fc2
        out = [vmask[0]]
        for b in range(self.blocks):
            out += [amask[b], vmask[1 + 3 * b], vmask[2 + 3 * b], vmask[3 + 3 * b]]
        return out


class FrozenBase:
    """The frozen base's tensors, read once from the peft model, plus where each adapter sits."""

    def __init__(self, model: PeftModel) -> None:
        sasrec: SASRec = model.get_base_model()
        if sasrec.item_delta is not None:
            raise ValueError("the vectorized engine does not train lora-item-rank; use local-engine=loop")
        self.model = sasrec
        self.heads = sasrec.blocks[0].attn.heads
        self.dropout = float(sasrec.emb_drop.p)
        # The scoring table as its own contiguous copy: GEMMs against the row-offset view
        # `weight[1:]` ran up to 25% slower in a micro-benchmark on this CPU.
        self.table = sasrec.item_emb.weight[1:].contiguous()
        self.blocks = []
        for i, block in enumerate(sasrec.blocks):
            prefix = f"base_model.model.blocks.{i}."
            lin = {
                name: self._linear(getattr(block.attn, name), prefix + f"attn.{name}.")
                for name in ("q_proj", "k_proj", "v_proj", "out_proj")
            }
            lin |= {name: self._linear(getattr(block, name), prefix + f"{name}.") for name in ("fc1", "fc2")}
            self.blocks.append((block.ln1, block.ln2, lin))

    @staticmethod
    def _linear(module: torch.nn.Module, key: str) -> _Linear:
        if isinstance(module, LoraLayer):
            base = module.base_layer
            lora = (key + "lora_A.weight", key + "lora_B.weight", float(module.scaling["default"]))
            return _Linear(base.weight, base.bias, lora)
        return _Linear(module.weight, module.bias, None)

    def hidden(
        self, seqs: torch.Tensor, stack: dict[str, torch.Tensor], drop: _DropoutMasks | None = None
    ) -> torch.Tensor:
        """SASRec's forward with user u's adapter taken from row u of `stack`; dropout from `drop`."""
        m = self.model
        u, n = seqs.shape
        valid = seqs > 0
        pos = torch.arange(n, device=seqs.device) + (m.max_seq_len - n)
        masks = iter(drop.draw() if drop is not None else ())

        def dropped(t: torch.Tensor) -> torch.Tensor:
            return t * next(masks) if drop is not None else t

        x = dropped(F.embedding(seqs, m.item_emb.weight) * m.scale + m.pos_emb.weight[pos]) * valid.unsqueeze(-1)
        causal = torch.ones(n, n, dtype=torch.bool, device=seqs.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=seqs.device)
        mask = ((causal & valid[:, None, :]) | eye).unsqueeze(1)
        d = x.shape[-1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(u, n, self.heads, d // self.heads).transpose(1, 2)

        for ln1, ln2, lin in self.blocks:
            h = F.layer_norm(x, (d,), ln1.weight, ln1.bias, ln1.eps)
            q, k, v = (self._apply(lin[name], h, stack) for name in ("q_proj", "k_proj", "v_proj"))
            if drop is None:
                att = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
            else:  # SDPA draws its own dropout; ours must come from each user's generator
                scores = (heads(q) @ heads(k).transpose(-1, -2)) * (d // self.heads) ** -0.5
                att = dropped(scores.masked_fill(~mask, float("-inf")).softmax(-1)) @ heads(v)
            x = x + dropped(self._apply(lin["out_proj"], att.transpose(1, 2).reshape(u, n, d), stack))
            h = F.layer_norm(x, (d,), ln2.weight, ln2.bias, ln2.eps)
            x = x + dropped(self._apply(lin["fc2"], dropped(F.gelu(self._apply(lin["fc1"], h, stack))), stack))
        ln = m.ln_out
        return F.layer_norm(x, (d,), ln.weight, ln.bias, ln.eps)

    @staticmethod
    def _apply(lin: _Linear, x: torch.Tensor, stack: dict[str, torch.Tensor]) -> torch.Tensor:
        y = F.linear(x, lin.weight, lin.bias)  # one GEMM over all users' tokens
        if lin.lora is None:
            return y
        a, b, scaling = lin.lora
        # (U, n, in) @ (U, in, r) @ (U, r, out): each user's own low-rank path.
        return torch.baddbmm(y, torch.bmm(x, stack[a].transpose(1, 2)), stack[b].transpose(1, 2), alpha=scaling)


class _FrozenTableCrossEntropy(torch.autograd.Function):
    """Σ_t w_t · CE(h_t · Eᵀ, y_t) with E frozen, in row chunks that stay in cache.

    Written here because no maintained CPU kernel does this (Liger's fused linear
    cross-entropy is Triton/GPU-only): the (positions × items) logits are never held
    whole, and since E needs no gradient, ∂loss/∂h is computed in the same pass and kept.
    Returns the weighted loss and, not differentiable, each row's cross-entropy. With a
    `dtype` of bfloat16 the two GEMMs run in it (4x the fp32 rate on CPUs with
    AVX512-BF16, measured) while the softmax and the loss stay in fp32.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, w: torch.Tensor, chunk: int,
                dtype: torch.dtype):  # fmt: skip
        ce = torch.empty(h.shape[0], dtype=h.dtype, device=h.device)
        grad = torch.empty_like(h)
        low = dtype != h.dtype
        table_c = table.to(dtype)
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s : s + chunk], targets[s : s + chunk]
            logits = (hc.to(dtype) @ table_c.T).to(h.dtype) if low else hc @ table.T
            top = logits.amax(dim=1, keepdim=True)
            picked = logits.gather(1, yc[:, None])[:, 0]
            probs = logits.sub_(top).exp_()  # one exp pass, in place on the logits buffer
            total = probs.sum(dim=1)
            ce[s : s + chunk] = total.log() + top[:, 0] - picked
            wc = w[s : s + chunk]
            probs.mul_((wc / total)[:, None])  # w·softmax
            probs[torch.arange(len(yc), device=h.device), yc] -= wc  # w·(softmax - onehot)
            if low:
                grad[s : s + chunk] = probs.to(dtype) @ table_c
            else:
                torch.mm(probs, table, out=grad[s : s + chunk])
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce)
        return (ce * w).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_ce: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None


def _loss_per_user(base: FrozenBase, stack, inputs, targets, chunk: int, dtype: torch.dtype, drop: _DropoutMasks | None):
    """(Σ_u mean-CE_u, mean-CE_u per user); only positions with a target are scored."""
    hidden = base.hidden(inputs, stack, drop)
    keep = targets > 0
    rows = keep.nonzero()[:, 0]
    inv_count = 1.0 / keep.sum(dim=1).clamp(min=1).to(torch.float32)
    table = base.table
    loss, ce = _FrozenTableCrossEntropy.apply(hidden[keep], table, targets[keep] - 1, inv_count[rows], chunk, dtype)
    per_user = torch.zeros(len(inputs), device=ce.device).index_add_(0, rows, ce) * inv_count
    return loss, per_user


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


def length_groups(lengths: Sequence[int], max_len: int, tokens: int) -> list[np.ndarray]:
    """Indices grouped by similar length, each group padded to at most `tokens` tokens."""
    clipped = np.minimum(np.asarray(lengths), max_len)
    order = np.argsort(-clipped, kind="stable")
    groups, start = [], 0
    while start < len(order):
        width = max(1, int(clipped[order[start]]))
        size = max(1, tokens // width)
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
    chunk: int = 256,
    scoring_dtype: torch.dtype = torch.float32,
) -> UpdateSum:
    """Same contract and same result (to float tolerance) as `fedrec.train.train_users`.

    `group_tokens` bounds a group's padded tokens (8192 was fastest on this CPU, 16384
    within 10%); `chunk` is the scoring layer's rows per GEMM.
    """
    base = FrozenBase(model)
    trainable = list(adapter_parameters(model))
    local_keys = [k for k in trainable if is_local(k)] if local_store is not None else []
    shared = [k for k in trainable if k not in local_keys]
    users = [int(u) for u in users]
    total = UpdateSum()
    sums = {k: torch.zeros_like(global_state[k], dtype=torch.float32) for k in shared}
    lengths = [len(data.train[u]) - 1 for u in users]
    for idx in length_groups(lengths, max_seq_len, group_tokens):
        group = [users[i] for i in idx]
        inputs, targets = next_item_batch([data.train[u] for u in group], max_seq_len)
        inputs, targets = inputs.to(device), targets.to(device)
        n_targets = (targets > 0).sum(dim=1)
        stack = {k: v.expand(len(group), *v.shape).clone() for k, v in global_state.items()}
        for row, u in enumerate(group if local_keys else []):
            own = local_store.load(u)
            for k in local_keys if own else []:
                stack[k][row] = own[k].to(device)
        params = [stack[k].requires_grad_() for k in trainable]
        first_loss = torch.zeros(len(group), device=device)
        drop = None
        if base.dropout > 0:
            seeds = [user_seed(seed, round_, u) for u in group]
            d = base.model.item_emb.embedding_dim
            real = (inputs > 0).sum(dim=1).cpu().numpy()
            drop = _DropoutMasks(real, inputs.shape[1], d, base.heads, len(base.blocks), base.dropout, seeds, device)
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
            clipped = (norm > clipping_norm) if clipping_norm > 0 else torch.zeros_like(norm, dtype=torch.bool)
            scale = torch.where(clipped, clipping_norm / norm * CLIP_SHAVE, torch.ones_like(norm))
            weight = torch.ones_like(norm) if user_weighting == "uniform" else n_targets.double()
            coef = (scale * weight).to(torch.float32)
            for k in shared:
                sums[k] += torch.einsum("u,u...->...", coef, delta[k])
            for row, u in enumerate(group if local_keys else []):
                local_store.save(u, {k: stack[k][row] for k in local_keys})
        total.num_users += len(group)
        total.weight += float(weight.sum())
        total.loss_sum += float(first_loss.sum())
        total.norm_sum += float(norm.sum())
        total.num_clipped += int(clipped.sum())
    total.delta = {k: v.cpu() for k, v in sums.items()} if users else {}
    return total
