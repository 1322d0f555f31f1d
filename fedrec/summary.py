"""A run's summary as a typed record: what `summary.json` holds, read back by attribute.

`summary.json` stays the file format (sweeps, the report and people read it); this class
is its one definition. `to_dict()` writes the keys in the order the file has always had,
and `from_dict()` reads any run's file: federated, centralized or local-only. Keys that
only the other modes write (their ceilings and local-only results) land in `extra`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

Metrics = dict[str, float]  # hr@10, ndcg@10, ... (and `users`)
Intervals = dict[str, list[float]]  # metric → [low, high], 95% over users


@dataclass
class RunSummary:
    mode: str = "federated"
    dataset: str | None = None
    placement: str | None = None
    base_test: Metrics = field(default_factory=dict)
    test: Metrics = field(default_factory=dict)
    base_valid: Metrics = field(default_factory=dict)
    valid: Metrics = field(default_factory=dict)
    best_round: int | None = None
    last_round_test: Metrics = field(default_factory=dict)
    base_test_ci: Intervals = field(default_factory=dict)
    test_ci: Intervals = field(default_factory=dict)
    last_round_test_ci: Intervals = field(default_factory=dict)
    test_gain_ci: Intervals = field(default_factory=dict)  # federated − base, paired by user
    rounds: int | None = None
    selection: str | None = None  # private | last | public: how the result's round was picked
    # Under DP: the round private validation (no noise) would pick, labelled as outside the guarantee.
    diagnostic_private_best: dict[str, Any] | None = None
    # name → (base, federated) test metrics over a subset of users, e.g. cold targets.
    subsets: dict[str, tuple[Metrics, Metrics]] = field(default_factory=dict)
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    sampling_rate: float | None = None
    clipping_norm: float | None = None  # as configured (adaptive clipping moves it: privacy.json)
    adapter_dimension: int | None = None
    noise_to_signal: float | None = None
    silo_epsilon: float | None = None
    users_trained: int | None = None
    users_per_second: float | None = None  # training rounds only, no evaluation
    train_seconds: float | None = None
    ready_seconds: float | None = None  # start to all nodes warm
    round1_at: float | None = None  # wall clock (epoch s) when round 1 started
    server_started_at: float | None = None  # wall clock (epoch s) when the ServerApp started
    worker_peak_rss_mb: float | None = None
    wall_seconds: float | None = None
    adapter_bytes: int | None = None
    adapter_parameters: int | None = None
    private_users: int | None = None
    test_users: int | None = None
    public_users: int | None = None
    num_items: int | None = None
    results_dir: str | None = None
    communication: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None  # fedrec.provenance: commit, packages, machine
    # A what-if run (whatif-population): its ε is a stated population's, simulated (the label says so)
    whatif: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other modes' keys
    # The keys of the file it was read from, in order: `to_dict()` gives that file back.
    read_keys: tuple[str, ...] = field(default=(), repr=False, compare=False)

    _OPTIONAL = ("diagnostic_private_best", "audit", "provenance", "whatif")  # written only when present

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "subsets":
                for name, (base, own) in value.items():
                    out |= {f"base_test_{name}": base, f"test_{name}": own}
            elif f.name == "extra":
                out |= value
            elif f.name != "read_keys" and not (f.name in self._OPTIONAL and value is None):
                out[f.name] = value
        return {k: out[k] for k in self.read_keys if k in out} if self.read_keys else out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        known = {f.name for f in fields(cls)} - {"subsets", "extra", "read_keys"}
        subsets = {k.removeprefix("base_test_"): (data[k], data[f"test_{k.removeprefix('base_test_')}"])
                   for k in data if k.startswith("base_test_") and k not in known
                   and f"test_{k.removeprefix('base_test_')}" in data}  # fmt: skip
        taken = known | {f"base_test_{n}" for n in subsets} | {f"test_{n}" for n in subsets}
        return cls(**{k: data[k] for k in known if k in data}, subsets=subsets,
                   extra={k: v for k, v in data.items() if k not in taken}, read_keys=tuple(data))  # fmt: skip

    def model_metrics(self, key: str) -> tuple[Metrics, Intervals]:
        """A model's test metrics and intervals by its summary key (`test`, `base_test`,
        `test_cold`, `ceiling_full_test`, ...); empty where the run has none."""
        flat = self.to_dict()
        return flat.get(key) or {}, flat.get(f"{key}_ci") or {}

    @property
    def gain_interval(self) -> list[float] | None:
        """The paired interval of the run's gain over the base, NDCG@10 (federated or local-only)."""
        return (self.test_gain_ci or self.extra.get("local_test_gain_ci") or {}).get("ndcg@10")

    def per_user_kb(self, way: str) -> float | None:
        per_user = (self.communication or {}).get("per_user_round") or {}
        return per_user[way] / 1024 if way in per_user else None
