"""Progress with an estimate of the time left, for pretraining, rounds and sweeps.

In a terminal a rich bar redraws in place; in a log file (no terminal) a compact line is
written each time another tenth of the work is done, so a log of a long run stays short
and still says how far it got and how long it has left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOG_EVERY = 0.1  # a line per tenth of the work in a log file


def duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`: a time left, read at a glance."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def eta(done: int, total: int, elapsed: float) -> str:
    """The time left at the pace so far ("" before anything is done)."""
    if done <= 0 or total <= done:
        return ""
    return duration(elapsed / done * (total - done))


class Ticker:
    """`total` steps of `label`: a bar with the time left in a terminal; elsewhere `log`
    gets a line each tenth. `advance(n, note)`; `close(note)` says where it ended."""

    def __init__(self, label: str, total: int, log: Callable[[str], None] = print, terminal: bool | None = None) -> None:
        self.label, self.total, self.log = label, max(int(total), 1), log
        self.done, self.t0 = 0, time.monotonic()
        self._bar: Progress | None = None
        if terminal if terminal is not None else sys.stdout.isatty():
            self._bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                                 console=Console(), transient=False)  # fmt: skip
            self._task = self._bar.add_task(label, total=self.total, note="")
            self._bar.start()

    def advance(self, n: int = 1, note: str = "") -> None:
        before, self.done = self.done, min(self.done + n, self.total)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, note=note)
            return
        step = max(1, int(self.total * LOG_EVERY))
        if before // step != self.done // step or self.done == self.total:
            self.log(self._line(note))

    def _line(self, note: str) -> str:
        elapsed = time.monotonic() - self.t0
        left = eta(self.done, self.total, elapsed)
        return (f"{self.label}: {self.done:,}/{self.total:,} ({self.done / self.total:.0%}), {duration(elapsed)}"
                + (f", about {left} left" if left else "") + (f"; {note}" if note else ""))  # fmt: skip

    def close(self, note: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, note=note)
            self._bar.stop()
            self._bar = None
        elif note:
            self.log(f"{self.label}: {note}")
