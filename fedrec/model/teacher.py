"""A teacher: a trained sequential recommender that populations of users are drawn from
(`dataset=teacher`).

How many users a private run needs depends on how much real users' updates agree, which a
hand-made process (fedrec.data.synthetic) need not reproduce. A teacher trained on a real
dataset carries its statistics instead: a drawn user starts from the real first-item
distribution, takes a length from the real length distribution, and draws each next item
from the teacher's softmax at a temperature (τ < 1 sharper, more regular users; τ > 1 more
random ones), never an item already in the sequence where the real data have no repeats.

The teacher file (made by `python -m fedrec.teacher`) holds the model's weights and shape,
those two distributions, the catalogue, and what it was trained on (the data file's digest,
the split), so that a population drawn from it can carry the real dataset's public users and
base.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.data.ragged import Ragged
from fedrec.model.sasrec import SASRec
from fedrec.progress import Ticker

# Bumped when the same teacher and knobs draw other sequences, so no cached population of an
# older draw is reused.
SAMPLER_VERSION = 2
BLOCK = 2048  # users drawn together: bounds the (users × items) score matrix (~100 MB at 12k items)
SHAPE_KEYS = ("num_items", "max_seq_len", "hidden_size", "num_blocks", "num_heads")


@dataclass
class Teacher:
    model: SASRec  # eval mode, frozen
    first_items: np.ndarray  # P(first item = i+1), shape (num_items,)
    length_values: np.ndarray  # the real sequence lengths that occur ...
    length_probs: np.ndarray  # ... and how often
    repeats: bool  # whether a real user ever has an item twice
    meta: dict[str, Any]  # what it was trained on (fedrec.teacher writes it)
    digest: str  # of the file: a population's cache key

    @property
    def num_items(self) -> int:
        return self.model.num_items


def real_statistics(sequences: Sequence[np.ndarray], num_items: int) -> dict[str, Any]:
    """The first-item and length distributions of real users, and whether they repeat items."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    first = np.bincount(np.array([int(s[0]) for s in sequences]) - 1, minlength=num_items).astype(np.float64)
    values, counts = np.unique(lengths, return_counts=True)
    repeats = any(len(np.unique(s)) < len(s) for s in sequences)
    return {"first_items": first / first.sum(), "length_values": values, "length_probs": counts / counts.sum(),
            "repeats": repeats}  # fmt: skip


