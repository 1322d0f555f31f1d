"""Each catalogue item's text: what a frozen sentence encoder turns into its embedding.

Public item metadata only (titles, categories, brands), never anything a user wrote, so the
texts may go to every device with the catalogue. Sources:
- `item-text=PATH`: JSON (`{"item id": "text", ...}`) or CSV with `item` and `text` columns;
- MovieLens's own item file: title and genres (`u.item` or `movies.dat`, Latin-1);
- the synthetic generator: words of each item's cluster, so that the path runs without data.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedrec.data.interactions import DataError
from fedrec.data.item_features import _line_of, movielens_movies, read_json_object

_ML_100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def catalogue_texts(by_id: dict[str, str], item_ids: list[str], source: str, allow_missing: bool = False) -> list[str]:
    """Texts in catalogue order. An item without text is an error naming how many lack one,
    unless `allow_missing` (then its text is empty); texts of items outside the catalogue
    (nobody interacted with them) are ignored."""
    texts = [by_id.get(i, "").strip() for i in item_ids]
    missing = [i for i, t in zip(item_ids, texts) if not t]
    if missing and not allow_missing:
        raise DataError(f"{source}: {len(missing):,} of {len(item_ids):,} catalogue items have no text "
                        f"(e.g. {missing[:3]})")  # fmt: skip
    return texts


def read_item_text(path: Path) -> dict[str, str]:
    """Item id → text from JSON or CSV (by suffix; anything but .csv is read as JSON)."""
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    raw, data = read_json_object(path, "item id → text")
    for key, text in data.items():
        if not isinstance(text, str):
            raise DataError(f"{path}:{_line_of(raw, key)}: item {key!r}: text must be a string, got {type(text).__name__}")
    return {str(k): v for k, v in data.items()}


def _read_csv(path: Path) -> dict[str, str]:
    try:
        fh = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    with fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if "item" not in header or "text" not in header:
            raise DataError(f"{path}:1: header needs `item` and `text` columns (got {header})")
        ii, it = header.index("item"), header.index("text")
        out = {}
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields, got {len(row)}")
            out[row[ii].strip()] = row[it]
        return out


def movielens_texts(path: Path) -> dict[str, str]:
    """`title | genres` per movie of `u.item` or `movies.dat`."""
    return {movie: f"{title} | {', '.join(_ML_100K_GENRES[g] if isinstance(g, int) else g for g in genres)}"
            for movie, title, genres in movielens_movies(path)}  # fmt: skip


# Words per synthetic cluster: items of one cluster share a theme word and a category.
_THEMES = ("ocean", "forest", "desert", "mountain", "city", "garden", "river", "island", "volcano", "glacier",
           "meadow", "canyon")  # fmt: skip
_THINGS = ("lamp", "chair", "kettle", "jacket", "novel", "candle", "blanket", "mug", "poster", "basket")


def synthetic_texts(clusters: np.ndarray, seed: int) -> dict[str, str]:
    """A text per synthetic item (ids "1".."N", as the generator names them): its cluster's
    theme and category, plus one of ten things drawn per item, so texts of a cluster are
    alike and differ from other clusters'."""
    rng = np.random.default_rng([seed, 0x7E47])
    out = {}
    for i, c in enumerate(clusters):
        theme, kind = _THEMES[int(c) % len(_THEMES)], f"collection {int(c) // len(_THEMES) + 1}"
        out[str(i + 1)] = f"{theme} {_THINGS[int(rng.integers(len(_THINGS)))]}, {theme} {kind}"
    return out
