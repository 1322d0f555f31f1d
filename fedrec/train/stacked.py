"""The frozen base's forward for a stack of users, each with their own adapter.

Why a forward of its own: the frozen base's projections run as one GEMM over every token
of every user in a group and the adapters as batched matmuls (one small matrix per user),
where the peft model would run one adapter per module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fedrec.model.item_adapters import ItemAdapter
from fedrec.model.sasrec import SASRec
from fedrec.model.types import ITEM_DELTA
from fedrec.train.dropout import DropoutMasks


ITEM_PREFIX = "base_model.model." + ITEM_DELTA  # the item adapter's keys in an adapter state


@dataclass
class _Linear:
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora: tuple[str, str, float] | None  # (key of A, key of B, scaling) in the adapter state


class FrozenBase:
    """The frozen base's tensors, read once from the peft model, plus where each adapter sits."""

    def __init__(self, model: PeftModel) -> None:
        sasrec: SASRec = model.get_base_model()
        self.model = sasrec
        self.item: ItemAdapter | None = sasrec.item_delta
        self.heads = sasrec.blocks[0].attn.heads
        self.dropout = float(sasrec.emb_drop.p)
        # The scoring table as its own contiguous copy, because GEMMs against the row-offset
        # view `weight[1:]` ran slower in a micro-benchmark
        # (experiments/README.md#contiguous-table).
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
        self, seqs: torch.Tensor, stack: dict[str, torch.Tensor], drop: DropoutMasks | None = None,
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
        return LoraLinear.apply(x, lin.weight, lin.bias, stack[a], stack[b], scaling)


class LoraLinear(torch.autograd.Function):
    """x Wᵀ + bias + s · x Aᵤᵀ Bᵤᵀ for each user u: the frozen base as one GEMM over every
    user's tokens, then each user's own low-rank path added into its result in place.

    Written out for speed: forward + backward of one layer ran clearly faster this way
    than as `baddbmm(F.linear(x), x @ Aᵀ, Bᵀ)` under autograd
    (experiments/README.md#throughput-what-moved). Two things cost: (1) the
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
