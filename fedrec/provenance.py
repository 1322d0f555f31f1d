"""Where a result came from: the code's version, the packages and the machine.

Recorded in `summary.json` and `report.json` so that a number read months later says which
commit (and whether the tree had uncommitted changes), which releases of the stack and
which CPU or GPU made it.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("fedrec", "flwr", "torch", "peft", "opacus", "numpy", "dp-accounting")
REPO = Path(__file__).resolve().parents[1]


def provenance() -> dict[str, Any]:
    """{"git": {"commit", "dirty"} or None, "versions": {package: version}, "machine": {...}}."""
    return {"git": _git(), "versions": _versions(), "machine": _machine()}


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git() -> dict[str, Any] | None:
    """The checkout fedrec runs from, if it is one (an installed wheel has none)."""
    if not (REPO / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                                text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


@functools.lru_cache(maxsize=1)
def _machine() -> dict[str, Any]:
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "gpu": gpu, "python": platform.python_version(), "system": platform.platform()}
