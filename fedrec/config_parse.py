"""The values of fedrec's config, one key at a time: what a field's metadata declares, how a
raw value (TOML, `--run-config`, a ConfigRecord) becomes a typed one, and its range check.

The lowest of the config modules: it imports none of them. `fedrec.config_sections` checks
each section's knobs with `_check_value`; `fedrec.config` builds the whole `FedRecConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A bad key or value; the message is one line that names the key."""


# ------------------------------------------------------------ field metadata
def _in(section: str) -> dict[str, Any]:
    return {"section": section}


def _choice(section: str, *options: str) -> dict[str, Any]:
    return {"section": section, "choices": options}


def _range(section: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"section": section, "lo": lo, "hi": hi, "lo_open": lo_open}


# ------------------------------------------------------------------- parsing
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
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        if key in out:
            raise ConfigError(f"{key}: given twice in --run-config ({out[key]!r} and {value!r}); give it once")
        out[key] = value
    return out


def merge_run_config(*texts: str) -> str:
    """One `--run-config` text from layers where a later one overrides an earlier one (a
    script's recipe under the user's own overrides); a user's own text gives a key once."""
    items: dict[str, str] = {}
    for text in texts:
        for item in text.split():
            key = item.split("=", 1)[0].strip()
            items.pop(key, None)
            items[key] = item
    return " ".join(items.values())


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _closest(key: str, known: Mapping[str, Any]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, list(known), n=1)
    return match[0] if match else None


# Keys whose "off" may be written `none` (the one spelling of "no DP": `target-epsilon=none`,
# as sweeps, tables and reports write it); stored as 0.
NONE_IS_ZERO = ("target-epsilon", "noise-multiplier", "max-epsilon")


def _coerce(key: str, f: dataclasses.Field, raw: Any) -> Any:
    if key in NONE_IS_ZERO and isinstance(raw, str) and raw.lower() == "none":
        return 0.0
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
