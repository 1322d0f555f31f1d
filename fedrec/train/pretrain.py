"""Centralized training: the base model's pretraining on public users, and the ceilings' loop."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedrec.cohort import seeded_sample
from fedrec.interrupt import check
from fedrec.config import FedRecConfig
from fedrec.data.split import SplitData
from fedrec.metrics import metric_means
from fedrec.model.base import base_path, new_model
from fedrec.model.item_adapters import ItemAdapter, TextItems
from fedrec.progress import Ticker
from fedrec.train.batches import next_item_batch
from fedrec.train.evaluate import evaluate_users


@dataclass(frozen=True)
class Fitting:
    """Centralized training's settings: Adam at `lr` over minibatches of `batch_size` whole
    sequences for up to `epochs` epochs. `patience` > 0 (with a validation score) stops after
    that many epochs without improvement, but not before `min_epochs`, and not while the
    mean training loss fell by at least `loss_tolerance` (a share) over those epochs."""

    epochs: int
    lr: float
    batch_size: int
    max_seq_len: int
    seed: int
    device: torch.device
    patience: int = 0
    min_epochs: int = 0
    label_smoothing: float = 0.0
    loss_tolerance: float = 0.0

    @classmethod
    def pretraining(cls, cfg: FedRecConfig) -> Fitting:
        """The base's pretraining on public users (on the CPU)."""
        return cls(
            epochs=cfg.pretrain_epochs, lr=cfg.pretrain_learning_rate, batch_size=cfg.batch_size,
            max_seq_len=cfg.max_seq_len, seed=cfg.data_seed_value, device=torch.device("cpu"), patience=cfg.pretrain_patience,
            # A small public set's validation is noisy on the early plateau, where patience alone
            # stopped the default synthetic base far below what it reaches.
            # Nor does a falling loss: validation on few public users is noisy enough that five
            # epochs without a new best came while the base was far from trained.
            min_epochs=cfg.pretrain_min_epochs, label_smoothing=cfg.pretrain_label_smoothing,
            loss_tolerance=cfg.pretrain_loss_tolerance,
        )  # fmt: skip


