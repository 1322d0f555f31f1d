"""Local training of users, centralized training loops, and full-ranking evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedrec.aggregate import UpdateSum
from fedrec.data.split import SplitData
from fedrec.local_state import UserStateStore, is_local
from fedrec.metrics import KS, SAMPLED_PREFIX, metric_sums, sample_negatives, target_ranks
from fedrec.model.lora import AdapterState, adapter_parameters
from fedrec.privacy.clipping import clip_update


def pad_left(seqs: Sequence[np.ndarray], length: int) -> torch.Tensor:
    """Left-pad (or left-truncate) each sequence to `length` with 0."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[i, length - len(s) :] = s
    return torch.from_numpy(out)


def next_item_batch(seqs: Sequence[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs s[:-1] and targets s[1:], padded only to the longest sequence in the batch."""
    n = max(1, min(max_len, max(len(s) - 1 for s in seqs)))
    return pad_left([s[:-1] for s in seqs], n), pad_left([s[1:] for s in seqs], n)


def user_seed(seed: int, round_: int, user: int) -> int:
    """Per-(run, round, user) seed: the same user trains identically on any worker."""
    return int(np.random.SeedSequence([seed, round_, user]).generate_state(1)[0])


def train_users(
    model: nn.Module,
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
) -> UpdateSum:
    """Train each user from the global adapter on their own sequence; sum clipped updates.

    One user's local training is `local_epochs` full-batch SGD steps on their training
    sequence (all positions). The update is clipped per user before it joins the sum.
    The reported loss is the one before the first local step: after it, the loss mostly
    measures how well one user's own sequence was memorized. With `local_store`
    (lora-share=a-only) each user starts from and keeps their own B; only the other
    tensors' updates join the sum.
    """
    params = adapter_parameters(model)
    names = list(params)
    plist = [params[k] for k in names]
    local_keys = [k for k in names if is_local(k)] if local_store is not None else []
    shared = [k for k in names if k not in local_keys]
    model.train()
    total = UpdateSum()
    for user in users:
        seq = data.train[user]
        inputs, targets = next_item_batch([seq], max_seq_len)
        inputs, targets = inputs.to(device), targets.to(device)
        n_targets = int((targets > 0).sum())
        with torch.no_grad():
            for k in names:
                params[k].copy_(global_state[k])
            own = local_store.load(user) if local_store is not None else None
            for k in local_keys if own else []:
                params[k].copy_(own[k])
        torch.manual_seed(user_seed(seed, round_, user))
        loss_value = 0.0
        if n_targets:
            for epoch in range(local_epochs):
                loss = model.loss(inputs, targets)
                grads = torch.autograd.grad(loss, plist)
                with torch.no_grad():
                    for p, g in zip(plist, grads):
                        p.sub_(g, alpha=learning_rate)
                if epoch == 0:  # the global adapter's loss on this user, before adapting to it
                    loss_value = float(loss.detach())
        with torch.no_grad():
            delta = {k: (params[k] - global_state[k]).cpu() for k in shared}
        if local_store is not None:
            local_store.save(user, {k: params[k] for k in local_keys})
        delta, norm = clip_update(delta, clipping_norm)
        weight = 1.0 if user_weighting == "uniform" else float(n_targets)
        total.add_user(delta, weight, loss_value, norm, clipped=clipping_norm > 0 and norm > clipping_norm)
    return total


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
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's 0-based rank of their target among all items, and among 100 sampled
    unseen items (both aligned with `users`).

    Items already in the user's history are excluded from the ranking (RecBole's
    full-sort protocol); the target itself always stays in. The sampled ranks are for
    the `sampled100-` metrics of older papers only.
    """
    if local_store is not None and model.get_base_model().item_delta is not None:
        return _rank_with_own_state(model, data, users, split, local_store, max_seq_len=max_seq_len, device=device)
    if local_store is not None:  # each user's own B, many users per batch (vectorized imports this module)
        from fedrec.vectorized import own_state_hidden

        last_hidden = own_state_hidden(model, local_store)
    else:
        model.eval()

        def last_hidden(_users: list[int], inputs: torch.Tensor) -> torch.Tensor:
            return model(inputs)[:, -1, :]

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
    model: nn.Module,
    data: SplitData,
    users: Sequence[int],
    split: str,
    *,
    max_seq_len: int,
    device: torch.device,
    batch_size: int = 256,
    ks: tuple[int, ...] = KS,
    local_store: UserStateStore | None = None,
) -> dict[str, float]:
    """Sums of HR@K / NDCG@K over `users`, ranking the target against all items (`rank_users`)."""
    full, sampled = rank_users(model, data, users, split, max_seq_len=max_seq_len, device=device,
                               batch_size=batch_size, local_store=local_store)  # fmt: skip
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


def fit_sequences(
    model: nn.Module,
    seqs: list[np.ndarray],
    params: list[nn.Parameter],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    max_seq_len: int,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
    validate: Callable[[], float] | None = None,
    patience: int = 0,
) -> int:
    """Centralized next-item training with Adam over minibatches of whole sequences.

    With `validate` (higher is better) and `patience` > 0, stops after `patience`
    epochs without improvement and restores the best epoch's weights, the starting
    weights (epoch 0) included; returns the epoch whose weights the model ends with. `on_epoch` gets (epoch, mean loss,
    validation score or None).
    """
    usable = [s for s in seqs if len(s) >= 2]
    if not usable or epochs == 0:
        return 0
    best_score, best_epoch, best_state = float("-inf"), 0, None
    if validate is not None and patience > 0:  # epoch 0, the starting point, is a candidate too
        best_score, best_state = validate(), {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng([seed, 0xF17])
    torch.manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    for epoch in range(epochs):
        model.train()
        total, n = 0.0, 0
        # Fresh random batches every epoch. Fixed batches of similar length (less padding)
        # trained worse: on Beauty from scratch, validation NDCG@10 plateaued at 0.060
        # against 0.067 (experiments/README.md).
        order = rng.permutation(len(usable))
        for start in range(0, len(order), batch_size):
            inputs, targets = next_item_batch([usable[i] for i in order[start : start + batch_size]], max_seq_len)
            loss = model.loss(inputs.to(device), targets.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            n += 1
        score = validate() if validate is not None and patience > 0 else None
        if on_epoch:
            on_epoch(epoch + 1, total / max(n, 1), score)
        if score is not None:
            if score > best_score:
                best_score, best_epoch = score, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch + 1 - best_epoch >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
        return best_epoch
    return epochs
