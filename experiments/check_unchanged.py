"""Do a refactor's runs give the same results? Runs fixed cases and compares their digests.

    python experiments/check_unchanged.py run --out /tmp/before   # on the old commit
    python experiments/check_unchanged.py run --out /tmp/after    # on the new one
    python experiments/check_unchanged.py compare /tmp/before /tmp/after

A digest keeps everything a run decides (summary metrics, intervals, ε, the privacy
ledger, the audit, every metric row, the adapters' bytes) and drops only what the clock
or the machine decides (seconds, wall-clock stamps, memory, the results path). Each case
is a real `python -m fedrec.simulate` run; `--cases` picks some (default: all whose data
is present).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEAUTY = ROOT.parent / "shared" / "data" / "amazon-s3rec" / "Beauty.txt"

CASES: dict[str, list[str]] = {
    "default": [],
    "dp": ["--run-config", "sampling=poisson target-epsilon=4 clipping-norm=0.5 num-rounds=50"],
    "audit": ["--run-config", "sampling=poisson target-epsilon=4 clipping-norm=0.5 audit-canaries=1000"],
    # A 50-round prefix of the Beauty table recipe (the README's real-data run).
    "beauty-table": ["--config", "experiments/beauty.toml", "--run-config", "num-rounds=50"],
}
_CLOCK_KEYS = {"provenance", "wall_seconds", "train_seconds", "ready_seconds", "round1_at", "server_started_at",
               "users_per_second", "worker_peak_rss_mb", "results_dir", "seconds", "worker-peak-rss-mb",
               "worker-train-seconds"}  # fmt: skip


def _strip(value):
    """Drop what the clock or the machine decides; wire bytes are deflated replies that carry
    the worker's host name and process id."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _CLOCK_KEYS and "wire" not in k}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def digest(folder: Path) -> dict:
    """What a run decided, read back from its results folder."""
    out: dict = {}
    for name in ("summary.json", "privacy.json", "audit.json"):
        if (folder / name).exists():
            out[name] = _strip(json.loads((folder / name).read_text()))
    out["metrics.jsonl"] = [_strip(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for path in sorted(folder.glob("*.safetensors")):
        out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cases(out: Path, names: list[str], cache: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Every base trained afresh, unless a cache is given (a Beauty base takes long to pretrain).
    env = os.environ | {"FEDREC_CACHE_DIR": str(cache or out / "cache")}
    for name in names:
        folder = out / name
        cmd = [sys.executable, "-m", "fedrec.simulate", "--output-dir", str(folder), *CASES[name]]
        print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        (out / f"{name}.digest.json").write_text(json.dumps(digest(folder), indent=1, sort_keys=True) + "\n")


def _differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{path}/{k}: only in {'before' if k in a else 'after'}" for k in sorted(set(a) ^ set(b))]
        return diffs + [d for k in sorted(set(a) & set(b)) for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {json.dumps(a)[:80]} != {json.dumps(b)[:80]}"]


def compare(before: Path, after: Path) -> int:
    failed = 0
    for path in sorted(before.glob("*.digest.json")):
        other = after / path.name
        if not other.exists():
            print(f"{path.stem}: missing in {after}")
            failed += 1
            continue
        diffs = _differences(json.loads(path.read_text()), json.loads(other.read_text()))
        print(f"{path.name.removesuffix('.digest.json')}: " + ("bit-equal" if not diffs else f"{len(diffs)} differences"))
        for line in diffs[:20]:
            print("   ", line)
        failed += bool(diffs)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--out", required=True, type=Path)
    run.add_argument("--cases", default="", help=f"comma-separated, of {', '.join(CASES)}")
    run.add_argument("--cache", type=Path, help="the bases' cache to use (default: a fresh one in --out)")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "compare":
        return compare(args.before, args.after)
    names = [n for n in args.cases.split(",") if n] or [n for n in CASES if n != "beauty-table" or BEAUTY.exists()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    if "beauty-table" in names and not BEAUTY.exists():
        print(f"beauty-table skipped: {BEAUTY} is absent")
        names.remove("beauty-table")
    run_cases(args.out, names, args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
