"""A SASRec-class causal transformer for next-item prediction, in plain PyTorch.

Every projection is an `nn.Linear` (q/k/v/out, fc1/fc2) so that peft can attach LoRA
to it and Opacus can compute per-example gradients through it; torch's
`nn.MultiheadAttention` keeps q/k/v in one raw parameter and would hide them from both.
Scores are the final hidden state against the item-embedding table (tied output), as in
SASRec (Kang & McAuley, ICDM 2018).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedrec.model.item_adapters import ItemAdapter


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(x)),
            split(self.k_proj(x)),
            split(self.v_proj(x)),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads, dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask))
        return x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.ln2(x))))))


class SASRec(nn.Module):
    """Input: left-padded item ids (0 = padding), shape (B, L). Output: hidden (B, L, d)."""

    def __init__(
        self,
        num_items: int,
        max_seq_len: int = 50,
        hidden_size: int = 64,
        num_blocks: int = 2,
        num_heads: int = 2,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.max_seq_len = max_seq_len
        self.item_emb = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
        self.pos_emb = nn.Embedding(max_seq_len, hidden_size)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, dropout) for _ in range(num_blocks))
        self.ln_out = nn.LayerNorm(hidden_size)
        self.scale = math.sqrt(hidden_size)
        self.item_delta: ItemAdapter | None = None  # an item-side adapter (fedrec.model.item_adapters)
        # Items 1..N outside the training catalogue (bool, N): cold items, which arrive after
        # training. Training's softmax leaves them out, as it would a product not yet listed;
        # without this every training step pushed them down as negatives that are never
        # targets, and text items' cold targets fell while warm ones rose
        # (experiments/README.md#items-as-text). Scoring for evaluation keeps all.
        self.register_buffer("absent", None, persistent=False)
        nn.init.normal_(self.item_emb.weight, std=hidden_size**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def set_dropout(self, p: float) -> None:
        """Every dropout of the model at rate p (the frozen base's local training: `local-dropout`)."""
        self.emb_drop.p = p
        for block in self.blocks:
            block.drop.p = p
            block.attn.dropout = p

    def item_table(self) -> torch.Tensor:
        table = self.item_emb.weight
        delta = None if self.item_delta is None else self.item_delta.delta()
        return table if delta is None else table + delta

    def set_absent(self, items) -> None:
        """Leave `items` (1-based ids) out of the training softmax; empty: none."""
        items = torch.as_tensor(items, dtype=torch.long).flatten()
        if not len(items):
            self.absent = None
            return
        absent = torch.zeros(self.num_items, dtype=torch.bool, device=self.item_emb.weight.device)
        absent[items - 1] = True
        self.absent = absent

    def training_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """`item_scores` with the absent items at -inf (no probability, no gradient)."""
        scores = self.item_scores(hidden)
        return scores if self.absent is None else scores.masked_fill(self.absent, float("-inf"))

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        b, n = seqs.shape
        valid = seqs > 0
        pos = torch.arange(n, device=seqs.device) + (self.max_seq_len - n)
        x = F.embedding(seqs, self.item_table()) * self.scale + self.pos_emb(pos)
        x = self.emb_drop(x) * valid.unsqueeze(-1)
        # A query attends to earlier real items and to itself (so padding rows stay finite).
        causal = torch.ones(n, n, dtype=torch.bool, device=seqs.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=seqs.device)
        mask = (causal & valid[:, None, :]) | eye
        mask = mask.unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_out(x)

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over real items 1..N (column j is item j+1)."""
        scores = hidden @ self.item_table()[1:].T
        return scores if self.item_delta is None else self.item_delta.adjust_scores(scores)

    def per_sequence_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of each sequence over its own targeted positions, shape (B,).

        The per-example loss of DP-SGD: one example is one sequence, and its weight must
        not depend on the other sequences in the batch.
        """
        hidden = self(inputs)
        keep = targets > 0
        ce = F.cross_entropy(self.training_scores(hidden[keep]), targets[keep] - 1, reduction="none")
        rows = keep.nonzero()[:, 0]
        total = torch.zeros(inputs.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
        return total / keep.sum(dim=1).clamp(min=1)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean full-softmax cross-entropy over positions that have a target (>0).

        Only those positions are scored: the scoring GEMM is most of the FLOPs.
        `label_smoothing` spreads that share of each target's mass over the items
        (pretraining's `pretrain-label-smoothing`: a less over-confident base).
        """
        hidden = self(inputs)
        keep = targets > 0
        logits = self.training_scores(hidden[keep])
        if label_smoothing and self.absent is not None:  # no mass on items outside the softmax
            logits = logits.masked_fill(self.absent, -1e9)
        return F.cross_entropy(logits, targets[keep] - 1, label_smoothing=label_smoothing)
