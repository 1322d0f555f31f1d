"""The Flower ClientApp: a thin adapter between Flower messages and fedrec.train.

One reply format for both placements (DESIGN.md): an ArrayRecord `update` holding the
sum of this node's users' clipped, weighted adapter updates, and a MetricRecord `counts`
(num-users, weight, loss-sum, ...). A cohort worker trains whatever users it is sent; a
device node (placement=device) holds exactly one user and refuses any other.
"""

from __future__ import annotations

import json
import resource
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.config import FedRecConfig
from fedrec.local_state import client_state_dir, local_store_for
from fedrec.model.lora import load_adapter_state
from fedrec.privacy.dpsgd import train_silo
from fedrec.train import evaluate_users, train_users
from fedrec.vectorized import train_users_vectorized
from fedrec.workload import Workload, load_workload, resolve_device

app = ClientApp()

def peak_rss_mb() -> float:
    """This worker process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def _setup(msg: Message) -> tuple[FedRecConfig, Workload, torch.nn.Module, torch.device]:
    cfg = FedRecConfig.from_mapping(dict(msg.content["run-config"]))
    torch.set_num_threads(max(1, int(cfg.client_num_cpus)))
    work = load_workload(cfg, pretrain=False)
    device = resolve_device(cfg.device)
    key = (str(work.base_path), str(device))
    if key not in _MODELS:
        _MODELS[key] = work.model(device)
    return cfg, work, _MODELS[key], device


def _own_user(context: Context, work: Workload) -> int | None:
    """The one user a device node holds, from its node config; None on a cohort worker."""
    nc = context.node_config
    if "user-id" in nc:  # a real device, started with --node-config "user-id=..."
        return int(nc["user-id"])
    if "partition-id" in nc:  # a simulated device: the k-th private user
        return int(work.data.private[int(nc["partition-id"])])
    return None


def _users(msg: Message, context: Context, work: Workload, cfg: FedRecConfig) -> list[int]:
    users = [int(u) for u in msg.content["task"]["user-ids"]]
    if cfg.placement == "device":
        own = _own_user(context, work)
        if users != [own]:
            raise ValueError(f"device node holds user {own}, was asked to train {users}")
    return users


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which user this node holds (device placement routing).

    Loading the workload and model here moves a node's start-up out of round 1.
    """
    cfg, work, _model, _device = _setup(msg)
    own = _own_user(context, work)
    return Message(RecordDict({"identity": ConfigRecord({"user-id": -1 if own is None else own})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    cfg, work, model, device = _setup(msg)
    users = _users(msg, context, work, cfg)
    task = msg.content["task"]
    global_state = {k: v.to(device) for k, v in msg.content["adapter"].to_torch_state_dict().items()}
    if cfg.partition == "silo":
        return _train_silo(msg, cfg, work, model, device, users, global_state)
    common = dict(
        local_epochs=cfg.local_epochs,
        learning_rate=cfg.learning_rate,
        clipping_norm=float(task.get("clipping-norm", cfg.clipping_norm)),
        user_weighting=cfg.user_weighting,
        max_seq_len=cfg.max_seq_len,
        seed=cfg.seed,
        round_=int(task["round"]),
        device=device,
        local_store=local_store_for(cfg),
    )
    if cfg.vectorized:
        total = train_users_vectorized(
            model, global_state, work.data, users, group_tokens=cfg.vector_tokens,
            scoring_dtype=getattr(torch, cfg.scoring_dtype), **common,
        )  # fmt: skip
    else:
        total = train_users(model, global_state, work.data, users, **common)
    counts = total.counts() | {"peak-rss-mb": peak_rss_mb(), "train-seconds": time.perf_counter() - t0}
    content = RecordDict({"update": ArrayRecord(total.delta), "counts": MetricRecord(counts)})
    return Message(content, reply_to=msg)


def _train_silo(msg, cfg, work, model, device, users, global_state) -> Message:
    """A cross-silo client: DP-SGD over its users' sequences; its ε ledger persists across rounds."""
    task = msg.content["task"]
    ledger = client_state_dir(cfg) / f"silo-{int(task['silo'])}.json"
    history = [tuple(h) for h in json.loads(ledger.read_text())] if ledger.exists() else []
    total, epsilon, history = train_silo(
        model, global_state, work.data, users, epochs=cfg.local_epochs, learning_rate=cfg.learning_rate,
        noise_multiplier=cfg.dpsgd_noise_multiplier, max_grad_norm=cfg.dpsgd_max_grad_norm,
        batch_size=cfg.dpsgd_batch_size, delta=cfg.target_delta or 1.0 / len(users), max_seq_len=cfg.max_seq_len,
        seed=cfg.seed, round_=int(task["round"]), device=device, history=history,
    )  # fmt: skip
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text(json.dumps(history))
    counts = total.counts() | {"silo-epsilon": epsilon}
    return Message(RecordDict({"update": ArrayRecord(total.delta), "counts": MetricRecord(counts)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, work, model, device = _setup(msg)
    users = _users(msg, context, work, cfg)
    load_adapter_state(model, msg.content["adapter"].to_torch_state_dict())
    sums = evaluate_users(
        model, work.data, users, str(msg.content["task"]["split"]), max_seq_len=cfg.max_seq_len, device=device,
        local_store=local_store_for(cfg),
    )  # fmt: skip
    return Message(RecordDict({"metrics": MetricRecord(sums)}), reply_to=msg)
