"""docs/plug-in-client.md's own code blocks, taken from the markdown: the reader it teaches
reads a device's data, its configs parse as fedrec and Flower read them, and every flag its
commands use exists. The one-machine trial itself runs in tests/integration/test_deployment.py."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from clients.device import read_own_data, store_base
from clients.sources import open_source
from fedrec.config import FedRecConfig, parse_run_config
from server.local_federation import connection_config

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plug-in-client.md"
BIN = Path(sys.executable).parent


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def commands() -> list[list[str]]:
    """Every command of the guide's bash blocks, its continuation lines joined."""
    return [shlex.split(b.replace("\\\n", " ")) for b in blocks("bash")]


@cache
def flags_of(*program: str) -> set[str]:
    exe = [str(BIN / program[0]), *program[1:]] if (BIN / program[0]).exists() else [sys.executable, "-m", *program]
    out = subprocess.run([*exe, "--help"], capture_output=True, text=True, timeout=120)
    return set(re.findall(r"--[a-z][a-z0-9-]*", out.stdout + out.stderr))


@pytest.fixture
def guide_module(tmp_path, monkeypatch):
    """The guide's `myapp/store.py`, written where the guide says, importable."""
    (source,) = [b for b in blocks("python") if b.startswith("# myapp/store.py")]
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "store.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("myapp", "myapp.store"):
        sys.modules.pop(name, None)
    yield
    for name in ("myapp", "myapp.store"):
        sys.modules.pop(name, None)


def test_the_guides_reader_reads_what_its_writer_wrote(tmp_path, guide_module):
    import myapp.store as store

    path = tmp_path / f"plays{store.SUFFIX}"
    store.write_rows([("u42", "item-b", 20.0), ("u42", "item-a", 10.0), ("u42", "item-zzz", 30.0), ("u42", "item-c", 40.0)], path)
    assert open_source(path).items("u42") == ["item-a", "item-b", "item-zzz", "item-c"]
    # The node config the guide's device command gives: the device imports the module, then reads.
    nc = {"user-id": "u42", "data-path": str(path), "state-dir": str(tmp_path / "state"), "source-module": "myapp.store"}
    store_base(nc, "base-x", {}, ["item-a", "item-b", "item-c"])
    own = read_own_data(nc, "base-x", user=7)
    assert own.unknown_items == 1 and own.num_interactions == 3
    assert np.array_equal(own.data.train[7], [1]) and own.data.valid[7] == 2 and own.data.test[7] == 3


def test_the_guides_connection_config_is_the_one_local_federation_writes():
    (guide,) = blocks("toml")
    theirs = tomllib.loads(guide)
    ours = tomllib.loads(connection_config("my-federation", "superlink.example:9093", Path("/etc/fedrec/ca.crt")))
    assert theirs == ours


def test_every_flag_in_the_guides_commands_exists():
    programs = {"flower-superlink": ("flower-superlink",), "flower-supernode": ("flower-supernode",)}
    seen = set()
    for cmd in commands():
        if cmd[:3] == [".venv/bin/python", "-m", "server.local_federation"]:
            program, args = ("server.local_federation",), cmd[3:]
        elif cmd[0] == "flwr":
            program, args = tuple(cmd[:3] if cmd[1] == "supernode" else cmd[:2]), cmd[2:]
        else:
            program, args = programs[cmd[0]], cmd[1:]
        used = {a.split("=")[0] for a in args if a.startswith("--")}
        assert used <= flags_of(*program), (program, used - flags_of(*program))
        seen.add(program[-1])
    assert seen == {"server.local_federation", "flower-superlink", "flower-supernode", "register", "run"}


def test_the_guides_run_configs_are_valid_fedrec_configs():
    for cmd in commands():
        if "--run-config" in cmd:
            pairs = parse_run_config(cmd[cmd.index("--run-config") + 1])
            cfg = FedRecConfig.from_mapping(pairs | ({"placement": "device"} if "placement" not in pairs else {}))
            assert cfg.noise_placement == "devices" and cfg.secure_aggregation == "secagg+"
    (device,) = [c for c in commands() if c[0] == "flower-supernode"]
    pairs = re.findall(r'([a-z-]+)=("[^"]*"|\S+)', device[device.index("--node-config") + 1])
    node_config = tomllib.loads("\n".join(f'"{k}" = {v}' for k, v in pairs))  # as Flower parses it: TOML values
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", GUIDE.read_text(), flags=re.M))
    assert set(node_config) <= documented and {"user-id", "data-path"} <= set(node_config)
