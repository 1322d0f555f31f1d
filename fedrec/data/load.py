"""Loaders for real interaction files, from a path the user gives.

Every parse error names the file and line; nothing is silently skipped except users too
short for leave-one-out, which are counted and reported.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from fedrec.data.interactions import DataError, Interactions, build_interactions
from fedrec.data.synthetic import generate_synthetic

if TYPE_CHECKING:
    from fedrec.config import FedRecConfig


def load_interactions(cfg: FedRecConfig) -> Interactions:
    """The interactions a config names."""
    if cfg.dataset == "synthetic":
        return generate_synthetic(
            num_users=cfg.synthetic_users,
            num_items=cfg.synthetic_items,
            num_clusters=cfg.synthetic_clusters,
            mean_length=cfg.synthetic_mean_length,
            seed=cfg.seed,
        )
    path = Path(cfg.data_path)
    loader = {"movielens": load_movielens, "seq-txt": load_seq_txt, "csv": load_csv}[cfg.dataset]
    try:
        return loader(path, cfg.min_user_interactions)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def source_file(dataset: str, path: Path) -> Path:
    """The one file a loader reads for `path`: a MovieLens folder names its ratings file."""
    if dataset == "movielens" and path.is_dir():
        for name in ("ratings.dat", "u.data"):
            if (path / name).exists():
                return path / name
        raise DataError(f"{path}: no MovieLens ratings file (ratings.dat or u.data) in this folder")
    return path


def load_movielens(path: Path, min_user_interactions: int = 3) -> Interactions:
    """ML-100K `u.data` (tab-separated) or ML-1M `ratings.dat` (`::`), file or folder."""
    path = source_file("movielens", path)
    sep = "::" if path.name.endswith(".dat") else "\t"
    events: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    with _open_text(path, encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split(sep)
            if len(parts) != 4:
                raise DataError(
                    f"{path}:{lineno}: expected 4 fields (user{sep}item{sep}rating{sep}timestamp), "
                    f"got {len(parts)}: {line[:80]!r}"
                )
            user, item, _rating, ts = parts
            try:
                stamp = int(ts)
            except ValueError:
                raise DataError(f"{path}:{lineno}: timestamp {ts!r} is not an integer") from None
            events[user].append((stamp, lineno, item))
    return build_interactions(_chronological(events), f"movielens({path})", min_user_interactions)


def load_seq_txt(path: Path, min_user_interactions: int = 3) -> Interactions:
    """One line per user: `user item item ...`, items already in chronological order."""
    if path.is_dir():
        raise DataError(f"{path}: seq-txt expects a file (e.g. Beauty.txt), got a folder")
    per_user: dict[str, list[str]] = {}
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(f"{path}:{lineno}: expected 'user item item ...', got {line.strip()[:80]!r}")
            if parts[0] in per_user:
                raise DataError(f"{path}:{lineno}: user {parts[0]!r} appears on an earlier line too")
            per_user[parts[0]] = parts[1:]
    return build_interactions(per_user, f"seq-txt({path})", min_user_interactions)


def load_csv(path: Path, min_user_interactions: int = 3) -> Interactions:
    """CSV with a header naming `user`, `item` and `timestamp` columns (any order).

    Timestamps may be numbers or ISO-8601 strings; ties keep file order.
    """
    if path.is_dir():
        raise DataError(f"{path}: csv expects a file, got a folder")
    events: dict[str, list[tuple[object, int, str]]] = defaultdict(list)
    with _open_text(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}:1: empty file")
        cols = [h.strip().lower() for h in header]
        missing = [c for c in ("user", "item", "timestamp") if c not in cols]
        if missing:
            raise DataError(f"{path}:1: header {header} lacks column(s) {missing}")
        iu, ii, it = (cols.index(c) for c in ("user", "item", "timestamp"))
        numeric: bool | None = None
        for row in reader:
            lineno = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(cols):
                raise DataError(f"{path}:{lineno}: expected {len(cols)} fields, got {len(row)}")
            ts_raw = row[it].strip()
            try:
                ts: object = float(ts_raw)
                is_num = True
            except ValueError:
                ts, is_num = ts_raw, False
            if numeric is None:
                numeric = is_num
            elif numeric != is_num:
                raise DataError(f"{path}:{lineno}: timestamp {ts_raw!r} mixes numeric and text timestamps")
            if not ts_raw or not row[iu].strip() or not row[ii].strip():
                raise DataError(f"{path}:{lineno}: empty user, item or timestamp")
            events[row[iu].strip()].append((ts, lineno, row[ii].strip()))
    return build_interactions(_chronological(events), f"csv({path})", min_user_interactions)


def _chronological(events: dict[str, list[tuple]]) -> dict[str, list[str]]:
    # Sort by timestamp, ties by file line: deterministic for a given file.
    return {u: [e[2] for e in sorted(evs, key=lambda e: (e[0], e[1]))] for u, evs in events.items()}


def _open_text(path: Path, **kwargs):
    try:
        return open(path, encoding=kwargs.pop("encoding", "utf-8"), **kwargs)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a file") from None
