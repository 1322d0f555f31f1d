"""One call that trains a share of a cohort with the engine the config names.

Every place that trains users (the ClientApp, the in-process port, the benchmarks) goes
through here, so the engines' arguments are assembled once (`fedrec.train.settings`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedrec.aggregate import UpdateSum
from fedrec.cohort import dropped_out
from fedrec.config import FedRecConfig
from fedrec.data.split import SplitData
from fedrec.local_state import local_store_for
from fedrec.model.types import AdapterState
from fedrec.train.loop import train_users
from fedrec.train.settings import LocalTraining, RoundContext
from fedrec.train.vectorized import train_users_vectorized


def train_cohort(
    cfg: FedRecConfig,
    model: nn.Module,
    global_state: AdapterState,
    data: SplitData,
    users: Sequence[int],
    *,
    round_: int,
    clipping_norm: float,
    device: torch.device,
) -> UpdateSum:
    """The sum of `users`' clipped, weighted updates from `global_state` (`local-engine`).

    With `client-dropout` > 0 some users fail to report, as devices do: they are counted,
    not trained.
    """
    lost = dropped_out(users, cfg.client_dropout, cfg.seed, round_)
    users = [int(u) for u in users if int(u) not in lost]
    global_state = {k: v.to(device) for k, v in global_state.items()}
    ctx = RoundContext(round=round_, clipping_norm=clipping_norm, device=device, local_store=local_store_for(cfg))
    engine = train_users_vectorized if cfg.vectorized else train_users
    total = engine(model, global_state, data, users, LocalTraining.from_config(cfg), ctx)
    total.num_dropped += len(lost)
    return total
