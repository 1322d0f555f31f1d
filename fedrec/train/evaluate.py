"""Full-ranking evaluation: each user's rank of their held-out item among all items."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedrec.config import FedRecConfig
from fedrec.data.split import SplitData
from fedrec.local_state import UserStateStore, is_local, local_store_for
from fedrec.metrics import KS, SAMPLED_PREFIX, metric_sums, sample_negatives, target_ranks
from fedrec.model.lora import adapter_parameters, load_adapter_state
from fedrec.model.types import AdapterState
from fedrec.train.batches import pad_left
from fedrec.train.groups import own_state_hidden


def rank_with_adapter(
    cfg: FedRecConfig, model: nn.Module, adapter: AdapterState, data: SplitData, users: Sequence[int], split: str,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """`rank_users` with the run's adapter loaded: the one evaluation of a worker, a device
    and the in-process port (each user's own state, under lora-share=a-only, included)."""
    load_adapter_state(model, {k: v.to(device) for k, v in adapter.items()})
    return rank_users(model, data, users, split, max_seq_len=cfg.max_seq_len, device=device,
                      local_store=local_store_for(cfg))  # fmt: skip


@torch.no_grad()
def rank_users(
    model: nn.Module,
    data: SplitData,
    users: Sequence[int],
    split: str,
    *,
    max_seq_len: int,
    device: torch.device,
    batch_size: int = 256,
    local_store: UserStateStore | None = None,
    last_hidden: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's 0-based rank of their target among all items, and among 100 sampled
    unseen items (both aligned with `users`).

    Items already in the user's history are excluded from the ranking (RecBole's
    full-sort protocol); the target itself always stays in. The sampled ranks are for
    the `sampled100-` metrics of older papers only. `last_hidden(users, inputs)` replaces
    the model's forward pass (each user with their own adapter: `fedrec.train.alone`).
    """
    if last_hidden is None and local_store is not None and model.get_base_model().item_delta is not None:
        return _rank_with_own_state(model, data, users, split, local_store, max_seq_len=max_seq_len, device=device)
    if last_hidden is None and local_store is not None:  # each user's own B, many users per batch
        last_hidden = own_state_hidden(model, local_store)
    elif last_hidden is None:
        model.eval()

        def forward(_users: list[int], inputs: torch.Tensor) -> torch.Tensor:
            return model(inputs)[:, -1, :]

        last_hidden = forward

    ranks, sampled_ranks = [], []
    users = list(users)
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        hists = [data.history(u, split) for u in chunk]
        inputs = pad_left(hists, max_seq_len).to(device)
        hidden = last_hidden(chunk, inputs)
        scores = model.item_scores(hidden).float()
        exclude = torch.zeros_like(scores, dtype=torch.bool)
        for row, h in enumerate(hists):
            exclude[row, torch.as_tensor(h - 1, device=device)] = True
        targets = torch.as_tensor([data.target(u, split) for u in chunk], device=device)
        exclude[torch.arange(len(chunk), device=device), targets - 1] = False
        ranks.append(target_ranks(scores, targets, exclude).cpu())
        target_scores = scores.gather(1, (targets - 1)[:, None])[:, 0].cpu()
        for row, (u, h) in enumerate(zip(chunk, hists)):
            negatives = torch.as_tensor(sample_negatives(u, h, data.target(u, split), data.num_items), device=device)
            sampled_ranks.append(int((scores[row, negatives - 1].cpu() > target_scores[row]).sum()))
    full = torch.cat(ranks).numpy().astype(np.int64) if ranks else np.zeros(0, dtype=np.int64)
    return full, np.asarray(sampled_ranks, dtype=np.int64)


def rank_sums(ranks: np.ndarray, sampled: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """The summable metrics of `rank_users`' ranks (what a worker replies with)."""
    if not len(ranks):
        return {"count": 0.0}
    return metric_sums(ranks, ks) | metric_sums(sampled, ks, prefix=SAMPLED_PREFIX)


def evaluate_users(
    model: nn.Module, data: SplitData, users: Sequence[int], split: str, *, ks: tuple[int, ...] = KS, **rank_kwargs
) -> dict[str, float]:
    """Sums of HR@K / NDCG@K over `users`, ranking the target against all items (`rank_users`)."""
    full, sampled = rank_users(model, data, users, split, **rank_kwargs)
    return rank_sums(full, sampled, ks)


def _rank_with_own_state(
    model: nn.Module, data: SplitData, users: Sequence[int], split: str, store: UserStateStore, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """One user at a time, each with their own B (the global B where they never trained).

    Only for models with an item-table delta, which the batched path does not cover.
    """
    params = {k: p for k, p in adapter_parameters(model).items() if is_local(k)}
    global_b = {k: p.detach().clone() for k, p in params.items()}
    full, sampled = [], []
    try:
        for u in users:
            own = store.load(u) or global_b
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(own[k])
            f, s = rank_users(model, data, [u], split, **kwargs)
            full.append(f)
            sampled.append(s)
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(global_b[k])
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(full), cat(sampled)
