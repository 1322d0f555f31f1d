"""The sections of fedrec's config: each concern's knobs, frozen, checking themselves.

A section's fields are `FedRecConfig`'s whose metadata names it, so each knob is declared
once, with its default and range, on the flat config in `fedrec.config`. This module does not
import that one: `_section` only registers a class, and `fedrec.config` calls `bind` with
`FedRecConfig` once it is defined, which makes every registered class the frozen dataclass
of its fields and checks that every field has a section and every section a property.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, ClassVar, Self, TypeVar

from fedrec.config_parse import ConfigError, _check_value

# The choices of the config's knobs (the fields of `FedRecConfig` name them).
DATASETS = ("synthetic", "movielens", "seq-txt", "csv", "teacher")
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

SECTIONS: dict[str, type[_Section]] = {}
_S = TypeVar("_S", bound="_Section")


class _Section:
    """One concern's knobs, frozen, checking its own values and how they combine.

    A section's fields are FedRecConfig's whose metadata names it (`bind` adds them), so
    each knob is declared once, with its default and range, on the flat config."""

    _knobs: ClassVar[tuple[dataclasses.Field, ...]] = ()  # its fields, kept: sections are built with every config

    def __post_init__(self) -> None:
        for f in self._knobs:
            _check_value(f, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """The section's own combinations; it has none unless it says so."""

    @classmethod
    def of(cls, cfg: Any) -> Self:
        """The section of `cfg`, a FedRecConfig."""
        return cls(**{f.name: getattr(cfg, f.name) for f in cls._knobs})


def _section(name: str) -> Callable[[type[_S]], type[_S]]:
    """Register `cls` as section `name`; `bind` makes it the frozen dataclass of its fields."""

    def register(cls: type[_S]) -> type[_S]:
        SECTIONS[name] = cls
        return cls

    return register


def bind(config: type) -> None:
    """Make every registered section the frozen dataclass of the fields of `config` (the
    FedRecConfig class) whose metadata names it, in place, then check that none is left out."""
    for name, cls in SECTIONS.items():
        own = [f for f in fields(config) if f.metadata["section"] == name]
        cls.__annotations__ = {f.name: f.type for f in own}
        for f in own:
            setattr(cls, f.name, field(metadata=f.metadata))
        made = dataclass(frozen=True)(cls)
        assert made is cls  # in place: the names bound to the classes stay the sections
        made._knobs = fields(made)
    _check_sections(config)


@_section("run")
class Run(_Section):
    """What runs, on which device, where its results and caches go, how it resumes."""


@_section("data")
class Data(_Section):
    """The interactions, their public/private split, and the item side files."""

    def validate(self) -> None:
        if self.dataset != "synthetic" and not self.data_path:
            raise ConfigError(f"data-path: dataset={self.dataset} needs data-path=<file or folder>")


@_section("model")
class Model(_Section):
    """The frozen base transformer and its centralized pretraining on public users."""

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden-size: {self.hidden_size} is not divisible by num-heads={self.num_heads}")


@_section("adapter")
class Adapter(_Section):
    """What the federation trains and shares: the LoRA adapter and the item side."""

    @property
    def item_kind(self) -> str:
        """The federated item adapter: the text projection's delta when items are text, unless
        id+text names an item adapter, which then moves the text-informed table itself."""
        text = self.item_encoder == "text" or (self.item_encoder == "id+text" and self.item_adapter == "none")
        return "text" if text else self.item_adapter

    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def validate(self) -> None:
        targets = self.lora_target_list()
        bad = [t for t in targets if t not in LORA_TARGET_CHOICES]
        if not targets or bad:
            raise ConfigError(
                f"lora-targets: unknown module(s) {bad or '(none given)'}; choose from {','.join(LORA_TARGET_CHOICES)}"
            )
        if self.lora_train == "b-only" and self.lora_share == "a-only":
            raise ConfigError("lora-share: a-only keeps B local and b-only freezes A; together nothing is shared")
        if self.lora_train == "none" and (self.item_kind == "none" or self.lora_share == "a-only"):
            raise ConfigError("lora-train: none freezes the LoRA adapter, so it needs an item-adapter (and lora-share=both)")
        if self.item_encoder == "text" and self.item_adapter != "none":
            raise ConfigError("item-adapter: with item-encoder=text the federated item adapter is the text projection's "
                              "delta; an item adapter on the table needs item-encoder=id+text")  # fmt: skip


