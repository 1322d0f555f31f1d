"""A shorter wait in Flower's simulation engine between looks for new messages, where it serves few nodes.

Flower 1.41 hard-codes `f_stop.wait(0.1)` in `vce_api.add_messages_to_queue`, so a train
message waits 50 ms on average before a worker sees it; a vectorized round is short
enough that this wait was a sizeable share of it
(experiments/README.md#throughput-what-moved). No setting reaches that literal,
so the loop is handed a stop event whose wait is shorter. Only where the
simulation has few nodes (cohort placement): each pass asks the state once per node, so
with one node per user (device placement) a 5 ms wait would keep a core busy scanning.

Installed by `fedrec.simulate.launch` and, for `flwr run`, by clients/app.py when Flower's
simulation engine has loaded it (the engine imports the ClientApp before it starts the
loop). This module imports nothing heavy: it also loads on real devices, where it does
nothing.
"""

from __future__ import annotations

import functools
import inspect
import sys

FAST_POLL_S, FAST_POLL_MAX_NODES = 0.005, 64
_ENGINE = "flwr.server.superlink.fleet.vce.vce_api"


class _ShortWait:
    """A stop event whose `wait` never sleeps longer than `interval`."""

    def __init__(self, event, interval: float) -> None:
        self._event, self._interval = event, interval

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(self._interval if timeout is None else min(timeout, self._interval))


def poll_messages_faster(
    interval: float | None = FAST_POLL_S, max_nodes: int = FAST_POLL_MAX_NODES, *, only_if_loaded: bool = False
) -> bool:
    """Make Flower's engine look for new messages every `interval` s, not 0.1 s, in
    simulations of at most `max_nodes` nodes (None: Flower's own loop again).

    `only_if_loaded`: do nothing unless Flower's simulation engine is already imported
    (so a real device never imports it). Returns False, changing nothing, where Flower's
    function is not the one this expects.
    """
    if only_if_loaded and _ENGINE not in sys.modules:
        return False
    from flwr.server.superlink.fleet.vce import vce_api

    current = vce_api.add_messages_to_queue
    original = getattr(current, "__wrapped__", current)
    if list(inspect.signature(original).parameters) != ["state", "queue", "nodes_mapping", "f_stop"]:
        return False
    if interval is None:
        vce_api.add_messages_to_queue = original
        return True

    @functools.wraps(original)
    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        few = len(nodes_mapping) <= max_nodes
        return original(state, queue, nodes_mapping, _ShortWait(f_stop, interval) if few else f_stop)

    vce_api.add_messages_to_queue = add_messages_to_queue
    return True
