"""What a federated run moves over the network, per user and per round.

A device downloads the global adapter and uploads its update every round it is sampled;
in device placement it also downloads the frozen base and the item catalogue once. These
are the tensor payloads; the bytes on the wire (Flower's message framing, the task
record, SecAgg+'s extra stages) are measured on the real messages by the server
(`server.traffic`) and reported beside them.
"""

from __future__ import annotations

from typing import Any

from fedrec.model.types import AdapterState


def state_bytes(state: AdapterState, keys: list[str] | None = None) -> int:
    """Bytes of the named tensors (all by default) as they are sent: numel × element size."""
    return int(sum(state[k].numel() * state[k].element_size() for k in (keys if keys is not None else state)))


def per_user_round(adapter: AdapterState, sent_keys: list[str]) -> dict[str, int]:
    """A sampled user's payload in one round: the whole global adapter down, the tensors it
    trains and shares up (float32, as users reply)."""
    up = int(sum(adapter[k].numel() * 4 for k in sent_keys))
    return {"down": state_bytes(adapter), "up": up}


def communication_summary(adapter: AdapterState, sent_keys: list[str], users_trained: int, rows: list[dict[str, Any]],
                          placement: str, setup: dict[str, float] | None = None,
                          once: dict[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Payload per user and round, totals over the run, and the wire bytes the server counted
    on its messages (`wire-bytes-*` in each round's train metrics)."""
    payload = per_user_round(adapter, sent_keys)
    wire = {d: int(sum(r["train"].get(f"wire-bytes-{d}", 0) for r in rows if "train" in r)) for d in ("down", "up")}
    out: dict[str, Any] = {
        "per_user_round": payload,
        "run_total": {d: payload[d] * users_trained for d in ("down", "up")},  # what the run's users would move
        "wire_total": wire,  # what the server's messages measured (in cohort placement: per worker, not per user)
    }
    if placement == "device" and users_trained and any(wire.values()):
        out["wire_per_user_round"] = {d: wire[d] / users_trained for d in ("down", "up")}
    if once:
        out["once_per_device"] = once  # device placement: the frozen base and the catalogue, before round 1
    if setup:
        out["setup_wire"] = setup  # what `connect` exchanged (identify; setup where a device lacked the base)
    return out
