"""The one set of rules for reading interaction files, shared by the server and devices.

The server's loaders (`fedrec.data.load`) and a device's sources (`clients.sources`) both
go through this module, so a device accepts exactly the files the server accepts and
orders each user's items the same way.

Rules, for every row of a file (not only one user's rows):
- user, item and timestamp are non-empty (surrounding whitespace is ignored);
- a timestamp is a finite number (`1700000000`, `1.5e9`) or an ISO-8601 date or
  date-time (`2024-01-03`, `2024-01`, `2024-01-03T10:00:00+02:00`, `...Z`); date-times
  without an offset are read as UTC, so the order never depends on the reader's clock;
- one file holds one kind of timestamp: numbers and ISO-8601 do not mix, as a number's
  unit (seconds? milliseconds?) is unknown;
- items are ordered by timestamp (ISO-8601 by the instant it names), ties by position in
  the file (line, or SQLite rowid).
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Literal

from fedrec.data.interactions import DataError

TimestampKind = Literal["number", "ISO-8601"]
TimestampKey = int | float | datetime
# One row as a reader found it: (position in the file, user, item, timestamp), values raw.
Record = tuple[int, object, object, object]

COLUMNS = ("user", "item", "timestamp")
_YEAR_MONTH = re.compile(r"\d{4}-\d{2}")  # ISO-8601 reduced precision; fromisoformat lacks it


def parse_timestamp(raw: object) -> tuple[TimestampKind, TimestampKey]:
    """A timestamp's kind and a sort key that orders it correctly among its kind.

    Integers stay `int` so that nanosecond epochs (beyond float precision) keep their order.
    Raises DataError without a location; `order_events` adds the file and line.
    """
    if isinstance(raw, bool):  # JSON true/false is not a time
        raise DataError(f"timestamp {raw!r} is not a number or an ISO-8601 date/time")
    if isinstance(raw, (int, float)):
        value: int | float = raw
    elif isinstance(raw, str):
        text = raw.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return "ISO-8601", _iso_instant(raw, text)
    else:
        raise DataError(f"timestamp {raw!r} is not a number or an ISO-8601 date/time")
    if isinstance(value, float) and not math.isfinite(value):  # NaN would leave the order undefined
        raise DataError(f"timestamp {raw!r} is not a finite number")
    return "number", value


def _iso_instant(raw: object, text: str) -> datetime:
    try:
        stamp = datetime.fromisoformat(text + "-01" if _YEAR_MONTH.fullmatch(text) else text)
    except ValueError:
        raise DataError(f"timestamp {raw!r} is not a number or an ISO-8601 date/time") from None
    if stamp.tzinfo is None:
        return stamp.replace(tzinfo=timezone.utc)
    return stamp.astimezone(timezone.utc)


def order_events(records: Iterable[Record], locate: Callable[[int], str]) -> dict[str, list[str]]:
    """Each user's raw item ids oldest first, every record checked against the module's rules.

    `locate(position)` names a record in errors (e.g. `path:line`), built only on error.
    """
    events: dict[str, list[tuple[TimestampKey, int, str]]] = defaultdict(list)
    kind: TimestampKind | None = None
    for pos, user, item, ts in records:
        user_id, item_id = _field(user), _field(item)
        if not user_id or not item_id or not _field(ts):
            raise DataError(f"{locate(pos)}: empty user, item or timestamp")
        try:
            this_kind, key = parse_timestamp(ts)
        except DataError as e:
            raise DataError(f"{locate(pos)}: {e}") from None
        if kind is None:
            kind = this_kind
        elif this_kind != kind:
            raise DataError(f"{locate(pos)}: timestamp {ts!r} mixes numeric and ISO-8601 timestamps in one file")
        events[user_id].append((key, pos, item_id))
    # Sort by timestamp, ties by position: deterministic for a given file.
    return {u: [e[2] for e in sorted(evs, key=lambda e: (e[0], e[1]))] for u, evs in events.items()}


def read_interaction_csv(path: Path) -> dict[str, list[str]]:
    """Every user's raw item ids, oldest first, from a CSV with `user`, `item`, `timestamp` columns.

    The header names the columns in any order and any case; other columns are ignored, but
    every row has as many fields as the header.
    """
    if path.is_dir():
        raise DataError(f"{path}: csv expects a file, got a folder")
    with open_text(path, newline="") as fh:
        try:
            return order_events(_csv_records(path, csv.reader(fh)), lambda line: f"{path}:{line}")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _csv_records(path: Path, reader) -> Iterable[Record]:
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}:1: empty file")
    cols = [h.strip().lower() for h in header]
    missing = [c for c in COLUMNS if c not in cols]
    if missing:
        raise DataError(f"{path}:1: header lacks column(s) {missing} (header: {header})")
    iu, ii, it = (cols.index(c) for c in COLUMNS)
    for row in reader:
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(cols):
            raise DataError(f"{path}:{reader.line_num}: expected {len(cols)} fields, got {len(row)}")
        yield reader.line_num, row[iu], row[ii], row[it]


def _field(value: object) -> str:
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else str(value)


def open_text(path: Path, encoding: str = "utf-8", **kwargs) -> IO[str]:
    """`open` for reading, with a missing file or a folder reported as DataError."""
    try:
        return open(path, encoding=encoding, **kwargs)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a file") from None
