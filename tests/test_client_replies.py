"""Every reply a client sends, inspected: only adapter arrays and scalar metrics leave it.

The real ClientApp is called with real Flower messages, as the runtime calls it: a real
device (own data file, base model shipped by the server) and a cohort worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_csv_dataset
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app
from clients.handlers import DEVICE_DATA_ERROR
from fedrec.config import FedRecConfig
from fedrec.model.lora import adapter_parameters, adapter_state
from fedrec.workload import prepare_workload
from server.local_federation import device_files

NODE = 7


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    tmp = tmp_path_factory.mktemp("replies")
    cfg = FedRecConfig(
        dataset="csv", data_path=str(write_csv_dataset(tmp / "data.csv")), placement="device", public_fraction=0.9,
        hidden_size=16, num_blocks=1, max_seq_len=20, pretrain_epochs=3, clipping_norm=0.5, cache_dir=str(tmp / "cache"),
    )  # fmt: skip
    work = prepare_workload(cfg)
    model = work.model()
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in adapter_state(model).items()}
    return cfg, work, state, list(adapter_parameters(model)), tmp


def _send(content: dict, kind: str, node_config: dict) -> Message:
    """Through the ClientApp; a real device's messages go to its warm worker only where the
    node config asks (`warm`), the others run in this process."""
    node_config = {"warm": False} | node_config
    msg = Message(RecordDict(content), dst_node_id=NODE, message_type=kind)
    return app(msg, Context(run_id=1, node_id=NODE, node_config=node_config, state=RecordDict(), run_config={}))


def _records(cfg, task: dict, **extra) -> dict:
    return {"task": ConfigRecord(task), "run-config": ConfigRecord(cfg.to_dict())} | extra


def assert_only_adapter_and_scalars(reply: Message, shapes: dict[str, torch.Size], sequences: list[list[int]]) -> None:
    assert not reply.has_error(), reply.error
    for name, record in reply.content.items():
        if name == "ranks":  # evaluation: each evaluated user's id and their target's rank, nothing else
            arrays = record.to_torch_state_dict()
            assert set(arrays) == {"users", "ranks"} and arrays["users"].shape == arrays["ranks"].shape
            assert arrays["ranks"].dtype == torch.int64 and arrays["ranks"].ndim == 1
            continue
        if isinstance(record, ArrayRecord):
            arrays = record.to_torch_state_dict()
            assert set(arrays) <= set(shapes), f"{name}: tensors that are not adapter tensors"
            for k, v in arrays.items():
                assert v.shape == shapes[k] and v.dtype == torch.float32, k
        elif isinstance(record, MetricRecord):
            assert all(isinstance(v, (int, float)) for v in record.values()), f"{name}: non-scalar metric"
        elif isinstance(record, ConfigRecord):  # identity only: who the device is, never what it did
            assert set(record) <= {"user-key", "device-key", "needs-base", "user-id"}, f"{name}: {set(record)}"
            assert all(isinstance(v, (int, str)) and "item-" not in str(v) for v in record.values())
        else:
            raise AssertionError(f"{name}: unexpected record {type(record).__name__}")
        flat = [float(x) for x in _flatten(record)]
        for seq in sequences:  # no record carries the user's items in order
            assert not any(flat[i : i + len(seq)] == [float(s) for s in seq] for i in range(len(flat))), name


def _flatten(record) -> list:
    if isinstance(record, ArrayRecord):
        return []  # float32 adapter tensors, checked by key and shape above
    values = []
    for v in record.values():
        values += list(v) if isinstance(v, list) else [v]
    return [v for v in values if isinstance(v, (int, float))]


def test_a_real_devices_replies_carry_only_adapters_and_scalars(run):
    cfg, work, state, trained, tmp = run
    user = int(work.data.private[0])
    (nc,) = device_files(tmp / "data.csv", [work.data.user_ids[user]], tmp / "device")
    nc |= {"warm": True, "warm-idle-s": 60}  # as on a device: a warm worker handles every message but identify
    shapes = {k: v.shape for k, v in state.items()}
    seq = work.data.full_sequence(user).tolist()
    fp = work.base_path.stem
    base = {"base": ArrayRecord(torch.load(work.base_path, weights_only=True)),
            "catalogue": ConfigRecord({"item-ids": work.data.item_ids})}  # fmt: skip

    identify = _send(_records(cfg, {"kind": "identify", "base": fp}), "query", nc)
    assert identify.content["identity"]["needs-base"] == 1
    setup = _send(_records(cfg, {"kind": "setup", "base": fp, "user-ids": [user]}, **base), "query", nc)
    assert setup.content["counts"]["num-interactions"] == len(seq)
    task = {"round": 1, "clipping-norm": cfg.clipping_norm, "base": fp, "user-ids": [user]}
    trained_reply = _send(_records(cfg, task, adapter=ArrayRecord(state)), "train", nc)
    update = trained_reply.content["update"].to_torch_state_dict()
    assert sorted(update) == sorted(trained) and any(v.abs().sum() > 0 for v in update.values())
    evaluated = _send(_records(cfg, {"split": "test", "base": fp, "user-ids": [user]}, adapter=ArrayRecord(state)), "evaluate", nc)
    assert evaluated.content["metrics"]["count"] == 1
    assert evaluated.content["ranks"].to_torch_state_dict()["users"].tolist() == [user]
    for reply in (identify, setup, trained_reply, evaluated):
        assert_only_adapter_and_scalars(reply, shapes, [seq, seq[:-2]])
    assert _send(_records(cfg, {"kind": "identify", "base": fp}), "query", nc).content["identity"]["needs-base"] == 0
    # One worker answered setup, train and evaluate: started once, then kept warm.
    log = (Path(nc["state-dir"]) / "warm-worker.log").read_text()
    assert log.count("listening on") == 1 and "train: " in log and "evaluate: " in log, log
    # A server that enrolls its devices learns an opaque key, never the user id, and the same one every time.
    keys = [_send(_records(cfg, {"kind": "identify", "base": fp, "enroll": 1}), "query", nc).content["identity"]
            for _ in range(2)]  # fmt: skip
    assert "user-key" not in keys[0] and keys[0]["device-key"] == keys[1]["device-key"] != nc["user-id"]
    assert_only_adapter_and_scalars(Message(RecordDict({"identity": ConfigRecord(keys[0])}), dst_node_id=NODE,
                                            message_type="query"), shapes, [seq])  # fmt: skip


def test_a_device_asked_for_a_cohort_says_the_server_needs_device_placement(run):
    cfg, work, state, _trained, tmp = run
    users = [int(u) for u in work.data.private[:2]]
    (nc,) = device_files(tmp / "data.csv", [work.data.user_ids[users[0]]], tmp / "device-cohort")
    task = {"round": 1, "clipping-norm": 0.5, "base": work.base_path.stem, "user-ids": users}
    # Raised in the ClientApp; Flower's runtime sends it to the server as the reply's error.
    with pytest.raises(ValueError, match='holds one user, was asked for 2: the server runs placement=cohort; '
                                         'a federation of devices needs placement="device"'):  # fmt: skip
        _send(_records(cfg.replace(placement="cohort"), task, adapter=ArrayRecord(state)), "train", nc)


def test_a_device_with_missing_or_malformed_data_replies_with_an_error(run):
    cfg, work, state, _trained, tmp = run
    user = int(work.data.private[1])
    fp = work.base_path.stem
    base = {"base": ArrayRecord(torch.load(work.base_path, weights_only=True)),
            "catalogue": ConfigRecord({"item-ids": work.data.item_ids})}  # fmt: skip
    bad = tmp / "bad.jsonl"
    bad.write_text('{"user": "u1", "item": "item-3", "timestamp": 1}\nnot json\n')
    for path, says in ((tmp / "absent.csv", "file not found"), (bad, "bad.jsonl:2: not JSON")):
        nc = {"user-id": work.data.user_ids[user], "data-path": str(path), "state-dir": str(tmp / "bad-state")}
        reply = _send(_records(cfg, {"kind": "setup", "base": fp, "user-ids": [user]}, **base), "query", nc)
        assert reply.has_error() and reply.error.code == DEVICE_DATA_ERROR and says in reply.error.reason
        task = {"round": 1, "clipping-norm": 0.5, "base": fp, "user-ids": [user]}
        reply = _send(_records(cfg, task, adapter=ArrayRecord(state)), "train", nc)
        assert reply.has_error() and says in reply.error.reason


def test_a_cohort_workers_reply_is_one_sum_and_scalars(run):
    cfg, work, state, trained, _tmp = run
    cfg = cfg.replace(placement="cohort")
    users = [int(u) for u in work.data.private[:4]]
    reply = _send(_records(cfg, {"round": 1, "clipping-norm": 0.5, "user-ids": users}, adapter=ArrayRecord(state)),
                  "train", {})  # fmt: skip
    assert reply.content["counts"]["num-users"] == len(users)
    sequences = [work.data.train[u].tolist() for u in users if len(work.data.train[u]) > 2]
    assert_only_adapter_and_scalars(reply, {k: v.shape for k, v in state.items()}, sequences)
    assert np.isfinite(reply.content["counts"]["loss-sum"])


def test_a_real_device_builds_the_item_adapter_from_what_the_server_sends(run):
    """Rows are chosen from public data the device never sees: they arrive in `setup`."""
    cfg, work, _state, _trained, tmp = run
    cfg = cfg.replace(item_adapter="rows", item_rows=10)
    work = prepare_workload(cfg)
    model = work.model()
    state = adapter_state(model)
    user = int(work.data.private[2])
    (nc,) = device_files(tmp / "data.csv", [work.data.user_ids[user]], tmp / "device-rows")
    fp = work.base_path.stem
    base = {"base": ArrayRecord(torch.load(work.base_path, weights_only=True)),
            "catalogue": ConfigRecord({"item-ids": work.data.item_ids})}  # fmt: skip
    task = {"round": 1, "clipping-norm": cfg.clipping_norm, "base": fp, "user-ids": [user]}
    setup = _send(_records(cfg, {"kind": "setup", "base": fp, "user-ids": [user]}, **base), "query", nc)
    assert setup.has_error() and "item inputs are missing" in setup.error.reason  # without them it refuses
    side = {"item-side": ConfigRecord(work.item_side.to_record())}
    setup = _send(_records(cfg, {"kind": "setup", "base": fp, "user-ids": [user]}, **side), "query", nc)
    assert not setup.has_error(), setup.error
    reply = _send(_records(cfg, task, adapter=ArrayRecord(state)), "train", nc)
    update = reply.content["update"].to_torch_state_dict()
    assert update["base_model.model.item_delta.R"].shape == (10, cfg.hidden_size)
    # and it equals what a simulated worker computes for the same user from the server's own data
    from fedrec.train.vectorized import train_users_vectorized

    from fedrec.train.settings import LocalTraining, RoundContext

    ctx = RoundContext(round=1, clipping_norm=cfg.clipping_norm, device=torch.device("cpu"))
    ref = train_users_vectorized(model, state, work.data, [user], LocalTraining.from_config(cfg), ctx)
    for k, v in ref.delta.items():
        torch.testing.assert_close(update[k], v, rtol=1e-4, atol=1e-6)
