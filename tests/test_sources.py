"""Device data sources: the same user read from CSV, JSON lines, SQLite and an app's own reader."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from clients.device import read_own_data, store_base
from clients.sources import CsvSource, JsonlSource, SqliteSource, open_source
from fedrec.data.interactions import DataError
from fedrec.data.load import load_csv
from server.local_federation import write_device_file

ROWS = [("u1", "b", 20.0), ("u2", "x", 1.0), ("u1", "a", 10.0), ("u1", "c", 20.0), ("u1", "d", 5.0)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".sqlite"])
def test_every_format_reads_one_users_items_oldest_first_ties_in_file_order(tmp_path, suffix):
    path = write_device_file(ROWS, tmp_path / f"data{suffix}")
    assert open_source(path).items("u1") == ["d", "a", "b", "c"]
    assert open_source(path).items("u2") == ["x"]
    with pytest.raises(DataError, match="no interactions for user 'u3'"):
        open_source(path).items("u3")


def test_bad_files_say_where(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("user,item,timestamp\nu1,a,1\nu1,b,yesterday\n")
    with pytest.raises(DataError, match=r"a.csv:3: timestamp 'yesterday' is not a number"):
        CsvSource(csv_path).items("u1")
    csv_path.write_text("user,item\nu1,a\n")
    with pytest.raises(DataError, match=r"a.csv:1: header lacks column\(s\) \['timestamp'\]"):
        CsvSource(csv_path).items("u1")
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"user": "u1", "item": "a"}\n')
    with pytest.raises(DataError, match="a.jsonl:1: expected an object with user, item, timestamp"):
        JsonlSource(jsonl).items("u1")
    with pytest.raises(DataError, match="file not found"):
        SqliteSource(tmp_path / "none.sqlite").items("u1")
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(DataError, match="junk.sqlite"):
        SqliteSource(tmp_path / "junk.sqlite").items("u1")
    with pytest.raises(DataError, match="no interaction source for '.parquet'"):
        open_source(tmp_path / "x.parquet")


# Lexical order is not time order here: offsets, a naive date-time (UTC), a bare date, a
# year-month, and a tie (u1's b and c are both 08:00Z: file order).
ISO_CSV = """user,item,timestamp,rating
u1,b,2024-01-03T10:00:00+02:00,5
u2,x,2024-01-01T00:00:00Z,1
u1,a,2024-01-03T09:00:00Z,4
u1,c,2024-01-03 08:00:00,3
u2,y,2023-12-31T23:30:00-01:00,2
u1,d,2024-01-02,1
u1,e,2024-01,2
"""
NUMERIC_CSV = "user,item,timestamp\nu1,b,20\nu2,x,3\nu1,a,10\nu1,c,20.0\nu2,y,2.5\nu1,d,5\nu1,e,1e1\n"


def _server_sequences(path):
    d = load_csv(path, min_user_interactions=1)
    return {u: [d.item_ids[i - 1] for i in seq] for u, seq in zip(d.user_ids, d.sequences, strict=True)}


@pytest.mark.parametrize(
    "text, expected",
    [
        (ISO_CSV, {"u1": ["e", "d", "b", "c", "a"], "u2": ["x", "y"]}),
        (NUMERIC_CSV, {"u1": ["d", "a", "e", "b", "c"], "u2": ["y", "x"]}),
    ],
)
def test_server_loader_and_device_source_read_one_file_the_same(tmp_path, text, expected):
    path = tmp_path / "shared.csv"
    path.write_text(text)
    assert _server_sequences(path) == expected
    assert {u: CsvSource(path).items(u) for u in expected} == expected


@pytest.mark.parametrize("suffix", [".jsonl", ".sqlite"])
def test_every_device_format_orders_iso_timestamps_as_the_server_does(tmp_path, suffix):
    rows = [("u1", "b", "2024-01-03T10:00:00+02:00"), ("u1", "a", "2024-01-03T09:00:00Z"), ("u1", "c", "2024-01-02")]
    server = _server_sequences(write_device_file(rows, tmp_path / "data.csv"))
    assert server == {"u1": ["c", "b", "a"]}
    assert open_source(write_device_file(rows, tmp_path / f"data{suffix}")).items("u1") == server["u1"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("yesterday", "timestamp 'yesterday' is not a number or an ISO-8601 date/time"),
        ("2024-13-01", "timestamp '2024-13-01' is not a number or an ISO-8601 date/time"),
        ("nan", "timestamp 'nan' is not a finite number"),
        ("17", "timestamp '17' mixes numeric and ISO-8601 timestamps in one file"),
    ],
)
def test_a_malformed_timestamp_is_the_same_error_on_server_and_device(tmp_path, bad, message):
    path = tmp_path / "bad.csv"
    path.write_text(f"user,item,timestamp\nu1,a,2024-01-01\nu2,b,{bad}\nu1,c,2024-01-02\n")
    with pytest.raises(DataError) as on_server:
        load_csv(path, min_user_interactions=1)
    with pytest.raises(DataError) as on_device:  # the bad row is another user's: the file is refused all the same
        CsvSource(path).items("u1")
    assert str(on_server.value) == str(on_device.value) == f"{path}:3: {message}"


def test_an_apps_own_reader_plugs_in_through_source_module(tmp_path, monkeypatch):
    (tmp_path / "myapp_store.py").write_text(
        "from clients.sources import register_source\n"
        "class Plays:\n"
        "    def __init__(self, path):\n"
        "        self.path = path\n"
        "    def items(self, user_id):\n"
        "        rows = [l.split('\\t') for l in self.path.read_text().splitlines() if l]\n"
        "        return [i for _t, i in sorted(rows, key=lambda r: float(r[0]))]\n"
        "register_source('.plays', Plays)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plays = tmp_path / "me.plays"
    plays.write_text("3\titem-c\n1\titem-a\n2\titem-zzz\n4\titem-b\n")
    nc = {"user-id": "me", "data-path": str(plays), "state-dir": str(tmp_path / "state"), "source-module": "myapp_store"}
    store_base(nc, "base-x", {}, ["item-a", "item-b", "item-c"])
    own = read_own_data(nc, "base-x", user=17)
    assert own.unknown_items == 1  # item-zzz is not in the catalogue: counted, not silently dropped
    assert own.num_interactions == 3
    assert np.array_equal(own.data.train[17], [1]) and own.data.valid[17] == 3 and own.data.test[17] == 2
    sys.modules.pop("myapp_store", None)
