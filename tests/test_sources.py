"""Device data sources: the same user read from CSV, JSON lines, SQLite and an app's own reader."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from clients.device import read_own_data, store_base
from clients.sources import CsvSource, JsonlSource, SqliteSource, open_source
from fedrec.data.interactions import DataError
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