@_section("local")
class Local(_Section):
    """Clients' local training: epochs, step size, dropout, the engine and its state."""

    @property
    def vectorized(self) -> bool:
        """Whether clients train their users together (fedrec.train.vectorized) or one by one."""
        return self.local_engine in ("vectorized", "auto")

    def validate(self) -> None:
        if self.local_dropout < 0 and self.local_dropout != -1.0:
            raise ConfigError(f"local-dropout: -1 (the base's dropout) or a rate in [0, 0.9], got {self.local_dropout}")
        if self.scoring_dtype != "float32" and not self.vectorized:
            raise ConfigError("scoring-dtype: only the vectorized engine (local-engine=auto|vectorized) has a bfloat16 path")


@_section("server")
class Server(_Section):
    """The server's rounds: who takes part, how updates are weighed and applied."""

    def validate(self) -> None:
        if self.server_momentum and self.server_optimizer != "sgd":
            raise ConfigError("server-momentum: only server-optimizer=sgd has momentum (adam keeps its own moments)")


@_section("privacy")
class Privacy(_Section):
    """User-level DP: the per-user clip, the noise or the ε it buys, its accounting, the audit."""

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0 or self.target_epsilon > 0

    def validate(self) -> None:
        if self.enabled and self.noise_multiplier > 0 and self.target_epsilon > 0:
            raise ConfigError("target-epsilon: give noise-multiplier or target-epsilon, not both")
        if self.enabled and self.clipping_norm <= 0:
            raise ConfigError("clipping-norm: differential privacy needs a per-user bound > 0")
        if self.enabled and self.adaptive_clipping and self.clip_count_stddev \
                and 2 * self.clip_count_stddev <= self.noise_multiplier:  # fmt: skip
            raise ConfigError(
                "clip-count-stddev: must exceed noise-multiplier/2, or the count alone spends the whole budget"
            )
        if self.adaptive_clipping and self.clipping_norm <= 0:
            raise ConfigError("clipping-norm: adaptive clipping starts from clipping-norm, which must be > 0")


@_section("silo")
class Silo(_Section):
    """partition=silo: clients are data silos training with sample-level DP-SGD."""


@_section("secagg")
class SecAgg(_Section):
    """Secure aggregation (SecAgg+): its secret sharing."""


@_section("workers")
class Workers(_Section):
    """Where clients run: a cohort per worker or a node per user, and their resources."""


@_section("evaluation")
class Evaluation(_Section):
    """How often and on whom the adapter is measured, and which round is the result."""


@_section("centralized")
class Centralized(_Section):
    """mode=centralized: the ceilings trained on all private data."""

    def ceiling_list(self) -> list[str]:
        return [c.strip() for c in self.ceilings.split(",") if c.strip()]

    def validate(self) -> None:
        bad = [c for c in self.ceiling_list() if c not in CEILINGS]
        if bad or not self.ceiling_list():
            raise ConfigError(f"ceilings: unknown {bad or '(none given)'}; choose from {','.join(CEILINGS)}")



def _check_sections(config: type) -> None:
    """Every knob in a section, every section a property of the config: a new field with a
    misspelt section would otherwise go unchecked."""
    claimed = {f.name for cls in SECTIONS.values() for f in fields(cls)}
    missing = sorted({f.name for f in fields(config)} - claimed)
    if missing:
        raise RuntimeError(f"FedRecConfig fields in no known section: {missing}")
    unbound = [name for name in SECTIONS if not isinstance(getattr(config, name, None), cached_property)]
    if unbound:
        raise RuntimeError(f"FedRecConfig has no property for section(s) {unbound}")
