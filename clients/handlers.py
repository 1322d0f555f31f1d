"""What the ClientApp does with each message: a thin adapter between Flower messages and fedrec.

One reply format for both placements (docs/design.md#reply-format): an ArrayRecord `update` holding the
sum of this node's users' clipped, weighted adapter updates, and a MetricRecord `counts`
(num-users, weight, loss-sum, ...). A cohort worker trains whatever users it is sent; a
device node (placement=device) holds exactly one user and refuses any other. A real
device (node config `data-path`) reads only its own data (clients/device.py).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from clients.device import device_model, is_device, read_own_data, state_dir, store_base, store_item_side
from fedrec.aggregate import UpdateSum
from fedrec.config import FedRecConfig
from fedrec.data.interactions import DataError
from fedrec.data.split import SplitData
from fedrec.local_state import client_state_dir
from fedrec.train.engine import train_cohort
from fedrec.train.evaluate import rank_sums, rank_with_adapter
from fedrec.workload import ADAPTER_KEYS, Workload, load_workload, resolve_device


def worker_place() -> dict[str, str]:
    """Which process, and which Ray node, trained a reply: the evidence that a run's
    workers spread over a cluster's machines (ray-address). Outside Ray the node is ""."""
    ray = sys.modules.get("ray")  # imported only where Ray runs this worker; never here
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
    return {"process": f"{socket.gethostname()}:{os.getpid()}", "ray-node": node}


def peak_rss_mb() -> float:
    """This worker process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_MODELS: dict[tuple[str, str, str], torch.nn.Module] = {}
DEVICE_DATA_ERROR = 100  # Error code of a device whose own data is missing or malformed


@dataclass
class _Node:
    """What a message is handled with: config, the users' data, the model and where it runs."""

    cfg: FedRecConfig
    data: SplitData
    model: torch.nn.Module
    device: torch.device
    workload: Workload | None  # None on a real device: it never sees the server's dataset
    unknown_items: int = 0  # a device's interactions with items outside the catalogue


def _model(base: str, cfg: FedRecConfig, device: torch.device, build) -> torch.nn.Module:
    # Keyed by the adapter's config too: one simulation may run several configs (run_many).
    key = (base, cfg.fingerprint(*ADAPTER_KEYS), str(device))
    if key not in _MODELS:
        _MODELS[key] = build()
    return _MODELS[key]


def _node(msg: Message, context: Context) -> _Node:
    return _node_from(msg.content["run-config"], msg.content["task"], context)


def _node_from(run_config, task, context: Context) -> _Node:
    cfg = FedRecConfig.resolved(dict(run_config))  # validated once, by the server
    torch.set_num_threads(max(1, int(cfg.client_num_cpus)))
    device = resolve_device(cfg.device)
    nc = context.node_config
    if is_device(nc):  # a real device: own data, base model received from the server
        fingerprint, users = str(task["base"]), [int(u) for u in task["user-ids"]]
        if len(users) != 1:
            raise ValueError(f"device {nc['user-id']!r} holds one user, was asked for {len(users)}: the server runs "
                             f"placement={cfg.placement}; a federation of devices needs placement=\"device\"")  # fmt: skip
        own = read_own_data(nc, fingerprint, users[0])
        # What never leaves the device (its own B under lora-share=a-only) lives in its state folder.
        cfg = cfg.replace(client_state_dir=str(state_dir(nc) / "client-state"))
        model = _model(fingerprint, cfg, device, lambda: device_model(cfg, nc, fingerprint, own.data.num_items).to(device))
        return _Node(cfg, own.data, model, device, None, own.unknown_items)
    work = load_workload(cfg)
    model = _model(str(work.base_path), cfg, device, lambda: work.model(device))
    return _Node(cfg, work.data, model, device, work)


def _data_error(msg: Message, context: Context, err: Exception) -> Message:
    """A clear error reply instead of a crash: the server leaves this device out and goes on."""
    who = context.node_config.get("user-id", context.node_id)
    return Message(Error(DEVICE_DATA_ERROR, f"device {who}: {err}"), reply_to=msg)


def _own_user(context: Context, node: _Node) -> int | None:
    """The one user a simulated device holds (its partition); None on a cohort worker."""
    nc = context.node_config
    if "partition-id" in nc and node.cfg.placement == "device":
        return int(node.data.private[int(nc["partition-id"])])
    return None


def _users(msg: Message, context: Context, node: _Node) -> list[int]:
    users = [int(u) for u in msg.content["task"]["user-ids"]]
    if node.workload is not None and node.cfg.placement == "device":
        own = _own_user(context, node)
        if users != [own]:
            raise ValueError(f"device node holds user {own}, was asked to train {users}")
    return users


