"""Where a device's own interactions come from: the plug-in point for a real client app.

A source answers one question, "what did this user interact with, in what order?", as
raw item ids (the catalogue's ids, before the model's 1..N mapping) oldest first. The
device maps them through the catalogue the server sends and trains on the result; the
ids never leave the device.

Shipped: CSV, JSON lines and SQLite files with `user`, `item`, `timestamp` fields (one
file may hold many users: each device reads only its own rows). An app with its own
store implements `InteractionSource` (see docs/plug-in-client.md) and registers it with
`register_source`.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from fedrec.data.interactions import DataError


@runtime_checkable
class InteractionSource(Protocol):
    def items(self, user_id: str) -> list[str]:
        """This user's raw item ids, oldest first; raise DataError for unreadable data."""
        ...


def _timestamp(raw: object, where: str) -> float:
    try:
        return float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"{where}: timestamp {raw!r} is not a number") from None


def _ordered(events: list[tuple[float, int, str]], where: str, user_id: str) -> list[str]:
    if not events:
        raise DataError(f"{where}: no interactions for user {user_id!r}")
    # Ties keep file order: the same rule as the server's loaders (fedrec.data.load).
    return [item for _ts, _pos, item in sorted(events, key=lambda e: (e[0], e[1]))]


class CsvSource:
    """A CSV file with a header naming `user`, `item` and `timestamp` (other columns ignored)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def items(self, user_id: str) -> list[str]:
        events = []
        try:
            with open(self.path, encoding="utf-8", newline="") as fh:
                reader = csv.reader(fh)
                cols = [c.strip().lower() for c in next(reader, [])]
                missing = [c for c in ("user", "item", "timestamp") if c not in cols]
                if missing:
                    raise DataError(f"{self.path}:1: header lacks column(s) {missing}")
                iu, ii, it = (cols.index(c) for c in ("user", "item", "timestamp"))
                for row in reader:
                    if not row or row[iu].strip() != user_id:
                        continue
                    where = f"{self.path}:{reader.line_num}"
                    if len(row) != len(cols) or not row[ii].strip():
                        raise DataError(f"{where}: malformed row {row}")
                    events.append((_timestamp(row[it].strip(), where), reader.line_num, row[ii].strip()))
        except FileNotFoundError:
            raise DataError(f"{self.path}: file not found") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: not UTF-8 text ({e.reason})") from None
        return _ordered(events, str(self.path), user_id)


class JsonlSource:
    """One JSON object per line with `user`, `item` and `timestamp` keys."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def items(self, user_id: str) -> list[str]:
        events = []
        try:
            with open(self.path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    where = f"{self.path}:{lineno}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: not JSON ({e.msg})") from None
                    if not isinstance(row, dict) or not {"user", "item", "timestamp"} <= row.keys():
                        raise DataError(f"{where}: expected an object with user, item, timestamp")
                    if str(row["user"]) == user_id:
                        events.append((_timestamp(row["timestamp"], where), lineno, str(row["item"])))
        except FileNotFoundError:
            raise DataError(f"{self.path}: file not found") from None
        return _ordered(events, str(self.path), user_id)


class SqliteSource:
    """A table (default `interactions`) with `user`, `item`, `timestamp` columns, read-only."""

    def __init__(self, path: str | Path, table: str = "interactions") -> None:
        self.path = Path(path)
        if not table.isidentifier():
            raise DataError(f"{self.path}: table name {table!r} is not a plain identifier")
        self.table = table

    def items(self, user_id: str) -> list[str]:
        if not self.path.is_file():
            raise DataError(f"{self.path}: file not found")
        try:
            with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as db:
                rows = db.execute(
                    f"SELECT timestamp, rowid, item FROM {self.table} WHERE CAST(user AS TEXT) = ?", (user_id,)
                ).fetchall()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: {e}") from None
        events = [(_timestamp(ts, f"{self.path} rowid {rowid}"), rowid, str(item)) for ts, rowid, item in rows]
        return _ordered(events, str(self.path), user_id)


_BY_SUFFIX: dict[str, Callable[[Path], InteractionSource]] = {
    ".csv": CsvSource,
    ".jsonl": JsonlSource,
    ".sqlite": SqliteSource,
    ".db": SqliteSource,
}


def register_source(suffix: str, factory: Callable[[Path], InteractionSource]) -> None:
    """Let `open_source` open files ending in `suffix` with an app's own reader."""
    _BY_SUFFIX[suffix.lower()] = factory


def open_source(path: str | Path) -> InteractionSource:
    path = Path(path)
    factory = _BY_SUFFIX.get(path.suffix.lower())
    if factory is None:
        raise DataError(f"{path}: no interaction source for '{path.suffix}' files (known: {', '.join(sorted(_BY_SUFFIX))})")
    return factory(path)
