"""Public item metadata as bags of attribute ids, and the public choice of item rows.

Both feed item-side adapters (fedrec.model.item_adapters) and must not depend on private
users: features come from a metadata file the user names (or the dataset's own item
file), rows from the public users' interactions only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.data.interactions import DataError


@dataclass(frozen=True)
class ItemFeatures:
    """Attribute bags of items 1..N in CSR form: item i's attributes are
    `indices[indptr[i-1]:indptr[i]]`, each in 0..num_attrs-1. An item may have none."""

    indptr: np.ndarray
    indices: np.ndarray
    num_attrs: int
    source: str

    @property
    def num_items(self) -> int:
        return len(self.indptr) - 1

    def describe(self) -> str:
        counts = np.diff(self.indptr)
        return (f"{self.source}: {self.num_attrs:,} attributes, {counts.mean():.2f} per item, "
                f"{int((counts == 0).sum()):,} of {self.num_items:,} items without any")  # fmt: skip


def _from_bags(bags: list[list[object]], source: str) -> ItemFeatures:
    """Attribute values (any hashable) of items 1..N → CSR over 0-based attribute indices,
    numbered in sorted order of the values, so the layout does not depend on file order."""
    values = sorted({v for bag in bags for v in bag}, key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(values)}
    indptr = np.zeros(len(bags) + 1, dtype=np.int64)
    indices: list[int] = []
    for i, bag in enumerate(bags):
        own = sorted({index[v] for v in bag})
        indices += own
        indptr[i + 1] = len(indices)
    return ItemFeatures(indptr, np.asarray(indices, dtype=np.int64), len(values), source)


def read_json_object(path: Path, what: str) -> tuple[str, dict]:
    """(the file's text, its JSON object), with file:line errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}:1: expected a JSON object of {what}")
    return text, raw


def _line_of(text: str, key: str) -> int:
    """Line of `"key":` in a JSON text (for error messages; 1 where it cannot be found)."""
    m = re.search(r'"' + re.escape(key) + r'"\s*:', text)
    return text.count("\n", 0, m.start()) + 1 if m else 1


def load_item_features_json(path: Path, item_ids: list[str]) -> ItemFeatures:
    """A JSON object: item id (as in the interaction file) → list of attribute ids
    (integers or strings), e.g. S3-Rec's `*_item2attributes.json`. Catalogue items the
    file lacks get no attributes; an id outside the catalogue is an error, since it means
    the file belongs to other data."""
    text, raw = read_json_object(path, "item id → list of attribute ids")
    index = {item: i for i, item in enumerate(item_ids)}
    bags: list[list[object]] = [[] for _ in item_ids]
    for key, attrs in raw.items():
        if key not in index:
            raise DataError(f"{path}:{_line_of(text, key)}: item {key!r} is not in the interaction data's catalogue")
        if not isinstance(attrs, list) or not all(isinstance(a, (int, str)) and not isinstance(a, bool) for a in attrs):
            raise DataError(f"{path}:{_line_of(text, key)}: item {key!r}: expected a list of attribute ids, got {attrs!r:.60}")
        bags[index[key]] = attrs
    return _from_bags(bags, f"item-features({path})")


_ML_GENRES_100K = 19  # u.item's last 19 fields are 0/1 genre flags


def movielens_movies(path: Path) -> Iterator[tuple[str, str, list[object]]]:
    """(movie id, title, genres) per line of ML-100K `u.item` (genres as the indices of its
    19 flags) or ML-1M `movies.dat` (`id::title::A|B`, genres by name), Latin-1."""
    try:
        fh = open(path, encoding="latin-1")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            if path.name.endswith(".dat"):
                parts = line.split("::")
                if len(parts) != 3:
                    raise DataError(f"{path}:{lineno}: expected id::title::genres, got {line[:80]!r}")
                yield parts[0], parts[1], [g for g in parts[2].split("|") if g]
            else:
                parts = line.split("|")
                if len(parts) != 5 + _ML_GENRES_100K or any(f not in ("0", "1") for f in parts[5:]):
                    raise DataError(f"{path}:{lineno}: expected id|title|date|video date|url and 19 0/1 genre flags")
                yield parts[0], parts[1], [g for g, flag in enumerate(parts[5:]) if flag == "1"]


def load_movielens_genres(path: Path, item_ids: list[str]) -> ItemFeatures:
    """Genres as attributes (`movielens_movies`). Movies of the file that nobody rated are
    not in the catalogue and are skipped."""
    index = {item: i for i, item in enumerate(item_ids)}
    bags: list[list[object]] = [[] for _ in item_ids]
    for movie, _title, genres in movielens_movies(path):
        if movie in index:
            bags[index[movie]] = genres
    return _from_bags(bags, f"movielens-genres({path})")


def movielens_item_file(data_path: Path) -> Path:
    """The item file beside a MovieLens ratings file or inside its folder."""
    folder = data_path if data_path.is_dir() else data_path.parent
    for name in ("movies.dat", "u.item"):
        if (folder / name).exists():
            return folder / name
    raise DataError(f"{folder}: no MovieLens item file (movies.dat or u.item) for item-adapter=features")


def load_item_features(path: Path, item_ids: list[str]) -> ItemFeatures:
    """A features file by its kind: MovieLens item files by name, JSON otherwise."""
    if path.name in ("u.item", "movies.dat"):
        return load_movielens_genres(path, item_ids)
    return load_item_features_json(path, item_ids)


def cluster_features(clusters: np.ndarray) -> ItemFeatures:
    """One attribute per item, its cluster: the synthetic generator's public metadata."""
    return _from_bags([[int(c)] for c in clusters], "synthetic clusters")


def public_top_items(public_sequences: list[np.ndarray], num_items: int, k: int) -> np.ndarray:
    """The k items (1-based ids) most frequent in the public users' interactions, ties by id.

    Only public data enters, so the choice says nothing about any private user (the
    vocabulary restriction of production DP language models). Sorted by id.
    """
    flat = np.concatenate(public_sequences) if public_sequences else np.zeros(0, dtype=np.int64)
    counts = np.bincount(flat, minlength=num_items + 1)[1:]
    order = np.lexsort((np.arange(num_items), -counts))  # count descending, then id
    return np.sort(order[: min(k, num_items)] + 1)
