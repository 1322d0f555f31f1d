"""Every config key with its section, default and allowed values, from the config's own
field metadata, and the first words of its row in docs/configuration.md
(`python -m fedrec.simulate --keys`)."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

from fedrec.config import FedRecConfig
from fedrec.config_parse import _kebab

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def key_rows() -> list[tuple[str, str, str, str, str]]:
    """(key, section, default, allowed, description) for every key, in the config's order."""
    described = _descriptions()
    rows = []
    for f in fields(FedRecConfig):
        meta = dict(f.metadata)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if "choices" in meta:
            allowed = " | ".join(meta["choices"])
        elif meta.get("lo") is not None or meta.get("hi") is not None:
            lo = "" if meta.get("lo") is None else f"{'>' if meta.get('lo_open') else '>='} {meta['lo']:g}"
            hi = "" if meta.get("hi") is None else f"<= {meta['hi']:g}"
            allowed = ", ".join(x for x in (lo, hi) if x)
        else:
            allowed = type(default).__name__
        key = _kebab(f.name)
        rows.append((key, str(meta.get("section", "")), repr(default) if isinstance(default, str) else str(default),
                     allowed, described.get(key, "")))  # fmt: skip
    return rows


def _descriptions(width: int = 90) -> dict[str, str]:
    """Key → the start of its docs/configuration.md table row (absent docs: none)."""
    if not DOCS.exists():
        return {}
    out: dict[str, str] = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) < 2:
            continue
        text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", cells[1]).replace("`", "")
        text = text if len(text) <= width else text[: width - 1].rsplit(" ", 1)[0] + " …"
        for key in re.findall(r"`([a-z0-9-]+)`", cells[0]):
            out.setdefault(key, text)
    return out


def keys_text() -> str:
    rows = key_rows()
    width = max(len(r[0]) for r in rows)
    lines = [f"{len(rows)} keys (kebab-case in --run-config, TOML and [tool.flwr.app.config]); "
             "details: docs/configuration.md", ""]  # fmt: skip
    section = None
    for key, sec, default, allowed, what in rows:
        if sec != section:
            lines += ["" if section else "", f"[{sec}]"] if section else [f"[{sec}]"]
            section = sec
        lines.append(f"  {key:<{width}}  = {default:<12} ({allowed}){'  ' + what if what else ''}")
    return "\n".join(lines)
