"""Sample-level DP-SGD for a cross-silo client (partition=silo), through Opacus.

This protects *examples* (here: one user's sequence) inside a silo against what the
silo's update reveals; it is not user-level DP across silos, and for a client that is a
single user it protects nothing worth having (keep user-level DP on the server for that).
Only LoRA parameters train: Opacus's per-example gradients are right for them and missing
or wrong for the tied item table (tests/test_dpsgd_gradients.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedrec.aggregate import UpdateSum
from fedrec.config import FedRecConfig
from fedrec.data.split import SplitData
from fedrec.model.lora import adapter_parameters
from fedrec.model.types import AdapterState
from fedrec.privacy.clipping import update_norm
from fedrec.train.batches import next_item_batch

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class SiloTraining:
    """A silo's DP-SGD settings, the same every round. `target_delta` 0: δ = 1 / the silo's users."""

    epochs: int
    learning_rate: float
    noise_multiplier: float
    max_grad_norm: float
    batch_size: int
    target_delta: float
    max_seq_len: int
    seed: int

    @classmethod
    def from_config(cls, cfg: FedRecConfig) -> SiloTraining:
        return cls(
            epochs=cfg.local_epochs, learning_rate=cfg.learning_rate, noise_multiplier=cfg.dpsgd_noise_multiplier,
            max_grad_norm=cfg.dpsgd_max_grad_norm, batch_size=cfg.dpsgd_batch_size, target_delta=cfg.target_delta,
            max_seq_len=cfg.max_seq_len, seed=cfg.seed,
        )  # fmt: skip


def train_silo(model: nn.Module, global_state: AdapterState, data: SplitData, users: Sequence[int],
               silo: SiloTraining, *, round_: int, device: torch.device,
               history: History) -> tuple[UpdateSum, float, History]:  # fmt: skip
    """One silo's local DP-SGD from the global adapter; returns its update, ε and ledger.

    `history` is the silo's Opacus PRV ledger from earlier rounds, so ε composes over the
    whole run, not per round.
    """
    params = adapter_parameters(model)
    names = list(params)
    with torch.no_grad():
        for k in names:
            params[k].copy_(global_state[k])
    seqs = [data.train[int(u)] for u in users if len(data.train[int(u)]) >= 2]
    x, y = next_item_batch(seqs, silo.max_seq_len)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([silo.seed, round_, 0xD9]).generate_state(1)[0]))
    # Dropout draws from torch's global generator; seeded here, a silo trains the same on any
    # worker process (Flower's simulation hands a node's messages to whichever actor is free).
    torch.manual_seed(int(np.random.SeedSequence([silo.seed, round_, 0xD90, *map(int, users[:1])]).generate_state(1)[0]))
    loader = DataLoader(TensorDataset(x, y), batch_size=min(silo.batch_size, len(seqs)), generator=gen)
    engine = PrivacyEngine(accountant="prv")
    engine.accountant.history = list(history)
    optimizer = torch.optim.SGD([params[k] for k in names], lr=silo.learning_rate)
    model.train()  # Opacus refuses a module in eval mode (the cached model may have just evaluated)
    wrapped, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=silo.noise_multiplier,
        max_grad_norm=silo.max_grad_norm, poisson_sampling=True, noise_generator=gen,
    )  # fmt: skip
    sample_rate = 1 / len(loader)
    losses = []
    try:
        for _ in range(silo.epochs):
            for xb, yb in loader:
                if len(xb) == 0:  # an empty Poisson batch is still a step of the mechanism
                    engine.accountant.step(noise_multiplier=silo.noise_multiplier, sample_rate=sample_rate)
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = model.per_sequence_loss(xb.to(device), yb.to(device)).mean()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        epsilon = float(engine.get_epsilon(silo.target_delta or 1.0 / len(users)))
    finally:
        wrapped._close()  # remove Opacus hooks: the cached model is reused next round
    with torch.no_grad():
        update = {k: (params[k] - global_state[k]).detach().cpu() for k in names}
    n = len(users)
    total = UpdateSum(
        delta={k: v * n for k, v in update.items()}, num_users=n, weight=float(n),
        loss_sum=float(np.mean(losses)) * n if losses else 0.0, norm_sum=update_norm(update) * n,
        sq_norm_sum=float("nan"), sq_weight_sum=float("nan"),  # a silo is not a user: no user-level meter
    )  # fmt: skip
    return total, epsilon, list(engine.accountant.history)