def fit_sequences(model: nn.Module, seqs: list[np.ndarray], params: list[nn.Parameter], fit: Fitting, *,
                  validate: Callable[[], float] | None = None,
                  on_epoch: Callable[[int, float, float | None], None] | None = None) -> int:  # fmt: skip
    """Centralized next-item training with Adam over minibatches of whole sequences.

    With `validate` (higher is better) and `fit.patience` > 0, stops early (`Fitting`) and
    restores the best epoch's weights, the starting weights (epoch 0) included; returns the
    epoch whose weights the model ends with. `on_epoch` gets (epoch, mean loss, validation
    score or None).
    """
    usable = [s for s in seqs if len(s) >= 2]
    if not usable or fit.epochs == 0:
        return 0
    stopping = validate is not None and fit.patience > 0
    best_score, best_epoch, best_state = float("-inf"), 0, None
    if stopping:  # epoch 0, the starting point, is a candidate too
        best_score, best_state = validate(), {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses: list[float] = []
    rng = np.random.default_rng([fit.seed, 0xF17])
    torch.manual_seed(fit.seed)
    opt = torch.optim.Adam(params, lr=fit.lr)
    for epoch in range(fit.epochs):
        # Fresh random batches every epoch. Fixed batches of similar length (less padding)
        # trained worse: the same batches every epoch, each of users of one length, left
        # validation NDCG@10 on a lower plateau (experiments/README.md#batching).
        loss = _fit_epoch(model, opt, [usable[i] for i in rng.permutation(len(usable))], fit)
        losses.append(loss)
        score = validate() if stopping else None
        if on_epoch:
            on_epoch(epoch + 1, loss, score)
        if score is not None:
            if score > best_score:
                best_score, best_epoch = score, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch + 1 - best_epoch >= fit.patience and epoch + 1 >= fit.min_epochs and not _falling(losses, fit):
                break
    if best_state is not None:
        model.load_state_dict(best_state)
        return best_epoch
    return fit.epochs


def _falling(losses: list[float], fit: Fitting) -> bool:
    """Whether the loss fell by at least `fit.loss_tolerance` over the last `fit.patience` epochs."""
    if fit.loss_tolerance <= 0 or len(losses) <= fit.patience:
        return False
    before = losses[-1 - fit.patience]
    return (before - losses[-1]) >= fit.loss_tolerance * abs(before)


def _fit_epoch(model: nn.Module, opt: torch.optim.Optimizer, seqs: list[np.ndarray], fit: Fitting) -> float:
    """One pass over `seqs` in minibatches, in their order; the mean minibatch loss."""
    model.train()
    total, n = 0.0, 0
    for start in range(0, len(seqs), fit.batch_size):
        check("during centralized training (pretraining or a ceiling); none of it was kept: run the same command again")
        inputs, targets = next_item_batch(seqs[start : start + fit.batch_size], fit.max_seq_len)
        loss = model.loss(inputs.to(fit.device), targets.to(fit.device), fit.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        n += 1
    return total / max(n, 1)


def pretraining_users(public: np.ndarray, cap: int, seed: int) -> list[int]:
    """The public users the base trains on: all of them, or a seeded sample of `cap` so
    that pretraining does not dominate a run on a large population."""
    return [int(u) for u in seeded_sample(public, cap, seed, 0x9E7)]


def ensure_base(cfg: FedRecConfig, data: SplitData, log: Callable[[str], None] = print,
                text: torch.Tensor | None = None) -> Path:  # fmt: skip
    """Pretrain the base on public users unless a cached copy exists; return its path.

    With item texts (`text`, items × 384) the item table is E·P (+ the ID table under
    id+text), P a projection learned here; the table is then baked into the base's item
    embedding, so the frozen base is a plain SASRec and the federated `text` adapter moves P.
    """
    path = base_path(cfg)
    if path.exists():
        log(f"base model: cached {path}")
        return path
    torch.manual_seed(cfg.data_seed_value)
    model = new_model(cfg, data.num_items)
    # Public users train on all but their last item, which picks the stopping epoch:
    # an over-trained base is over-confident on new users, and LoRA on the projections
    # cannot undo that (the final LayerNorm fixes the logit scale).
    hook = None
    if text is not None:
        hook = attach_text_items(model, text, with_ids=cfg.item_encoder == "id+text", id_dropout=cfg.id_dropout)
    public = pretraining_users(data.public, cfg.pretrain_users, cfg.data_seed_value)
    seqs = data.public_sequences(public)
    model.set_absent(data.cold)  # cold items never train: not as an input, a target or a softmax negative
    capped = f" (a seeded sample of the {len(data.public):,}: pretrain-users)" if len(public) < len(data.public) else ""
    log(f"base model: pretraining on {len(seqs):,} public users{capped}, up to {cfg.pretrain_epochs} epochs")

    def validate() -> float:
        sums = evaluate_users(model, data, public, "test", max_seq_len=cfg.max_seq_len, device=torch.device("cpu"))
        return metric_means(sums)["ndcg@10"]

    # A bar in a terminal, a line per tenth of the epochs in a log file (fedrec.progress).
    ticker = Ticker("  pretraining", cfg.pretrain_epochs, log)
    seen = [0]

    def on_epoch(epoch: int, loss: float, score: float | None) -> None:
        seen[0] = epoch
        ticker.advance(1, f"epoch {epoch} loss {loss:.4f} public held-out NDCG@10 {score or 0.0:.4f}")

    best = fit_sequences(model, seqs, [p for p in model.parameters() if p.requires_grad], Fitting.pretraining(cfg),
                         validate=validate, on_epoch=on_epoch)  # fmt: skip
    ticker.close(f"stopped after epoch {seen[0]} of {cfg.pretrain_epochs}" if seen[0] < cfg.pretrain_epochs else "")
    log(f"base model: keeping epoch {best} (of {seen[0]} run)")
    if text is not None:  # bake E·P (+ ID rows) into the table: the base is a plain SASRec again
        model.eval()
        with torch.no_grad():
            model.item_emb.weight.copy_(model.item_table())
        model.item_delta = None
        model.item_emb.weight.requires_grad_(True)
        hook.remove()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: concurrent readers see the old or the whole new file
    log(f"base model: saved {path}")
    return path


def attach_text_items(model: nn.Module, text: torch.Tensor, with_ids: bool, id_dropout: float):
    """Make the model's item table `_PretrainTextItems`, with a new ID-dropout draw before
    every forward pass; returns the hook's handle, to remove once the table is baked."""
    items = _PretrainTextItems(model, text, with_ids=with_ids, id_dropout=id_dropout)
    model.item_delta = items
    return model.register_forward_pre_hook(lambda _m, _a: items.resample())


class _PretrainTextItems(ItemAdapter):
    """The item table while pretraining text items: E·P, plus ID rows R under id+text.

    P (384 × d) trains from a small random start; the model's own ID table stays zero and
    frozen, so an item that never trains (a cold item) keeps exactly its text's row. Under
    id+text each step drops a random share of the items' ID rows (the same rows at the input
    and in the softmax), so the model learns to rank items that have only their text, as
    cold items do at test time: with every ID row kept, cold items scored below every warm
    one (experiments/README.md#items-as-text). This is the input dropout of
    DropoutNet (Volkovs et al., NeurIPS 2017) applied to item IDs; nothing is rescaled, as
    a warm item at test time has its whole ID row.
    """

    def __init__(self, model: nn.Module, text: torch.Tensor, with_ids: bool, id_dropout: float) -> None:
        d = model.item_emb.embedding_dim
        super().__init__(model.num_items, d)  # SASRec.item_delta's type; it changes the table, not the scores
        self.text = TextItems(model.num_items, d, text, init_std=text.shape[1] ** -0.5)
        self.ids = nn.Parameter(torch.zeros(model.num_items + 1, d)) if with_ids else None
        self.id_dropout = id_dropout
        self.keep: torch.Tensor | None = None
        with torch.no_grad():
            model.item_emb.weight.zero_()
        model.item_emb.weight.requires_grad_(False)

    def resample(self) -> None:
        """A new set of kept ID rows, once per forward pass (training only)."""
        if self.ids is not None and self.training and self.id_dropout > 0:
            self.keep = (torch.rand(self.ids.shape[0], 1) >= self.id_dropout).to(self.ids.dtype)
        else:
            self.keep = None

    def delta(self) -> torch.Tensor:
        table = self.text.delta()
        if self.ids is None:
            return table
        ids = self.ids[1:] if self.keep is None else self.ids[1:] * self.keep[1:]
        return table + torch.cat([ids.new_zeros(1, ids.shape[1]), ids])
