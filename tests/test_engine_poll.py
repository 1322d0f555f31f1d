"""fedrec's shorter poll in Flower's simulation engine: applied to Flower's own loop, where it has few nodes."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from clients.engine_poll import FAST_POLL_MAX_NODES, poll_messages_faster

ROOT = Path(__file__).resolve().parents[1]


class _CountingState:
    """Stands in for the LinkState the loop asks for new messages (it only calls this)."""

    def __init__(self) -> None:
        self.calls = 0

    def get_message_ins(self, node_id: int, limit: int) -> list:
        self.calls += 1
        return []


def _passes_in(seconds: float, nodes: int) -> float:
    """How many times Flower's loop went through all `nodes` nodes' queues in `seconds`."""
    state, stop = _CountingState(), threading.Event()
    mapping = {n + 1: n for n in range(nodes)}
    worker = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, queue.Queue(), mapping, stop))
    worker.start()
    time.sleep(seconds)
    stop.set()
    worker.join(timeout=5)
    assert not worker.is_alive()
    return state.calls / nodes


@pytest.fixture
def flower_loop():
    original = vce_api.add_messages_to_queue
    poll_messages_faster(None)  # clients.app may have installed it at import
    yield getattr(original, "__wrapped__", original)
    vce_api.add_messages_to_queue = original


def test_the_engine_looks_for_messages_every_few_ms_once_patched(flower_loop):
    before = _passes_in(0.3, 1)
    assert poll_messages_faster(0.005)  # Flower's loop has the signature this expects
    assert poll_messages_faster(0.005)  # applying twice wraps Flower's function, not our wrapper
    assert vce_api.add_messages_to_queue.__wrapped__ is flower_loop
    after = _passes_in(0.3, 1)
    assert poll_messages_faster(None)  # Flower's own again
    assert vce_api.add_messages_to_queue is flower_loop
    assert before <= 4  # Flower's own 0.1 s wait
    assert after >= 20  # ~60 at 5 ms; generous for a loaded CI machine


def test_a_simulation_with_many_nodes_keeps_flowers_wait(flower_loop):
    assert poll_messages_faster(0.005)
    assert _passes_in(0.3, FAST_POLL_MAX_NODES + 1) <= 4
    assert _passes_in(0.3, FAST_POLL_MAX_NODES) >= 20


def _patched_after(imports: str) -> str:
    code = f"{imports}; import sys; e = sys.modules.get('{vce_api.__name__}'); " \
           "print('not loaded' if e is None else hasattr(e.add_messages_to_queue, '__wrapped__'))"  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_the_client_app_patches_the_engine_that_loads_it_and_nothing_else():
    # `flwr run`: Flower's simulation process has the engine loaded when it imports the ClientApp
    assert _patched_after(f"import {vce_api.__name__}; import clients.app") == "True"
    # a real device's ClientApp process: the engine is neither imported nor patched
    assert _patched_after("import clients.app") == "not loaded"
