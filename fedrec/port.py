"""How a run reaches its clients: Flower's messages (`server.grid_port`) or the same engines
called in this process (`fedrec.inprocess`); the run, its callbacks and its finish only
see this port."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedrec.aggregate import UpdateSum
from fedrec.model.types import AdapterState


@dataclass
class TrainResult:
    """A round's training as the server sees it: the cohort's sum and the nodes' diagnostics."""

    total: UpdateSum
    diagnostics: dict[str, float] = field(default_factory=dict)  # worker memory and time, silo ε


@dataclass
class EvalResult:
    metrics: dict[str, float]  # means over the evaluated users
    ranks: dict[int, int]  # user → rank of their held-out item (bootstrap intervals resample these)


class RoundPort(Protocol):
    """How a run reaches its clients."""

    def train(self, round_: int, cohort: np.ndarray, adapter: AdapterState, clipping_norm: float) -> TrainResult: ...

    def evaluate(self, round_: int, users: np.ndarray, adapter: AdapterState, split: str) -> EvalResult: ...
