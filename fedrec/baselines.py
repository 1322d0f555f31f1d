"""Non-learned reference recommenders, evaluated with the same protocol as the model."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MostPopular(nn.Module):
    """Scores every item by its interaction count in the given sequences.

    Shaped like SASRec for `evaluate_users` (forward gives a dummy hidden state,
    `item_scores` the counts), so the baseline goes through the identical ranking code.
    """

    def __init__(self, sequences: list[np.ndarray], num_items: int) -> None:
        super().__init__()
        counts = np.bincount(np.concatenate(sequences), minlength=num_items + 1)[1:] if sequences else np.zeros(num_items)
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32))

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*seqs.shape, 1, device=seqs.device)

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.counts.expand(hidden.shape[0], -1)