def query(msg: Message, context: Context) -> Message:
    """`identify`: which user this node holds (loading data and model moves start-up out of
    round 1). `setup`: a real device stores the base model and catalogue, then checks it can
    read its own data. A real device's `identify` never reaches here: clients/app.py answers
    it with `clients.device.identify`, before torch is imported."""
    nc = context.node_config
    if is_device(nc):
        fingerprint = str(msg.content["task"]["base"])
        if "base" in msg.content:
            item_ids = [str(i) for i in msg.content["catalogue"]["item-ids"]]
            store_base(nc, fingerprint, msg.content["base"].to_torch_state_dict(), item_ids)
        if "item-side" in msg.content:
            store_item_side(nc, fingerprint, dict(msg.content["run-config"]), dict(msg.content["item-side"]))
        try:
            node = _node(msg, context)
        except (DataError, OSError) as err:
            return _data_error(msg, context, err)
        user = int(node.data.private[0])
        counts = {"num-interactions": len(node.data.train[user]) + 2, "unknown-items": node.unknown_items}
        return Message(RecordDict({"counts": MetricRecord(counts)}), reply_to=msg)
    node = _node(msg, context)
    own = _own_user(context, node)
    return Message(RecordDict({"identity": ConfigRecord({"user-id": -1 if own is None else own})}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    if "fitins.parameters" in msg.content.array_records:
        return _train_secagg(msg, context)
    t0 = time.perf_counter()
    try:
        node = _node(msg, context)
    except (DataError, OSError) as err:
        return _data_error(msg, context, err)
    task = msg.content["task"]
    global_state = msg.content["adapter"].to_torch_state_dict()
    if node.cfg.partition == "silo":
        state = {k: v.to(node.device) for k, v in global_state.items()}
        return _train_silo(msg, node.cfg, node.data, node.model, node.device, _users(msg, context, node), state)
    total = _train_users(node, _users(msg, context, node), global_state, task)
    counts = total.counts() | {"peak-rss-mb": peak_rss_mb(), "train-seconds": time.perf_counter() - t0}
    if node.device.type == "cuda":
        counts["peak-gpu-mb"] = torch.cuda.max_memory_allocated(node.device) / 2**20
    content = RecordDict({"update": ArrayRecord(total.delta), "counts": MetricRecord(counts)})
    place = worker_place()
    if place["ray-node"]:  # a simulated worker only: a real device's reply carries no host name
        content["where"] = ConfigRecord(place)
    return Message(content, reply_to=msg)


def _train_secagg(msg: Message, context: Context) -> Message:
    """The masked-vector stage of SecAgg+: Flower's legacy FitIns in, FitRes out.

    The reply's parameters are this user's clipped update in the adapter's key order; the
    mod masks them so the server only ever recovers the sum. No per-user metrics go out.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    conf = fitins.config
    keys = json.loads(str(conf["adapter-keys"]))
    task = json.loads(str(conf["task"]))
    node = _node_from(json.loads(str(conf["run-config"])), task, context)
    arrays = parameters_to_ndarrays(fitins.parameters)
    global_state = {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays, strict=True)}
    users = [int(u) for u in task["user-ids"]]
    total = _train_users(node, users, global_state, task)
    update = [total.delta[k].numpy() for k in json.loads(str(conf["update-keys"]))]
    if "noise-plan" in task:  # distributed DP: this device's share of the noise goes on before the masks
        update = _encode_with_noise(update, task, users[0], node.cfg.seed, real=is_device(context.node_config))
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 1, {})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def _encode_with_noise(update: list, task: dict, user: int, seed: int, real: bool) -> list:
    """The update as the plan's field integers, noised, shifted into [−T/2, T/2): SecAgg+'s
    quantization (range T/2, T levels) then maps each onto itself (server/secagg.py).

    A real device draws its noise from the OS's entropy: a seed the server knows would let
    it subtract the noise. A simulated device draws from the run's seed, so runs repeat."""
    import numpy as np

    from fedrec.privacy.distributed import SkellamPlan

    plan = SkellamPlan.from_record(dict(task["noise-plan"]))
    rng = np.random.default_rng() if real else np.random.default_rng([seed, int(task["round"]), user, 0xD15C])
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in update])
    field = plan.encode(flat, rng).astype(np.float64) - plan.field / 2
    out, at = [], 0
    for a in update:
        out.append(field[at : at + a.size].reshape(a.shape))
        at += a.size
    return out


def _train_users(node: _Node, users: list[int], global_state: dict, task) -> UpdateSum:
    cfg = node.cfg
    clip = float(task.get("clipping-norm", cfg.clipping_norm))
    return train_cohort(cfg, node.model, global_state, node.data, users, round_=int(task["round"]),
                        clipping_norm=clip, device=node.device)  # fmt: skip

def _train_silo(msg, cfg, data, model, device, users, global_state) -> Message:
    """A cross-silo client: DP-SGD over its users' sequences; its ε ledger persists across rounds."""
    # Imported here: Opacus (and the SciPy it pulls in) added ~1 s to every worker's start-up
    # although only silo runs use it (experiments/README.md#startup).
    from fedrec.train.dpsgd import SiloTraining, train_silo

    task = msg.content["task"]
    ledger = client_state_dir(cfg) / f"silo-{int(task['silo'])}.json"
    history = [tuple(h) for h in json.loads(ledger.read_text())] if ledger.exists() else []
    total, epsilon, history = train_silo(model, global_state, data, users, SiloTraining.from_config(cfg),
                                         round_=int(task["round"]), device=device, history=history)  # fmt: skip
    ledger.parent.mkdir(parents=True, exist_ok=True)
    tmp = ledger.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(history))
    os.replace(tmp, ledger)  # a new file, never written into: checkpoints hard-link the old one
    counts = total.counts() | {"silo-epsilon": epsilon}
    return Message(RecordDict({"update": ArrayRecord(total.delta), "counts": MetricRecord(counts)}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    try:
        node = _node(msg, context)
    except (DataError, OSError) as err:
        return _data_error(msg, context, err)
    users = _users(msg, context, node)
    full, sampled = rank_with_adapter(node.cfg, node.model, msg.content["adapter"].to_torch_state_dict(), node.data,
                                      users, str(msg.content["task"]["split"]), node.device)  # fmt: skip
    # Each user's rank goes back beside the sums: the server's bootstrap intervals resample users.
    ranks = ArrayRecord({"users": torch.as_tensor(users, dtype=torch.int64), "ranks": torch.from_numpy(full)})
    return Message(RecordDict({"metrics": MetricRecord(rank_sums(full, sampled)), "ranks": ranks}), reply_to=msg)
