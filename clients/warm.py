"""A device's warm worker: one long-running process per device that keeps torch, peft and
the loaded model between messages.

Flower 1.42 runs every message in a fresh `flwr-clientapp` process: the SuperNode's
SuperExec launches one per task and it exits after that task; no supported mode keeps one
alive. Importing the handlers (torch, peft) alone took 5.5 s of each such process on the
2-core machine (experiments/README.md#loopback). So on a real device the ClientApp stays
thin: it hands the message to this worker over a local socket and returns its reply.

- The first message that needs it starts the worker, in the SuperNode's process group
  (stopping the SuperNode's group stops it too). It also exits when that group's leader
  is gone, or after `warm-idle-s` seconds (node config, default 600) without a message.
- The socket lives in a folder only this user may enter, and the worker answers only
  processes of its own user (SO_PEERCRED): what it receives is unpickled.
- If the worker cannot be started or reached, the ClientApp handles the message itself, as
  before (`warm=false` in the node config does that always).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import pickle
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

START_WAIT_S = 120.0  # the worker binds its socket at once; importing torch and peft follows
REPLY_WAIT_S = 3600.0
_HEADER = struct.Struct("!Q")


def enabled(node_config: dict) -> bool:
    return "data-path" in node_config and str(node_config.get("warm", "true")).lower() not in ("false", "0", "no")


def socket_path(node_config: dict) -> Path:
    """One worker per device and per installed app (another FAB, another worker)."""
    from clients.device import state_dir

    app = Path(__file__).resolve().parents[1]
    key = hashlib.sha256(f"{state_dir(node_config).resolve()}|{app}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"fedrec-warm-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise OSError(f"{folder} is not this user's private folder")
    return folder / f"{key}.sock"


def _send(sock: socket.socket, obj: Any) -> None:
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(blob)) + blob)


def _recv(sock: socket.socket) -> Any:
    head = _read(sock, _HEADER.size)
    return pickle.loads(_read(sock, _HEADER.unpack(head)[0]))


def _read(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the warm worker closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------ ClientApp side
def call(kind: str, msg: Any, context: Any) -> Any | None:
    """The worker's reply to `msg`, or None when the worker cannot be used (handle it here)."""
    try:
        path = socket_path(context.node_config)
        sock = _connect(path) or _start(path, context.node_config)
        if sock is None:
            return None
        with sock:
            sock.settimeout(REPLY_WAIT_S)
            _send(sock, (kind, msg, context))
            status, value = _recv(sock)
    except (OSError, ConnectionError, pickle.PickleError, EOFError) as e:
        print(f"fedrec: the warm worker could not be used ({e}); this message runs in the ClientApp", file=sys.stderr)
        return None
    if status == "error":
        raise value
    return value


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _start(path: Path, node_config: dict) -> socket.socket | None:
    """Start the worker (one at a time: a lock beside the socket), then connect to it."""
    from clients.device import state_dir

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is not None:
            return sock
        path.unlink(missing_ok=True)
        log_dir = state_dir(node_config)
        log_dir.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        idle = float(node_config.get("warm-idle-s", 600))
        with open(log_dir / "warm-worker.log", "a") as log:
            subprocess.Popen([sys.executable, "-m", "clients.warm", "--socket", str(path), "--idle", str(idle)],
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             cwd=str(Path(__file__).resolve().parents[1]))  # fmt: skip
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock
            time.sleep(0.05)
    return None


# ------------------------------------------------------------------ the worker
def serve(path: Path, idle_s: float) -> None:
    leader = os.getpgid(0)  # the SuperNode's process group: when its leader is gone, so is this worker
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(4)
    server.settimeout(1.0)
    print(f"fedrec warm worker {os.getpid()}: listening on {path}", flush=True)
    from flwr.supercore.task_identity import TaskIdentity

    from clients import handlers  # torch, peft: once, for every message that follows

    last = time.monotonic()
    while time.monotonic() - last < idle_s:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if leader != os.getpid() and not _alive(leader):
                break
            continue
        with conn:
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                continue
            try:
                kind, msg, context = _recv(conn)
                TaskIdentity.run_id, TaskIdentity.node_id = context.run_id, context.node_id
                t0 = time.perf_counter()
                reply = getattr(handlers, kind)(msg, context)
                _send(conn, ("ok", reply))
                print(f"{kind}: {time.perf_counter() - t0:.2f} s", flush=True)
            except Exception as e:  # the ClientApp raises it, as it would have raised it itself
                print(traceback.format_exc(limit=8), flush=True)
                try:
                    _send(conn, ("error", e))
                except (pickle.PicklingError, TypeError, AttributeError):
                    _send(conn, ("error", RuntimeError(f"{type(e).__name__}: {e}")))
        last = time.monotonic()
    server.close()
    path.unlink(missing_ok=True)
    print(f"fedrec warm worker {os.getpid()}: stopped", flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fedrec's warm worker for one device (started by the ClientApp)")
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--idle", type=float, default=600.0)
    args = ap.parse_args(argv)
    serve(args.socket, args.idle)


if __name__ == "__main__":
    main()
