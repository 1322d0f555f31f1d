"""Bytes of the Flower messages a run sends and receives, counted on the messages themselves.

Flower's deployment runtime ships a message as its tree of objects (message, records,
arrays, array chunks), each as its deflated bytes, and a receiving node pulls the whole
tree; `message_bytes` sums exactly that. `CountingGrid` wraps the ServerApp's grid and
counts every message that goes through `send_and_receive`, SecAgg+'s stages included.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def message_bytes(msg: Message) -> tuple[int, int]:
    """(wire bytes of the message's object tree, bytes of the tensors its ArrayRecords hold)."""
    wire = sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
    arrays = sum(_tensor_bytes(a) for record in msg.content.array_records.values() for a in record.values())
    return wire, arrays


def _tensor_bytes(array: Any) -> int:
    """numel × item size; an array without a numpy dtype (the legacy stack's byte blobs, as
    SecAgg+ sends them) counts its raw bytes."""
    try:
        return int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
    except TypeError:
        return len(array.data)


class CountingGrid:
    """The grid, with a running count of the bytes sent and received (`take` reads and resets)."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.counts = _zeros()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        for msg in messages:
            self._count("down", msg)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        for reply in replies:
            if not reply.has_error():
                self._count("up", reply)
        return replies

    def _count(self, direction: str, msg: Message) -> None:
        wire, arrays = message_bytes(msg)
        self.counts[f"wire-bytes-{direction}"] += wire
        self.counts[f"array-bytes-{direction}"] += arrays
        self.counts[f"messages-{direction}"] += 1

    def take(self) -> dict[str, float]:
        counts, self.counts = self.counts, _zeros()
        return counts


def _zeros() -> dict[str, float]:
    return {f"{k}-{d}": 0.0 for k in ("wire-bytes", "array-bytes", "messages") for d in ("down", "up")}
