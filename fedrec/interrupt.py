"""Ctrl-C and SIGTERM: stop at the next safe point, keep a checkpoint, leave no process behind.

Python's own SIGINT handling raises KeyboardInterrupt wherever the main thread happens to
be. Under Flower's simulation that is the engine's loop, whose shutdown then waits for
tasks on Ray workers that never end, while those workers keep running (the hang reported
in issue 27, Flower 1.41/1.42 with Ray 2.55). So a driver (`fedrec.simulate`, the sweep
scripts) runs `with handling():` instead:

- the first SIGINT or SIGTERM only asks to stop. The places that can stop safely look at
  the request: pretraining between minibatches, the round loop between rounds, a port's
  wait for replies. The run then writes its checkpoint, says how to resume
  (`mark_safe`) and raises `Interrupted`, which unwinds Flower and Ray normally;
- where no safe point comes within SAFE_WAIT_S, or the unwinding takes more than GRACE_S
  after it, a watchdog kills every process this one started and exits. A checkpoint on
  disk is never half-written (fedrec.checkpoint), so the last one stays usable;
- a second signal does that at once.

The exit status is the shell's: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SAFE_WAIT_S = 20.0  # from the first signal to a safe point (a round in progress may finish)
GRACE_S = 8.0  # from the safe point to the end of Flower's and Ray's shutdown

_request = threading.Event()
_safe = threading.Event()
_held = threading.local()  # inside `holding()`: check() lets the request wait
_state: dict = {"signum": None, "message": "", "installed": False, "stopped": None}


class Interrupted(Exception):
    """The run stopped on a signal; `message` says what was kept and how to go on.

    An Exception (not a BaseException) so that Flower's ServerApp thread hands it to the
    driver's thread, which re-raises it after the simulation's shutdown.
    """

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.signum = signum if signum is not None else (_state["signum"] or signal.SIGINT)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def requested() -> bool:
    """Whether a stop was asked for (by a signal, or by `request` in a test)."""
    return _request.is_set()


def wait(seconds: float) -> bool:
    """Sleep up to `seconds`, waking at once when a stop is asked for; True if it was."""
    return _request.wait(seconds)


def check(where: str) -> None:
    """Raise `Interrupted` if a stop was asked for; `where` names the stage for the message."""
    if _request.is_set() and not getattr(_held, "depth", 0):
        raise Interrupted(f"stopped {where}")


@contextmanager
def holding() -> Iterator[None]:
    """A stretch that must finish once begun (a round's evaluation after its training has
    changed the run's state): `check` inside it does not raise; the next one outside does."""
    _held.depth = getattr(_held, "depth", 0) + 1
    try:
        yield
    finally:
        _held.depth -= 1


def request(signum: int = signal.SIGINT) -> None:
    """Ask the run to stop, as the first signal does (for tests and embedding code)."""
    _state["signum"] = signum
    _request.set()


def mark_safe(message: str) -> None:
    """Stopping the process now loses nothing more than `message` says (a checkpoint was
    written, or nothing had been started). The watchdog then allows GRACE_S for Flower and
    Ray to shut down before it stops them."""
    _state["message"] = message
    _safe.set()


def mark_at_risk(message: Callable[[], str]) -> None:
    """Rounds are running: a stop waits (up to SAFE_WAIT_S) for the run to reach a round's
    end. `message` says, when asked, what a stop at once keeps (the last checkpoint)."""
    _state["message"] = message
    _safe.clear()


def hand_over(stop: Interrupted) -> None:
    """Keep `stop` for the driver's thread (`raise_handed_over`): a ServerApp returns normally
    instead of raising, since Flower's simulation then waits 3 s for a context that never
    comes (flwr 1.42 `_main_loop`)."""
    _state["stopped"] = stop


def raise_handed_over() -> None:
    stop, _state["stopped"] = _state["stopped"], None
    if stop is not None:
        raise stop


def reset() -> None:
    _request.clear()
    _safe.clear()
    _state.update(signum=None, message="", stopped=None)


@contextmanager
def handling() -> Iterator[None]:
    """SIGINT and SIGTERM handled as above while inside; the main thread only (Python's rule)."""
    if threading.current_thread() is not threading.main_thread() or _state["installed"]:
        yield
        return
    reset()
    mark_safe("fedrec: stopped before any round ran; nothing of the run was kept")
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    _state["installed"] = True
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state["installed"] = False


def guarded(main: Callable[[], int]) -> int:
    """`main()` under `handling()`: a stop prints what was kept, leaves no process behind
    and returns 128 + the signal's number. For drivers: fedrec.simulate, the sweep scripts."""
    with handling():
        try:
            code = main()
            if requested():  # the signal came once nothing was left to stop (Flower's and Ray's shutdown)
                _say("fedrec: the signal came after the work had finished; its results are whole")
            return code
        except Interrupted as stop:
            _say(f"fedrec: {stop.message}")
            kill_descendants()  # Ray's processes are gone after its shutdown; none may stay
            return stop.exit_code


def reclaim() -> None:
    """Install the handlers again (main thread) after a library replaced them: `ray.init`
    puts its own fatal-signal handler on SIGTERM, which logs a stack and aborts the process
    (exit 134, Ray 2.55)."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _on_signal)


def _on_signal(signum: int, _frame) -> None:
    name = signal.Signals(signum).name
    if _request.is_set():
        _say(f"fedrec: second {name}: stopping at once")
        _exit_now(128 + signum)
    request(signum)
    _say(f"fedrec: {name} received; stopping at the next safe point "
         f"({'press Ctrl-C again' if signum == signal.SIGINT else 'send it again'} to exit at once)")  # fmt: skip
    threading.Thread(target=_watchdog, args=(128 + signum,), name="fedrec-interrupt-watchdog", daemon=True).start()


def _watchdog(code: int) -> None:
    if not _safe.wait(SAFE_WAIT_S):
        _say(f"fedrec: no safe point within {SAFE_WAIT_S:.0f} s; stopping now (the last checkpoint, if any, stays)")
        _exit_now(code)
    time.sleep(GRACE_S)  # a normal shutdown ends the process before this
    _say(f"fedrec: Flower and Ray did not shut down within {GRACE_S:.0f} s; stopping their processes")
    _exit_now(code)


def _exit_now(code: int) -> None:
    message = _state["message"]
    try:
        message = message() if callable(message) else message
    except Exception:  # noqa: BLE001 - the exit must not wait on a message
        message = ""
    if message:
        _say(message)
    kill_descendants()
    os._exit(code)


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a closed or broken stderr must not keep the process alive
        pass


def descendants(pid: int | None = None) -> list[int]:
    """The live processes below `pid` (default: this one), children first, from /proc (Linux).

    Written here rather than taken from psutil, which is not among the project's
    dependencies; elsewhere than Linux the list is empty.
    """
    root = pid or os.getpid()
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: the parent's pid follows the last ")"
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        p = todo.pop(0)
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def kill_descendants(pid: int | None = None) -> list[int]:
    """SIGKILL every process below `pid` (Ray's raylet, GCS and workers); returns their pids."""
    victims = descendants(pid)
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return victims
