"""Where a device's own interactions come from: the plug-in point for a real client app.

A source answers one question, "what did this user interact with, in what order?", as
raw item ids (the catalogue's ids, before the model's 1..N mapping) oldest first. The
device maps them through the catalogue the server sends and trains on the result; the
ids never leave the device.

Shipped: CSV, JSON lines and SQLite files with `user`, `item`, `timestamp` fields. One
file may hold many users: each device keeps only its own rows, but checks every row by
the rules the server's loaders use (`fedrec.data.parse`), so a device and the server
accept the same files and order them the same way. An app with its own
store implements `InteractionSource` (see docs/plug-in-client.md) and registers it with
`register_source`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from fedrec.data.interactions import DataError
from fedrec.data.parse import Record, open_text, order_events, read_interaction_csv


@runtime_checkable
class InteractionSource(Protocol):
    def items(self, user_id: str) -> list[str]:
        """This user's raw item ids, oldest first; raise DataError for unreadable data."""
        ...


def _own(per_user: dict[str, list[str]], path: Path, user_id: str) -> list[str]:
    if not per_user.get(user_id):
        raise DataError(f"{path}: no interactions for user {user_id!r}")
    return per_user[user_id]


class CsvSource:
    """A CSV file with a header naming `user`, `item` and `timestamp` (other columns ignored).

    Read by the server's own CSV reader (`fedrec.data.parse.read_interaction_csv`), so the
    device accepts, rejects and orders a file exactly as the server does; every row is
    checked, not only this user's.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def items(self, user_id: str) -> list[str]:
        return _own(read_interaction_csv(self.path), self.path, user_id)


class JsonlSource:
    """One JSON object per line with `user`, `item` and `timestamp` keys (rules of `fedrec.data.parse`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def items(self, user_id: str) -> list[str]:
        with open_text(self.path) as fh:
            try:
                per_user = order_events(self._records(fh), lambda line: f"{self.path}:{line}")
            except UnicodeDecodeError as e:
                raise DataError(f"{self.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return _own(per_user, self.path, user_id)

    def _records(self, lines: Iterator[str]) -> Iterator[Record]:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{self.path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not {"user", "item", "timestamp"} <= row.keys():
                raise DataError(f"{where}: expected an object with user, item, timestamp")
            yield lineno, row["user"], row["item"], row["timestamp"]


class SqliteSource:
    """A table (default `interactions`) with `user`, `item`, `timestamp` columns, read-only.

    Rows follow the rules of `fedrec.data.parse`; ties keep rowid order.
    """

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
                rows: list[Record] = db.execute(f"SELECT rowid, user, item, timestamp FROM {self.table}").fetchall()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: {e}") from None
        return _own(order_events(rows, lambda rowid: f"{self.path} rowid {rowid}"), self.path, user_id)


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
    """The source registered for `path`'s suffix."""
    path = Path(path)
    factory = _BY_SUFFIX.get(path.suffix.lower())
    if factory is None:
        raise DataError(f"{path}: no interaction source for '{path.suffix}' files (known: {', '.join(sorted(_BY_SUFFIX))})")
    return factory(path)