def save_teacher(path: Path, model: SASRec, stats: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write the teacher file atomically (a concurrent reader sees the old or the whole new one)."""
    shape = {"num_items": model.num_items, "max_seq_len": model.max_seq_len, "hidden_size": model.item_emb.embedding_dim,
             "num_blocks": len(model.blocks), "num_heads": model.blocks[0].attn.heads}  # fmt: skip
    blob = {"version": SAMPLER_VERSION, "state": model.state_dict(), "shape": shape, "meta": meta,
            "first_items": torch.from_numpy(np.asarray(stats["first_items"], dtype=np.float64)),
            "length_values": torch.from_numpy(np.asarray(stats["length_values"], dtype=np.int64)),
            "length_probs": torch.from_numpy(np.asarray(stats["length_probs"], dtype=np.float64)),
            "repeats": bool(stats["repeats"])}  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def cached_teacher(path: str | Path) -> Teacher:
    """`load_teacher`, once per process and file version (workers ask on every message)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return _cached(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _cached(path: str, _mtime_ns: int, _size: int) -> Teacher:
    return load_teacher(Path(path))


def real_data_config(cfg: Any) -> Any:
    """A `dataset=teacher` config's real data: the file kind its teacher was trained on, read
    from `data-path` (its public users, catalogue and base are the teacher population's)."""
    return cfg.replace(dataset=cached_teacher(cfg.teacher_path).meta["dataset"], teacher_path="")


def load_teacher(path: Path) -> Teacher:
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"teacher-path: '{path}' is not a teacher file ({e})") from None
    if not isinstance(blob, dict) or "shape" not in blob or "state" not in blob:
        raise ValueError(f"teacher-path: '{path}' is not a teacher file (make one with python -m fedrec.teacher)")
    shape = blob["shape"]
    model = SASRec(num_items=shape["num_items"], max_seq_len=shape["max_seq_len"], hidden_size=shape["hidden_size"],
                   num_blocks=shape["num_blocks"], num_heads=shape["num_heads"], dropout=0.0)  # fmt: skip
    model.load_state_dict(blob["state"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "blake2b").hexdigest()[:16]
    return Teacher(model=model, first_items=blob["first_items"].numpy(), length_values=blob["length_values"].numpy(),
                   length_probs=blob["length_probs"].numpy(), repeats=bool(blob["repeats"]), meta=dict(blob["meta"]),
                   digest=digest)  # fmt: skip


@torch.no_grad()
def next_item_probs(teacher: Teacher, prefixes: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution the sampler draws the next item from after each prefix (rows of
    equal length, 1-based ids): the teacher's softmax at `temperature` over the items not
    yet in the prefix (or all, where the real data repeat items). Column j is item j+1."""
    logits = _next_logits(teacher, prefixes, temperature)
    return torch.softmax(logits, dim=1)


def _next_logits(teacher: Teacher, seqs: torch.Tensor, temperature: float) -> torch.Tensor:
    model = teacher.model
    logits = model.item_scores(last_hidden(model, seqs[:, -model.max_seq_len :])) / temperature
    if not teacher.repeats:
        logits.scatter_(1, seqs - 1, float("-inf"))
    return logits


def last_hidden(model: SASRec, seqs: torch.Tensor) -> torch.Tensor:
    """`model(seqs)[:, -1]` in eval mode for rows without padding, at less cost.

    Written out here, not taken from SASRec.forward, because the draw of a large population
    is this call, millions of times: rows without padding need no mask (the attention runs
    its causal kernel), and the last block needs its query, attention and feed-forward only
    at the last position. tests/test_teacher.py holds it equal to the model's forward."""
    b, n = seqs.shape
    pos = torch.arange(n, device=seqs.device) + (model.max_seq_len - n)
    x = F.embedding(seqs, model.item_table()) * model.scale + model.pos_emb(pos)
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        attn, h = block.attn, block.ln1(x)
        d = h.shape[-1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], attn.heads, d // attn.heads).transpose(1, 2)

        k, v = heads(attn.k_proj(h)), heads(attn.v_proj(h))
        if i < last:
            out = F.scaled_dot_product_attention(heads(attn.q_proj(h)), k, v, is_causal=True)
        else:  # the last position's query sees every position: no mask
            x = x[:, -1:]
            out = F.scaled_dot_product_attention(heads(attn.q_proj(h[:, -1:])), k, v)
        x = x + attn.out_proj(out.transpose(1, 2).reshape(b, x.shape[1], d))
        x = x + block.fc2(F.gelu(block.fc1(block.ln2(x))))
    return model.ln_out(x)[:, 0]


def draw_population(teacher: Teacher, num_users: int, temperature: float, seed: int,
                    log: Callable[[str], None] = print) -> Ragged:  # fmt: skip
    """The first `num_users` users of the population `draw_blocks` draws."""
    blocks = draw_blocks(teacher, range(-(-num_users // BLOCK)), temperature, seed, log)
    return Ragged.from_ends(blocks.flat, blocks.ends[:num_users])


@torch.no_grad()
def draw_blocks(teacher: Teacher, blocks: range, temperature: float, seed: int,
                log: Callable[[str], None] = print) -> Ragged:  # fmt: skip
    """Blocks of `BLOCK` users (1-based item ids), block b seeded by (seed, b) alone.

    A population of N users is the first N of its blocks, so a smaller population is a
    prefix of a larger one: growing a cached population draws only the new blocks. Within
    a block the users are sorted by length, so the users still drawing at step t are a
    prefix of the block (a slice, not a gather); every step runs the teacher once on the
    block's live prefixes and draws all their next items at once.
    """
    if temperature <= 0:
        raise ValueError(f"teacher-temperature must be > 0, got {temperature}")
    n_items = teacher.num_items
    values = teacher.length_values if teacher.repeats else np.minimum(teacher.length_values, n_items)
    parts, all_lengths = [], []
    ticker = Ticker("  drawing users", len(blocks) * BLOCK, log)
    for b in blocks:
        rng = np.random.default_rng([seed, 0x7EAC, b])
        lengths = rng.choice(values, size=BLOCK, p=teacher.length_probs)
        firsts = rng.choice(n_items, size=BLOCK, p=teacher.first_items) + 1
        parts.append(_draw_block(teacher, lengths, firsts, temperature, int(rng.integers(2**62))))
        all_lengths.append(lengths)
        ticker.advance(BLOCK)
    ticker.close("")
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    ends = np.cumsum(np.concatenate(all_lengths), dtype=np.int64) if parts else np.zeros(0, dtype=np.int64)
    return Ragged.from_ends(flat, ends)


def _draw_block(teacher: Teacher, lengths: np.ndarray, firsts: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    """The block's sequences laid end to end, in the block's order."""
    gen = torch.Generator().manual_seed(seed)
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    width = int(sorted_len[0])
    seq = torch.zeros((len(lengths), width), dtype=torch.long)
    seq[:, 0] = torch.from_numpy(firsts[order])
    for t in range(1, width):
        live = int(np.searchsorted(-sorted_len, -t, side="left"))  # users longer than t
        # Inverse-CDF draw from the softmax, in place: one exp and one cumulative sum per
        # score; the Gumbel-max trick's two logarithms per score took ~3× as long.
        cdf = _next_logits(teacher, seq[:live, :t], temperature)
        cdf.sub_(cdf.max(dim=1, keepdim=True).values).exp_()
        torch.cumsum(cdf, dim=1, out=cdf)
        u = torch.rand((live, 1), generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).squeeze(1)
        seq[:live, t] = pick.clamp_(max=cdf.shape[1] - 1) + 1
    rows = np.empty_like(order)
    rows[order] = np.arange(len(order))
    back = seq.numpy()[rows]
    keep = np.arange(width)[None, :] < lengths[:, None]
    return back[keep].astype(np.int32)
