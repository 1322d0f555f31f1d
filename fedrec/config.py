"""The one typed configuration of a fedrec run.

Every knob is a field of `FedRecConfig`. Keys are kebab-case and identical in TOML files,
`flwr run --run-config`, `[tool.flwr.app.config]` and `python -m fedrec.simulate
--run-config`. Values are checked here, before any work starts, so that a typo costs a
one-line error instead of a failed round ten minutes in.

The flat fields stay the one face of the config (hundreds of call sites read
`cfg.num_rounds`); each names its concern in its metadata, and each concern is a small
frozen section (`cfg.privacy`, `cfg.model`, …) that checks its own knobs. Only checks that
span concerns live on `FedRecConfig` itself. Whether named files and optional packages are
present is the machine's business, not the config's: `fedrec.data.load.check_inputs`.

Three modules, importing one way: `fedrec.config_parse` (ConfigError, a value's coercion and
range check, `parse_run_config`) below `fedrec.config_sections` (the choices, the sections
and their own checks) below this one (the flat config and the checks that span sections).
Every name of the first two that callers use is importable from here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from fedrec.config_parse import ConfigError, _choice, _closest, _coerce, _in, _kebab, _range, merge_run_config, parse_run_config
from fedrec.config_sections import (
    ACCOUNTANTS,
    AFFINE_GROUPS,
    CEILINGS,
    DATASETS,
    DEVICES,
    ITEM_ADAPTERS,
    ITEM_BASES,
    ITEM_ENCODERS,
    LORA_TARGET_CHOICES,
    MECHANISMS,
    MODEL_SELECTIONS,
    MODES,
    PLACEMENTS,
    SAMPLINGS,
    SECTIONS,
    SERVER_OPTIMIZERS,
    USER_WEIGHTINGS,
    Adapter,
    Centralized,
    Data,
    Evaluation,
    Local,
    Model,
    Privacy,
    Run,
    SecAgg,
    Server,
    Silo,
    Workers,
    bind,
)

__all__ = [  # the names callers import from here, the lower modules' among them
    "ACCOUNTANTS", "AFFINE_GROUPS", "CEILINGS", "DATASETS", "DEVICES", "ITEM_ADAPTERS", "ITEM_BASES", "ITEM_ENCODERS",
    "LORA_TARGET_CHOICES", "MECHANISMS", "MODEL_SELECTIONS", "MODES", "PLACEMENTS", "RENAMED", "SAMPLINGS", "SECTIONS",
    "SERVER_OPTIMIZERS", "USER_WEIGHTINGS", "ConfigError", "FedRecConfig", "merge_run_config", "parse_run_config",
]  # fmt: skip

# Keys that existed once, with what replaced them.
RENAMED = {"lora-item-rank": "replaced by item-adapter=lowrank with item-rank=R"}


@dataclass(frozen=True)
class FedRecConfig:
    """All knobs of a run. Field names are the snake_case twins of the kebab-case keys; the
    first argument of each field's metadata names the section that checks it."""

    # what to run
    mode: str = field(default="federated", metadata=_choice("run", *MODES))
    seed: int = field(default=0, metadata=_range("run", 0))
    # what draws the data, splits it, pretrains the base and picks the evaluation users
    # (-1 = seed): seeds that vary only training, cohorts and noise share one base
    data_seed: int = field(default=-1, metadata=_range("run", -1))
    output_dir: str = field(default="", metadata=_in("run"))
    overwrite: bool = field(default=False, metadata=_in("run"))  # replace another run's files in output-dir
    cache_dir: str = field(default="", metadata=_in("run"))
    device: str = field(default="cpu", metadata=_choice("run", *DEVICES))
    # per-round metrics, ε, the meter, the config and the summary to TensorBoard (<output-dir>/tensorboard)
    tracking: str = field(default="none", metadata=_choice("run", "none", "tensorboard"))

    # data
    dataset: str = field(default="synthetic", metadata=_choice("data", *DATASETS))
    data_path: str = field(default="", metadata=_in("data"))
    min_user_interactions: int = field(default=3, metadata=_range("data", 3))
    public_fraction: float = field(default=0.1, metadata=_range("data", 0.0, 1.0, lo_open=True))
    synthetic_users: int = field(default=1200, metadata=_range("data", 10))
    synthetic_items: int = field(default=400, metadata=_range("data", 10))
    synthetic_clusters: int = field(default=8, metadata=_range("data", 1))
    synthetic_mean_length: int = field(default=20, metadata=_range("data", 3))
    # generated populations (synthetic, teacher): the first P users are public, drawn the
    # same whatever the population's size, so every size shares one base (0 = public-fraction)
    public_users: int = field(default=0, metadata=_range("data", 0))
    # dataset=teacher: users drawn from a trained recommender (fedrec.model.teacher)
    teacher_path: str = field(default="", metadata=_in("data"))
    teacher_users: int = field(default=0, metadata=_range("data", 0))  # private users drawn; 0 = the real data's
    teacher_temperature: float = field(default=1.0, metadata=_range("data", 0.0, lo_open=True))

    # model and its centralized pretraining on public users
    max_seq_len: int = field(default=50, metadata=_range("model", 2))
    hidden_size: int = field(default=64, metadata=_range("model", 2))
    num_blocks: int = field(default=2, metadata=_range("model", 1))
    num_heads: int = field(default=2, metadata=_range("model", 1))
    dropout: float = field(default=0.2, metadata=_range("model", 0.0, 0.9))
    pretrain_epochs: int = field(default=150, metadata=_range("model", 0))
    pretrain_patience: int = field(default=5, metadata=_range("model", 0))
    pretrain_min_epochs: int = field(default=30, metadata=_range("model", 0))
    # no early stop while the training loss still fell by this share over the patience window
    # (0 = stop on validation alone): the default base once stopped at epoch 38 of a
    # still-falling loss, far below other seeds (experiments/README.md#sturdy-base)
    pretrain_loss_tolerance: float = field(default=0.01, metadata=_range("model", 0.0, 1.0))
    pretrain_users: int = field(default=0, metadata=_range("model", 0))  # 0 = every public user
    pretrain_learning_rate: float = field(default=1e-3, metadata=_range("model", 0.0, lo_open=True))
    # a share of each target's probability spread over all items in pretraining (0 = off):
    # a base less over-confident on users it never saw
    pretrain_label_smoothing: float = field(default=0.0, metadata=_range("model", 0.0, 0.9))
    batch_size: int = field(default=128, metadata=_range("model", 1))

    # LoRA adapter
    lora_rank: int = field(default=8, metadata=_range("adapter", 1))
    lora_alpha: float = field(default=16.0, metadata=_range("adapter", 0.0, lo_open=True))
    lora_targets: str = field(default="q_proj,k_proj,v_proj,out_proj,fc1,fc2", metadata=_in("adapter"))
    # item-side adapter: a trainable delta on the tied item table, federated with the LoRA
    item_adapter: str = field(default="none", metadata=_choice("adapter", *ITEM_ADAPTERS))
    item_rank: int = field(default=8, metadata=_range("adapter", 1))
    item_rows: int = field(default=1000, metadata=_range("adapter", 1))
    item_features: str = field(default="", metadata=_in("data"))
    # item-adapter=subspace's A, and item-adapter=affine's sharing
    item_basis: str = field(default="cooccurrence", metadata=_choice("adapter", *ITEM_BASES))
    affine_groups: str = field(default="items", metadata=_choice("adapter", *AFFINE_GROUPS))
    # items as text: a frozen sentence encoder's embedding of each item's text, projected
    item_encoder: str = field(default="id", metadata=_choice("adapter", *ITEM_ENCODERS))
    item_text: str = field(default="", metadata=_in("data"))
    cold_items: float = field(default=0.0, metadata=_range("data", 0.0, 0.5))
    id_dropout: float = field(default=0.5, metadata=_range("adapter", 0.0, 0.95))
    lora_train: str = field(default="both", metadata=_choice("adapter", "both", "b-only", "none"))
    lora_share: str = field(default="both", metadata=_choice("adapter", "both", "a-only"))
    client_state_dir: str = field(default="", metadata=_in("local"))

    # federation: the server's rounds and optimizer, the clients' local training
    num_rounds: int = field(default=50, metadata=_range("server", 1))
    cohort_size: int = field(default=64, metadata=_range("server", 1))
    sampling: str = field(default="fixed", metadata=_choice("server", *SAMPLINGS))
    local_epochs: int = field(default=2, metadata=_range("local", 1))
    # the frozen base's dropout in clients' local training; -1: the base's own `dropout`
    local_dropout: float = field(default=-1.0, metadata=_range("local", -1.0, 0.9))
    learning_rate: float = field(default=0.5, metadata=_range("local", 0.0, lo_open=True))
    server_optimizer: str = field(default="adam", metadata=_choice("server", *SERVER_OPTIMIZERS))
    server_learning_rate: float = field(default=0.01, metadata=_range("server", 0.0, lo_open=True))
    server_momentum: float = field(default=0.0, metadata=_range("server", 0.0, 0.999))
    user_weighting: str = field(default="uniform", metadata=_choice("server", *USER_WEIGHTINGS))
    clipping_norm: float = field(default=0.0, metadata=_range("privacy", 0.0))

    # user-level differential privacy (central: noise on the server's sum)
    noise_multiplier: float = field(default=0.0, metadata=_range("privacy", 0.0))
    target_epsilon: float = field(default=0.0, metadata=_range("privacy", 0.0))
    target_delta: float = field(default=0.0, metadata=_range("privacy", 0.0, 1.0))
    max_epsilon: float = field(default=0.0, metadata=_range("privacy", 0.0))
    accountant: str = field(default="auto", metadata=_choice("privacy", *ACCOUNTANTS))
    # how the noise is drawn: independent per round, or correlated across rounds by a banded
    # Toeplitz factorization (DP-FTRL; sampling=all or cyclic, where no sampling amplifies)
    mechanism: str = field(default="gaussian", metadata=_choice("privacy", *MECHANISMS))
    mf_bands: int = field(default=16, metadata=_range("privacy", 1))
    # "what if we deployed to N' users?": noise and ε calibrated for a stated population and
    # cohort while training on the data at hand (pfl-research's noise_cohort_size); 0 = off
    whatif_population: int = field(default=0, metadata=_range("privacy", 0))
    whatif_cohort_size: int = field(default=0, metadata=_range("privacy", 0))
    # who adds the noise: the server to the sum (central DP), or each device its share before
    # SecAgg+ masks it (distributed Skellam: fedrec.privacy.distributed)
    noise_placement: str = field(default="server", metadata=_choice("privacy", "server", "devices"))
    # which round's adapter is the run's result: auto = best private validation without DP,
    # the last round under DP (private validation carries no noise)
    model_selection: str = field(default="auto", metadata=_choice("evaluation", *MODEL_SELECTIONS))
    adaptive_clipping: bool = field(default=False, metadata=_in("privacy"))
    clip_quantile: float = field(default=0.5, metadata=_range("privacy", 0.0, 1.0))
    clip_learning_rate: float = field(default=0.2, metadata=_range("privacy", 0.0))
    clip_count_stddev: float = field(default=0.0, metadata=_range("privacy", 0.0))
    # sample-level DP-SGD inside data silos instead of user-level DP across users
    partition: str = field(default="user", metadata=_choice("silo", "user", "silo"))
    num_silos: int = field(default=4, metadata=_range("silo", 1))
    dpsgd_noise_multiplier: float = field(default=1.0, metadata=_range("silo", 0.0, lo_open=True))
    dpsgd_max_grad_norm: float = field(default=1.0, metadata=_range("silo", 0.0, lo_open=True))
    dpsgd_batch_size: int = field(default=32, metadata=_range("silo", 1))
    secure_aggregation: str = field(default="none", metadata=_choice("secagg", "none", "secagg+"))
    secagg_shares: int = field(default=3, metadata=_range("secagg", 3))
    secagg_threshold: int = field(default=2, metadata=_range("secagg", 2))
    # noise-placement=devices: the share of the expected cohort that may drop out with the
    # survivors' noise still meeting the target (each device adds more noise for it)
    secagg_dropout_margin: float = field(default=0.2, metadata=_range("secagg", 0.0, 0.9))
    # where the clients run
    placement: str = field(default="cohort", metadata=_choice("workers", *PLACEMENTS))
    # who the private users are: the data file's (its private split), or the devices that
    # enroll (a deployment whose server holds only public users and the catalogue)
    private_users: str = field(default="data", metadata=_choice("workers", "data", "enrolled"))
    # private-users=enrolled: start once this many devices enrolled (0: once none joined for a while)
    enroll_devices: int = field(default=0, metadata=_range("workers", 0))
    num_workers: int = field(default=2, metadata=_range("workers", 1))
    # an existing Ray cluster (e.g. "127.0.0.1:6379"); "" starts a local one
    ray_address: str = field(default="", metadata=_in("workers"))
    client_num_cpus: float = field(default=1.0, metadata=_range("workers", 0.0, lo_open=True))
    client_num_gpus: float = field(default=0.0, metadata=_range("workers", 0.0))
    local_engine: str = field(default="auto", metadata=_choice("local", "auto", "vectorized", "loop"))
    vector_tokens: int = field(default=8192, metadata=_range("local", 1))
    scoring_dtype: str = field(default="float32", metadata=_choice("local", "float32", "bfloat16"))
    eval_every: int = field(default=5, metadata=_range("evaluation", 0))
    eval_users: int = field(default=0, metadata=_range("evaluation", 0))
    test_users: int = field(default=0, metadata=_range("evaluation", 0))
    client_dropout: float = field(default=0.0, metadata=_range("server", 0.0, 0.99))
    # empirical privacy audit: M canary clients (fedrec.privacy.audit); 0 = off
    audit_canaries: int = field(default=0, metadata=_range("privacy", 0))

    # surviving failures: checkpoints every N rounds (0 = only at the end), resume from one
    checkpoint_every: int = field(default=10, metadata=_range("run", 0))
    resume_from: str = field(default="", metadata=_in("run"))

    # centralized ceilings (mode=centralized), each early-stopped on validation NDCG@10
    ceilings: str = field(default="scratch,full,same", metadata=_in("centralized"))
    centralized_epochs: int = field(default=100, metadata=_range("centralized", 1))
    centralized_patience: int = field(default=3, metadata=_range("centralized", 1))
    centralized_learning_rate: float = field(default=1e-3, metadata=_range("centralized", 0.0, lo_open=True))
    bootstrap_samples: int = field(default=1000, metadata=_range("evaluation", 0))

    def __post_init__(self) -> None:
        if self.teacher_path:
            # One spelling of one teacher file in every run's config.toml, whatever the working
            # directory: the report tells runs of one teacher from another by this key.
            object.__setattr__(self, "teacher_path", str(Path(self.teacher_path).expanduser().resolve()))
        for name in SECTIONS:
            getattr(self, name)  # builds, checks and keeps the section
        self._check_combinations()

    def _check_combinations(self) -> None:
        """The checks that span sections, in one place so that their interplay reads at once;
        the first rule that applies and fails names its key."""
        dp, sampling, dataset = self.dp_enabled, self.sampling, self.dataset
        matrix, text_data = sampling in ("all", "cyclic"), dataset in ("seq-txt", "csv", "teacher")
        no_clip, not_uniform = self.clipping_norm <= 0, self.user_weighting != "uniform"
        rules: Iterable[tuple[bool, str]] = (
            (self.max_epsilon > 0 and not dp,
             "max-epsilon: no noise is added (target-epsilon and noise-multiplier are 0), so there is no ε to cap; "
             "drop max-epsilon or give target-epsilon or noise-multiplier"),
            (dataset == "teacher" and not self.teacher_path,
             "teacher-path: dataset=teacher draws its users from a teacher file (python -m fedrec.teacher)"),
            (dataset == "teacher", _unmet("dataset: teacher does not combine with ", ", ", (
                ("cold-items", self.cold_items > 0), ("private-users=enrolled", self.private_users == "enrolled"),
                ("public-users (its public users are the real data's)", self.public_users > 0)))),
            (self.public_users > 0 and dataset not in ("synthetic", "teacher"),
             "public-users: applies to generated populations (dataset=synthetic); a data file's split is public-fraction"),
            (dataset == "synthetic" and self.public_users >= self.synthetic_users,
             f"public-users: {self.public_users} leaves no private user of synthetic-users={self.synthetic_users}"),
            (bool(self.teacher_path) and dataset != "teacher", "teacher-path: set dataset=teacher to draw users from it"),
            (bool(self.data_path) and dataset == "synthetic",
             "data-path: dataset=synthetic generates its data and reads no file; set dataset=csv, seq-txt or movielens"),
            (dp and not_uniform, "user-weighting: differential privacy needs uniform user weights"),
            (dp and matrix, _unmet(f"sampling: {sampling} (the matrix mechanism) does not combine with ", ", ", (
                ("adaptive-clipping", self.adaptive_clipping),
                ("accountant (the run is one Gaussian mechanism: leave it auto)", self.accountant != "auto")))),
            (dp and not matrix and self.mechanism == "banded-mf",
             "mechanism: banded-mf's sensitivity is computed for sampling=all or cyclic; "
             "amplification by sampling is not accounted for it"),
            (dp and self.model_selection == "private",
             "model-selection: private picks the round on validation metrics without noise, which "
             "the privacy guarantee does not cover; use last or public under DP"),
            (dp and sampling == "fixed" and self.accountant in ("pld", "prv"),
             f"accountant: {self.accountant} has no bound for sampling=fixed; use sampling=poisson or accountant=rdp"),
            (self.model_selection == "public" and self.placement != "cohort",
             "model-selection: public validates on the public users through the cohort workers; it needs placement=cohort"),
            (self.model_selection == "public" and self.mode != "federated", "model-selection: public applies to mode=federated"),
            (self.partition == "silo", _unmet("partition: silo (sample-level DP-SGD) does not combine with ", ", ", (
                ("placement=device", self.placement == "device"), ("lora-share=a-only", self.lora_share == "a-only"),
                ("item-adapter", self.item_adapter != "none"), ("user-level DP", dp),
                ("item-encoder", self.item_encoder != "id")), " yet")),
            (self.secure_aggregation == "secagg+", _unmet("secure-aggregation: secagg+ needs ", "; ", (
                ("placement=device (one user per client)", self.placement != "device"),
                ("clipping-norm > 0 (updates are quantized into [-C, C])", no_clip),
                ("user-weighting=uniform", not_uniform),
                ("no adaptive-clipping (it needs per-user clip counts)", self.adaptive_clipping),
                ("secagg-shares odd", self.secagg_shares % 2 == 0),
                ("secagg-threshold <= secagg-shares", self.secagg_threshold > self.secagg_shares)))),
            (self.noise_placement == "devices", _unmet("noise-placement: devices needs ", "; ", (
                ("noise (noise-multiplier or target-epsilon)", not dp), ("clipping-norm > 0", no_clip),
                ("sampling=poisson or all (its accounting amplifies by Poisson sampling, or every user takes "
                 "part in every round)", sampling not in ("poisson", "all")),
                ("mechanism=gaussian", self.mechanism != "gaussian"), ("no adaptive-clipping", self.adaptive_clipping),
                ("accountant=auto (it is accounted with its own Skellam RDP bound)", self.accountant != "auto"),
                ("no audit-canaries", self.audit_canaries > 0),
                ("secure-aggregation=secagg+ in placement=device (a device adds only its share of the noise: "
                 "without SecAgg+ the server would see each update nearly bare)",
                 self.placement == "device" and self.secure_aggregation != "secagg+")))),
            (self.whatif_population > 0, _unmet("whatif-population: a what-if run needs ", "; ", (
                ("noise (target-epsilon or noise-multiplier)", not dp),
                ("sampling=poisson or fixed", sampling not in ("poisson", "fixed")),
                ("placement=cohort (a deployment's ε is its own population's)", self.placement != "cohort"),
                ("mode=federated", self.mode != "federated"),
                ("no audit-canaries (an audit measures the run's own guarantee)", self.audit_canaries > 0),
                ("noise-placement=server", self.noise_placement != "server"),
                ("no adaptive-clipping", self.adaptive_clipping)))),
            (self.whatif_cohort_size > 0 and self.whatif_population <= 0,
             "whatif-cohort-size: the cohort of a what-if population; it needs whatif-population"),
            (self.private_users == "enrolled", _unmet("private-users: enrolled needs ", "; ", (
                ("placement=device (the devices are the private users)", self.placement != "device"),
                ("mode=federated", self.mode != "federated"),
                ("no audit-canaries (an audit runs in simulation)", self.audit_canaries > 0)))),
            (self.enroll_devices > 0 and self.private_users != "enrolled",
             "enroll-devices: counts devices that enroll; it needs private-users=enrolled"),
            (self.client_dropout > 0 and (self.secure_aggregation != "none" or self.partition == "silo"),
             "client-dropout: simulated for user-level runs without SecAgg+ (SecAgg+ handles real dropouts itself)"),
            (self.audit_canaries > 0, _unmet("audit-canaries: needs ", "; ", (
                ("clipping-norm > 0 (a canary sends a direction of norm C)", no_clip),
                ("user-weighting=uniform (a canary weighs as one user)", not_uniform),
                ("partition=user", self.partition == "silo"), ("mode=federated", self.mode != "federated")))),
            (self.item_encoder != "id" and not self.item_text and text_data,
             f"item-text: item-encoder={self.item_encoder} needs item-text=PATH for dataset={dataset}"),
            (self.item_adapter == "subspace" and self.item_basis == "text" and not self.item_text and text_data,
             f"item-text: item-basis=text needs item-text=PATH for dataset={dataset}"),
            (self.item_adapter == "affine" and "features" in self.affine_groups and not self.item_features and text_data,
             f"item-features: affine-groups={self.affine_groups} needs item-features=PATH for dataset={dataset}"),
            (self.item_adapter == "features" and not self.item_features and text_data,
             f"item-features: item-adapter=features needs item-features=PATH for dataset={dataset}"),
        )  # fmt: skip
        for applies, message in rules:
            if applies and message:
                raise ConfigError(message)

    # --------------------------------------------------------------- sections
    @cached_property
    def run(self) -> Run:
        return Run.of(self)

    @cached_property
    def data(self) -> Data:
        return Data.of(self)

    @cached_property
    def model(self) -> Model:
        return Model.of(self)

    @cached_property
    def adapter(self) -> Adapter:
        return Adapter.of(self)

    @cached_property
    def local(self) -> Local:
        return Local.of(self)

    @cached_property
    def server(self) -> Server:
        return Server.of(self)

    @cached_property
    def privacy(self) -> Privacy:
        return Privacy.of(self)

    @cached_property
    def silo(self) -> Silo:
        return Silo.of(self)

    @cached_property
    def secagg(self) -> SecAgg:
        return SecAgg.of(self)

    @cached_property
    def workers(self) -> Workers:
        return Workers.of(self)

    @cached_property
    def evaluation(self) -> Evaluation:
        return Evaluation.of(self)

    @cached_property
    def centralized(self) -> Centralized:
        return Centralized.of(self)

    # ------------------------------------------------------------------ views
    @property
    def dp_enabled(self) -> bool:
        return self.privacy.enabled

    @property
    def item_kind(self) -> str:
        return self.adapter.item_kind

    @property
    def vectorized(self) -> bool:
        return self.local.vectorized

    def lora_target_list(self) -> list[str]:
        return self.adapter.lora_target_list()

    def ceiling_list(self) -> list[str]:
        return self.centralized.ceiling_list()

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

    @property
    def data_seed_value(self) -> int:
        """The seed of the data, the split, the base and the evaluation users."""
        return self.seed if self.data_seed < 0 else self.data_seed

    def fingerprint(self, *keys: str) -> str:
        """Short stable hash of the named keys (e.g. what determines the base model).

        `data-seed` is hashed as its value under the name `seed`, which the data and base
        keys hashed before it existed: every cached base and population keeps its key."""
        d = self.to_dict()
        d["data-seed"] = self.data_seed_value
        blob = json.dumps({("seed" if k == "data-seed" else k): d[k] for k in sorted(keys)}, sort_keys=True)
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
        a process, as checks cost a worker time on every message. (Its sections, built when
        first read, check their own values again: pure arithmetic, true wherever it arrives.)"""
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
        except IsADirectoryError:
            raise ConfigError(f"--config: '{path}' is a folder; give a TOML file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--config: '{path}' is not a text file (TOML is UTF-8 text)") from None
        except OSError as e:
            raise ConfigError(f"--config: '{path}' cannot be read ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config: '{path}' is not valid TOML ({e})") from None
        data = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", data)
        return cls.from_mapping(data, base)


_RESOLVED: dict[str, FedRecConfig] = {}


def _unmet(head: str, sep: str, needs: Iterable[tuple[str, bool]], tail: str = "") -> str:
    """`head` with every (what, missing) whose `missing` holds, or "" when none does: one error
    names all that a combination lacks."""
    missing = [what for what, bad in needs if bad]
    return head + sep.join(missing) + tail if missing else ""


bind(FedRecConfig)  # the sections take their fields from it and check that none is left out
