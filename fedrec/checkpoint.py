"""A run's checkpoint on disk, and which config changes a resumed run may make.

`<output-dir>/checkpoint/` holds `state.pt` (the run's `state_dict`: adapter, server
optimizer, sampler, mechanism with its accountant ledger and clip, best round, metric
rows), `config.json` (the resolved config it ran with) and, where clients keep state in the
run's folder (lora-share=a-only's own B, silo ledgers), a snapshot of that folder with its
manifest. The cohort and noise RNGs are counter-based (seeded by seed and round), so their
state is the seed the config already holds.

Written whole or not at all: the new checkpoint is built under a temporary name and swapped
in by renames; a crash between the two renames leaves `checkpoint.old`, which `load` reads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedrec.config import ConfigError, FedRecConfig

NAME = "checkpoint"
# Keys a resumed run may change: none of them alters a round that already ran.
RESUMABLE_KEYS = (
    "num-rounds", "max-epsilon", "checkpoint-every", "eval-every", "bootstrap-samples", "output-dir", "overwrite", "resume-from",
    "num-workers", "client-num-cpus", "client-num-gpus", "device", "cache-dir", "tracking",
)  # fmt: skip


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / NAME


def save(output_dir: str | Path, state: dict[str, Any], cfg: FedRecConfig, client_state: Path | None = None) -> Path:
    """Write the checkpoint atomically; `client_state` (a folder clients write into) is snapshotted."""
    final = checkpoint_dir(output_dir)
    tmp, old = final.with_name(NAME + ".tmp"), final.with_name(NAME + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    manifest: dict[str, int] = {}
    if client_state is not None and client_state.is_dir():
        snap = tmp / "client-state"
        snap.mkdir()
        for f in sorted(client_state.iterdir()):
            if f.is_file() and ".tmp" not in f.suffix:
                # A hard link costs nothing and stays the old content: clients replace a file
                # (write a new one, then rename), they never write into it.
                _link_or_copy(f, snap / f.name)
                manifest[f.name] = f.stat().st_size
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    (tmp / "manifest.json").write_text(json.dumps({"round": state["round"], "client_state": manifest}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str | Path, log: Callable[[str], None] = print) -> tuple[dict[str, Any], FedRecConfig, Path]:
    """(state, the config it ran with, the checkpoint folder) from a results folder or a checkpoint folder.

    A damaged checkpoint (a truncated or zeroed file) is passed over for the previous one
    (`checkpoint.old`, left by a crash during a save) when that one is whole, and said; with
    none whole, one line names what is wrong."""
    path = Path(path)
    damaged: list[str] = []
    for candidate in (path, checkpoint_dir(path), path.with_name(NAME + ".old"), path / (NAME + ".old")):
        if (candidate / "state.pt").exists() and (candidate / "manifest.json").exists():
            name = "state.pt"
            try:
                state = torch.load(candidate / name, map_location="cpu", weights_only=False)
                name = "config.json"
                cfg = FedRecConfig.resolved(json.loads((candidate / name).read_text()))
                name = "state.pt"
                int(state["round"])
            except Exception as err:  # noqa: BLE001 - any unreadable file: try the next checkpoint, then say why
                why = str(err).splitlines()[0][:100] if str(err) else ""
                damaged.append(f"{candidate / name} is damaged ({type(err).__name__}: {why})")
                continue
            if damaged:
                log(f"checkpoint: {'; '.join(damaged)}; resuming from {candidate} instead")
            return state, cfg, candidate
    if damaged:
        raise ConfigError(f"resume-from: {'; '.join(damaged)}, and no whole checkpoint is left to resume from")
    raise ConfigError(f"resume-from: no checkpoint in '{path}' (looked for {NAME}/state.pt)")


def restore_client_state(ckpt: Path, client_state: Path) -> None:
    """Put the clients' folder back as it was at the checkpoint (later writes are undone)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())["client_state"]
    if not manifest and not client_state.exists():
        return
    client_state.mkdir(parents=True, exist_ok=True)
    for f in client_state.iterdir():
        if f.is_file() and f.name not in manifest:
            f.unlink()
    for name in manifest:
        target = client_state / name
        target.unlink(missing_ok=True)
        _link_or_copy(ckpt / "client-state" / name, target)


def resume_config(stored: FedRecConfig, given: FedRecConfig) -> FedRecConfig:
    """The stored config with the keys a resumed run may change taken from `given`; any other
    difference would alter rounds that already ran, and is an error."""
    old, new = stored.to_dict(), given.to_dict()
    for key in old:
        if key not in RESUMABLE_KEYS and old[key] != new[key]:
            raise ConfigError(
                f"{key}: the checkpoint ran with {old[key]!r}, not {new[key]!r}; a resumed run may change only "
                f"{', '.join(RESUMABLE_KEYS)}"
            )
    changes = {k: new[k] for k in RESUMABLE_KEYS if not (k == "output-dir" and not new[k])}  # flwr run gives none
    return FedRecConfig.from_mapping(changes, stored)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
