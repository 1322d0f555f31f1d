"""Summing clipped user updates and applying them with a server optimizer.

The sum is the unit that moves: a cohort worker adds up its users' clipped, weighted
updates and replies with the sum and the counts, which is exactly what a secure sum
over users would reveal. Adding worker sums gives the cohort sum, in any placement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedrec.model.types import AdapterState


REJECTED = "rejected-"  # prefix of the reply's counts of users left out, one key per reason
NON_FINITE = "non-finite"  # an update with NaN or Inf


@dataclass
class UpdateSum:
    """Σ_u w_u·clip(Δ_u) over some users, with the counts needed to normalize it."""

    delta: AdapterState = field(default_factory=dict)
    num_users: int = 0
    weight: float = 0.0
    loss_sum: float = 0.0
    num_clipped: int = 0
    norm_sum: float = 0.0
    # Σ (w·‖clipped Δ‖)² and Σ w²: with the sum itself they give the signal-to-noise meter's
    # estimate of what the users agree on (fedrec.privacy.snr); NaN where not known (SecAgg+)
    sq_norm_sum: float = 0.0
    sq_weight_sum: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)  # users left out of the sum, by reason
    num_dropped: int = 0  # sampled users who never reported (client-dropout)
    # distributed DP under SecAgg+: `delta` is the devices' field sum, noised on the devices,
    # for the mechanism to decode (fedrec.privacy.distributed); never a sum without noise
    encoded: bool = False

    def reject(self, reason: str, users: int = 1) -> None:
        if users:
            self.rejected[reason] = self.rejected.get(reason, 0) + users

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def add_user(self, delta: AdapterState, weight: float, loss: float, norm: float, clipped: bool,
                 clipped_norm: float | None = None) -> None:  # fmt: skip
        """`norm` is the update's norm before clipping, `clipped_norm` after (default: `norm`)."""
        if not self.delta:
            self.delta = {k: v.detach().to(torch.float32).clone() * weight for k, v in delta.items()}
        else:
            for k, v in delta.items():
                self.delta[k].add_(v.detach().to(torch.float32), alpha=weight)
        self.num_users += 1
        self.weight += weight
        self.loss_sum += loss
        self.norm_sum += norm
        self.sq_norm_sum += (weight * (norm if clipped_norm is None else clipped_norm)) ** 2
        self.sq_weight_sum += weight**2
        self.num_clipped += int(clipped)

    def merge(self, other: UpdateSum) -> None:
        for reason, n in other.rejected.items():
            self.reject(reason, n)
        self.num_dropped += other.num_dropped
        if other.num_users == 0:
            return
        if not self.delta:
            self.delta = {k: v.clone() for k, v in other.delta.items()}
        else:
            if self.delta.keys() != other.delta.keys():
                raise ValueError("update sums hold different adapter tensors")
            for k, v in other.delta.items():
                self.delta[k].add_(v)
        self.num_users += other.num_users
        self.weight += other.weight
        self.loss_sum += other.loss_sum
        self.norm_sum += other.norm_sum
        self.sq_norm_sum += other.sq_norm_sum
        self.sq_weight_sum += other.sq_weight_sum
        self.num_clipped += other.num_clipped

    def counts(self) -> dict[str, float]:
        return {
            "num-users": float(self.num_users),
            "weight": self.weight,
            "loss-sum": self.loss_sum,
            "norm-sum": self.norm_sum,
            "sq-norm-sum": self.sq_norm_sum,
            "sq-weight-sum": self.sq_weight_sum,
            "num-clipped": float(self.num_clipped),
            "num-dropped": float(self.num_dropped),
        } | {f"{REJECTED}{reason}": float(n) for reason, n in self.rejected.items()}

    @classmethod
    def from_parts(cls, delta: AdapterState, counts: dict[str, float]) -> UpdateSum:
        return cls(
            delta=delta,
            num_users=int(counts["num-users"]),
            weight=float(counts["weight"]),
            loss_sum=float(counts["loss-sum"]),
            norm_sum=float(counts.get("norm-sum", 0.0)),
            sq_norm_sum=float(counts.get("sq-norm-sum", math.nan)),
            sq_weight_sum=float(counts.get("sq-weight-sum", math.nan)),
            num_clipped=int(counts.get("num-clipped", 0)),
            rejected={k[len(REJECTED) :]: int(v) for k, v in counts.items() if k.startswith(REJECTED)},
            num_dropped=int(counts.get("num-dropped", 0)),
        )


class ServerOptimizer:
    """Applies the normalized cohort update as a pseudo-gradient (FedOpt, Reddi et al. 2021).

    torch.optim does the arithmetic: the negated mean update is the gradient, so `sgd`
    with server-learning-rate 1 is plain FedAvg, with `momentum` FedAvgM (Hsu et al. 2019),
    and `adam` is FedAdam.
    """

    def __init__(self, initial: AdapterState, kind: str, lr: float, momentum: float = 0.0) -> None:
        self.params = {k: torch.nn.Parameter(v.detach().to(torch.float32).clone()) for k, v in initial.items()}
        plist = list(self.params.values())
        if kind == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(plist, lr=lr, momentum=momentum)
        elif kind == "adam":
            self.opt = torch.optim.Adam(plist, lr=lr, betas=(0.9, 0.99), eps=1e-6)
        else:
            raise ValueError(f"unknown server optimizer {kind!r}")

    def step(self, mean_update: AdapterState) -> AdapterState:
        """Tensors absent from the update (frozen factors, e.g. A under lora-train=b-only) stay put."""
        unknown = set(mean_update) - set(self.params)
        if unknown:
            raise ValueError(f"update has tensors the adapter lacks: {sorted(unknown)[:3]}")
        for k, p in self.params.items():
            p.grad = -mean_update[k].to(p.dtype) if k in mean_update else None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return self.state()

    def state(self) -> AdapterState:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def state_dict(self) -> dict:
        """The parameters and torch's optimizer state (Adam's moments, SGD's momentum buffer)."""
        return {"params": self.state(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state["params"]) != set(self.params):
            raise ValueError("checkpoint: the server optimizer's tensors differ from this run's adapter")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["params"][k])
        self.opt.load_state_dict(state["optimizer"])


def mean_update(total: UpdateSum) -> AdapterState:
    """Σ w·Δ / Σ w; the privacy issue swaps in a data-independent denominator."""
    if total.weight <= 0:
        raise ValueError("cannot normalize an empty update sum")
    return {k: v / total.weight for k, v in total.delta.items()}
