"""The grid, with a wait for replies that a stop request (Ctrl-C, SIGTERM) cuts short.

Flower's `send_and_receive` sleeps between pulls until every reply is in or the timeout
passes; a round of a large cohort can take minutes. This one pushes and pulls the same
way but looks at `fedrec.interrupt` between pulls, so the run abandons the round within
one pull interval. It does so only where `stoppable`: a round is abandoned before it
changed the run's state, but clients that keep state between rounds (lora-share=a-only's
own B, a silo's ledger) may already have written theirs, so those rounds finish first.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message

from fedrec.interrupt import check, wait

# Flower's deployment grid pauses 3 s between pulls in its own send_and_receive (1.42,
# hard-coded); a pull is one small request to the SuperLink, so this loop asks every 0.1 s
# and a reply is seen when it arrives (experiments/README.md#loopback).
DEFAULT_PULL_S = 0.1


class StoppableGrid:
    def __init__(self, grid: Any, stoppable: bool) -> None:
        self._grid, self.stoppable = grid, stoppable

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_grid", "stoppable"):
            object.__setattr__(self, name, value)
        else:  # e.g. the simulation grid's pull_interval
            setattr(self._grid, name, value)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.time() + timeout
        interval = getattr(self._grid, "pull_interval", DEFAULT_PULL_S)
        replies: list[Message] = []
        while pending and (end is None or time.time() < end):
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending:
                break
            if self.stoppable:
                if wait(interval):
                    check("in the middle of a round, which was abandoned")
            else:
                time.sleep(interval)
        return replies
