"""The Gaussian mechanism on the server's sum of clipped updates."""

from __future__ import annotations

import numpy as np
import torch

from fedrec.model.lora import AdapterState


def noise_seed(seed: int, round_: int) -> int:
    return int(np.random.SeedSequence([seed, round_, 0x9015E]).generate_state(1)[0])


def add_gaussian_noise(total: AdapterState, std: float, seed: int, round_: int) -> AdapterState:
    """total + N(0, std²) per coordinate, once per round, from the run's seed.

    Keys are visited in sorted order so the draw does not depend on dict order.
    """
    gen = torch.Generator().manual_seed(noise_seed(seed, round_))
    out = {}
    for k in sorted(total):
        v = total[k]
        out[k] = v + torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype) * std
    return out
