"""fedrec's shorter poll in Flower's simulation engine: applied to Flower's own loop, and it works."""

from __future__ import annotations

import queue
import threading
import time

from flwr.server.superlink.fleet.vce import vce_api

from fedrec.simulate import poll_messages_faster


class _CountingState:
    """Stands in for the LinkState the loop asks for new messages (it only calls this)."""

    def __init__(self) -> None:
        self.calls = 0

    def get_message_ins(self, node_id: int, limit: int) -> list:
        self.calls += 1
        return []


def _polls_in(seconds: float) -> int:
    state, stop = _CountingState(), threading.Event()
    worker = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, queue.Queue(), {1: 0}, stop))
    worker.start()
    time.sleep(seconds)
    stop.set()
    worker.join(timeout=5)
    assert not worker.is_alive()
    return state.calls


def test_the_engine_looks_for_messages_every_few_ms_once_patched():
    original = vce_api.add_messages_to_queue
    try:
        before = _polls_in(0.3)
        assert poll_messages_faster(0.005)  # Flower's loop has the signature this expects
        assert poll_messages_faster(0.005)  # applying twice wraps Flower's function, not our wrapper
        assert vce_api.add_messages_to_queue.__wrapped__ is original
        after = _polls_in(0.3)
        assert poll_messages_faster(None)  # a later simulation with many nodes: Flower's own again
        assert vce_api.add_messages_to_queue is original
    finally:
        vce_api.add_messages_to_queue = original
    assert before <= 4  # Flower's own 0.1 s wait
    assert after >= 20  # ~60 at 5 ms; generous for a loaded CI machine
