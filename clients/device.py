"""A real device: its own interactions from a local source, the base model from the server.

A device is a SuperNode started with `--node-config "user-id=... data-path=..."`. It
never reads the server's dataset. Before round 1 the server sends it the frozen base model
and the item catalogue once (the `setup` query); the device keeps them in its state
folder, because in the deployment runtime every message runs in a fresh ClientApp process.
Its own interactions are read from `data-path` at each message, mapped through the
catalogue, and split leave-one-out exactly as the server splits simulated users.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.sources import open_source
from fedrec.data.interactions import DataError
from fedrec.data.split import SplitData, one_user_split

if TYPE_CHECKING:  # torch and peft load only where a model is needed (see clients/app.py)
    import torch

    from fedrec.config import FedRecConfig

MIN_INTERACTIONS = 3  # leave-one-out needs a training item, a validation and a test target


def is_device(node_config: dict) -> bool:
    return "data-path" in node_config


def state_dir(node_config: dict) -> Path:
    """Where the device keeps the base model and catalogue (node config `state-dir`)."""
    default = Path.home() / ".cache" / "fedrec" / f"device-{node_config['user-id']}"
    return Path(str(node_config.get("state-dir", default))).expanduser()


def has_base(node_config: dict, fingerprint: str) -> bool:
    return (state_dir(node_config) / f"{fingerprint}.pt").exists()


def device_key(node_config: dict) -> str:
    """An opaque id this device enrolls with: random, made once and kept in its state folder.
    It names the device to the server without its user id or anything from its history."""
    path = state_dir(node_config) / "device-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(secrets.token_hex(16))
        os.replace(tmp, path)
    return path.read_text().strip()


def identify(msg: Message, context: Context) -> Message:
    """Who this device is and whether it still needs the base model: no torch needed.

    A server that enrolls its private users (`enroll` in the task) gets only an opaque key;
    one that holds the list of private users gets the node config's `user-id` to find it in."""
    nc = context.node_config
    task = msg.content["task"]
    fingerprint = str(task["base"])
    who = {"device-key": device_key(nc)} if int(task.get("enroll", 0)) else {"user-key": str(nc["user-id"])}
    identity = who | {"needs-base": int(not has_base(nc, fingerprint))}
    return Message(RecordDict({"identity": ConfigRecord(identity)}), reply_to=msg)


def store_base(node_config: dict, fingerprint: str, state: dict[str, torch.Tensor], item_ids: list[str]) -> None:
    import torch

    folder = state_dir(node_config)
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in (
        (f"{fingerprint}.json", lambda p: p.write_text(json.dumps(item_ids))),
        (f"{fingerprint}.pt", lambda p: torch.save(state, p)),
    ):
        tmp = folder / f"{name}.tmp{os.getpid()}"
        write(tmp)
        os.replace(tmp, folder / name)  # the .pt last: its presence means both are whole


@dataclass
class DeviceData:
    data: SplitData
    num_interactions: int
    unknown_items: int  # interactions with items the catalogue lacks (the model cannot score them)


def read_own_data(node_config: dict, fingerprint: str, user: int) -> DeviceData:
    """This device's sequence, under the server's index `user`; DataError says what is wrong."""
    item_ids = json.loads((state_dir(node_config) / f"{fingerprint}.json").read_text())
    index = {raw: i + 1 for i, raw in enumerate(item_ids)}
    user_id = str(node_config["user-id"])
    if "source-module" in node_config:  # an app's own reader registers itself on import
        importlib.import_module(str(node_config["source-module"]))
    raw = open_source(str(node_config["data-path"])).items(user_id)
    mapped = [index[r] for r in raw if r in index]
    if len(mapped) < MIN_INTERACTIONS:
        raise DataError(
            f"user {user_id!r}: {len(mapped)} interactions with catalogue items in {node_config['data-path']} "
            f"({len(raw) - len(mapped)} with unknown items); at least {MIN_INTERACTIONS} are needed"
        )
    data = one_user_split(np.asarray(mapped, dtype=np.int64), user, user_id, item_ids)
    return DeviceData(data, len(mapped), len(raw) - len(mapped))


def _item_side_path(node_config: dict, fingerprint: str, run_config: dict) -> Path:
    from fedrec.config import FedRecConfig
    from fedrec.workload import ITEM_KEYS

    key = FedRecConfig.resolved(run_config).fingerprint(*ITEM_KEYS)
    return state_dir(node_config) / f"{fingerprint}.item-side-{key}.json"


def store_item_side(node_config: dict, fingerprint: str, run_config: dict, record: dict) -> None:
    """The item adapter's public inputs (row set or item features), as the server sent them."""
    path = _item_side_path(node_config, fingerprint, run_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({k: list(v) if isinstance(v, (list, tuple)) else v for k, v in record.items()}))
    os.replace(tmp, path)


def device_model(cfg: FedRecConfig, node_config: dict, fingerprint: str, num_items: int) -> torch.nn.Module:
    """The server's base with the run's seeded LoRA and item adapter, built as on every simulated worker."""
    from fedrec.workload import ItemSide, build_model

    side = None
    if cfg.item_adapter in ("rows", "features"):
        path = _item_side_path(node_config, fingerprint, cfg.to_dict())
        if not path.exists():
            raise DataError(f"item-adapter={cfg.item_adapter}: the server's item inputs are missing ({path})")
        side = ItemSide.from_record(json.loads(path.read_text()))
    return build_model(cfg, num_items, state_dir(node_config) / f"{fingerprint}.pt", side=side)
