"""Run fedrec on Flower's deployment runtime on this machine: one SuperLink, one SuperNode per device.

    .venv/bin/python -m server.local_federation --data-path DATA.csv [--devices 3] \\
        [--run-config "num-rounds=2 ..."] [--insecure] [--no-auth] [--enroll] \\
        [--source-module myapp.store] [--bad-keys 1]

What a real deployment does, on 127.0.0.1: TLS with a certificate authority made for this
run, SuperNode authentication (each SuperNode's ECDSA key registered with
`flwr supernode register`), `flower-supernode --node-config "user-id=... data-path=..."`
per device, then `flwr run . <federation> --stream`. Each device gets a file with only its
own interactions (CSV, JSON lines or SQLite in turn, the shipped sources). Only the
processes started here are stopped at the end.

The data file is a CSV with `user,item,timestamp` columns; the server pretrains the base
on its public users, and the first `--devices` private users become devices. With
`--enroll` the server is given only the public users' rows (private-users=enrolled): the
devices enroll with opaque keys. With `--source-module` each device reads its file with
an app's own reader, written by that module's `write_rows` (docs/plug-in-client.md).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
FEDERATION = "fedrec-local"


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost: (ca, cert, key)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec local CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    )
    return paths


def make_node_key(path: Path) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what `flower-supernode` authenticates with)."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    path.chmod(0o600)
    pub = path.with_suffix(".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return path, pub


def connection_config(name: str, address: str, ca: Path | None) -> str:
    """The `flwr` CLI's connection config ($FLWR_HOME/config.toml) for one SuperLink."""
    conf = f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
    return conf + (f'root-certificates = "{ca}"\ninsecure = false\n' if ca is not None else "insecure = true\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value: object) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def toml_pairs(config: dict) -> str:
    """`k=v` pairs as `--run-config` / `--node-config` parse them (strings quoted)."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())


def write_device_file(rows: Sequence[tuple[str, str, float]], path: Path) -> Path:
    """One device's own interactions in the format its suffix names (.csv, .jsonl, .sqlite)."""
    if path.suffix == ".csv":
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["user", "item", "timestamp"])
            w.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"user": u, "item": i, "timestamp": t}) + "\n" for u, i, t in rows))
    elif path.suffix == ".sqlite":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE interactions (user TEXT, item TEXT, timestamp REAL)")
            db.executemany("INSERT INTO interactions VALUES (?, ?, ?)", rows)
    else:
        raise ValueError(f"no writer for {path.suffix}")
    return path


FAULTS = ("unregistered-key", "no-ca")
# What a SuperNode's log says when it cannot join (Flower 1.42: it exits with code 305 while
# its SuperExec child keeps retrying), and what that means for the person running it.
JOIN_FAILURES = (
    ("CERTIFICATE_VERIFY_FAILED", "TLS failed: it does not trust the SuperLink's certificate "
                                  "(CERTIFICATE_VERIFY_FAILED); give it the CA with --root-certificates"),
    ("Failed to activate SuperNode", "the SuperLink refused its authentication key (Failed to activate "
                                     "SuperNode); register the key with `flwr supernode register`"),
    ("SSL/TLS handshake error", "the TLS handshake failed; check --root-certificates and --insecure on both sides"),
)  # fmt: skip


def join_failure(log: str, returncode: int | None) -> str:
    """Why a SuperNode could not join, from its log: a known cause, else its last error line."""
    for needle, why in JOIN_FAILURES:
        if needle in log:
            return why
    errors = [line.strip() for line in log.splitlines() if "ERROR" in line or "Error" in line]
    return errors[-1][:200] if errors else f"its process exited with code {returncode}"


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, as a context manager that stops what it started."""

    def __init__(self, workdir: Path, devices: list[dict], *, tls: bool = True, auth: bool = True,
                 faults: dict[int, str] | None = None) -> None:  # fmt: skip
        """`faults`: device index → what goes wrong in its set-up, to see what a user sees:
        `unregistered-key` (its key was never registered with the SuperLink) or `no-ca`
        (it lacks the CA certificate)."""
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it with --insecure)")
        self.workdir = Path(workdir).resolve()
        self.devices, self.tls, self.auth = devices, tls, auth
        self.faults = dict(faults or {})
        if bad := {f for f in self.faults.values() if f not in FAULTS}:
            raise ValueError(f"faults: unknown {sorted(bad)}; known: {', '.join(FAULTS)}")
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        bin_dir = Path(sys.executable).parent
        self.env = {k: v for k, v in os.environ.items() if k != "FEDREC_RUN_CONFIG"} | {
            "FLWR_HOME": str(self.workdir / "flwr-home"),
            # Otherwise the SuperLink installs every dependency again, in a fresh env, per run.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # A SuperNode's SuperExec looks for a new ClientApp task every second by default (1.42).
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.bin = bin_dir
        self.logs = self.workdir / "logs"
        self.failed: dict[str, str] = {}  # device name → why it could not join (`_watch`)
        self._watching = threading.Event()

    # -------------------------------------------------------------- processes
    def _start(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(args, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _cli(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run([str(self.bin / "flwr"), *args], cwd=self.workdir, env=self.env, capture_output=True,
                             text=True, timeout=timeout)  # fmt: skip
        if out.returncode:
            raise RuntimeError(f"flwr {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def __enter__(self) -> LocalFederation:
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.workdir / "flwr-home").mkdir(exist_ok=True)
        security: list[str] = ["--insecure"]
        root: list[str] = ["--insecure"]
        ca = None
        if self.tls:
            ca, cert, key = make_certificates(self.workdir / "certs")
            security = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
            root = ["--root-certificates", str(ca)]
        conf = connection_config(FEDERATION, f"127.0.0.1:{self.port}", ca)
        (self.workdir / "flwr-home" / "config.toml").write_text(conf)
        state = self.workdir / "superlink"
        state.mkdir(exist_ok=True)
        args = [str(self.bin / "flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(state / "state.db")]  # fmt: skip
        if self.auth:
            args.append("--enable-supernode-auth")
        self._devices: dict[str, subprocess.Popen] = {}
        try:
            self._start("superlink", args, state)
            self._wait_for_port(self.port)
            for i, node_config in enumerate(self.devices):
                auth: list[str] = []
                fault = self.faults.get(i)
                if self.auth:
                    private, public = make_node_key(self.workdir / "certs" / f"device-{i}")
                    if fault != "unregistered-key":
                        self._cli("supernode", "register", str(public), FEDERATION, "--name", f"device-{i}")
                    auth = ["--auth-supernode-private-key", str(private)]
                folder = self.workdir / f"device-{i}"
                folder.mkdir(exist_ok=True)
                self._devices[f"device-{i}"] = self._start(f"device-{i}", [
                    str(self.bin / "flower-supernode"), *([] if fault == "no-ca" else root),
                    "--superlink", f"127.0.0.1:{self.port}",
                    "--port", str(free_port()), *auth, "--node-config", toml_pairs(node_config),
                ], folder)  # fmt: skip
        except BaseException:
            self.stop()
            raise
        self._watching.set()
        threading.Thread(target=self._watch, name="fedrec-device-watch", daemon=True).start()
        return self

    def _watch(self, every: float = 0.5) -> None:
        """Say why a device cannot join, and stop it: a SuperNode that fails to activate exits,
        but its SuperExec child retries for as long as it runs (Flower 1.42)."""
        while self._watching.is_set():
            for name, proc in self._devices.items():
                if name in self.failed or proc.poll() is None:
                    continue
                why = join_failure((self.logs / f"{name}.log").read_text(errors="replace"), proc.returncode)
                self.failed[name] = why
                _stop_session(proc)
                print(f"{name} ({self.devices[int(name.split('-')[1])].get('user-id', '?')}) cannot join: {why}; "
                      f"stopped (log: {self.logs / f'{name}.log'})", file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(every)

    def _wait_for_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"the SuperLink exited; see {self.logs / 'superlink.log'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the SuperLink did not open port {port} in {timeout:.0f} s")

    def run(self, run_config: dict, app_dir: Path = ROOT, timeout: float = 900) -> str:
        """`flwr run <app> <federation> --stream`; returns its output, raises if it fails."""
        args = [str(self.bin / "flwr"), "run", str(app_dir), FEDERATION, "--stream", "--run-config", toml_pairs(run_config)]
        out = subprocess.run(args, cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout)
        (self.logs / "flwr-run.log").write_text(out.stdout + out.stderr)
        if out.returncode:
            raise RuntimeError(f"flwr run failed (rc {out.returncode}); see {self.logs}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        # `flwr run --stream` exits 0 however the run ended (Flower 1.42): ask the SuperLink.
        status = self.run_status(out.stdout)
        if status and "failed" in status:
            raise RuntimeError(f"the run ended {status}; see {self.logs / 'flwr-run.log'}:\n{out.stdout[-3000:]}")
        return out.stdout

    def run_status(self, output: str) -> str:
        """The SuperLink's status of the run `flwr run` started (e.g. finished:completed), "" if unknown."""
        import re

        found = re.search(r"Successfully started run (\d+)", output)
        if not found:
            return ""
        listing = json.loads(self._cli("ls", "--run-id", found.group(1), "--format", "json"))
        runs = listing.get("runs", [])
        return str(runs[0].get("status", "")) if runs else ""

    def stop(self) -> None:
        self._watching.clear()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM to the process's session (it was started in one of its own), its children too."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _rows(data_path: Path, keep) -> dict[str, list[tuple[str, str, float]]]:
    rows: dict[str, list[tuple[str, str, float]]] = {}
    with open(data_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if keep(row["user"]):
                rows.setdefault(row["user"], []).append((row["user"], row["item"], float(row["timestamp"])))
    return rows


def device_files(data_path: Path, user_ids: Sequence[str], folder: Path, source_module: str = "") -> list[dict]:
    """Split a user,item,timestamp CSV into one file per device; return their node configs.

    Without `source_module` the shipped formats take turns (CSV, JSON lines, SQLite); with
    it, every file is written by the module's `write_rows(rows, path)` under its `SUFFIX`,
    and the devices import the module to read it."""
    wanted = set(user_ids)
    rows = _rows(data_path, wanted.__contains__)
    folder.mkdir(parents=True, exist_ok=True)
    writer = None
    if source_module:
        import importlib

        module = importlib.import_module(source_module)
        if not (hasattr(module, "write_rows") and hasattr(module, "SUFFIX")):
            raise SystemExit(f"--source-module {source_module}: needs SUFFIX and write_rows(rows, path) to write the "
                             "devices' files for this trial (docs/plug-in-client.md)")  # fmt: skip
        writer = module
    configs = []
    for i, user in enumerate(user_ids):
        if writer is not None:
            path = folder / f"device-{i}{writer.SUFFIX}"
            writer.write_rows(rows.get(user, []), path)
            extra = {"source-module": source_module}
        else:
            suffix = (".csv", ".jsonl", ".sqlite")[i % 3]  # every shipped source in use
            path, extra = write_device_file(rows.get(user, []), folder / f"device-{i}{suffix}"), {}
        configs.append({"user-id": user, "data-path": str(path), "state-dir": str(folder / f"state-{i}")} | extra)
    return configs


def server_file(data_path: Path, public_ids: Sequence[str], path: Path) -> Path:
    """What a server that holds no private data is given: the public users' rows only."""
    keep = set(public_ids)
    rows = _rows(data_path, keep.__contains__)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_device_file([r for u in sorted(rows) for r in rows[u]], path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-path", required=True, type=Path, help="CSV with user,item,timestamp")
    ap.add_argument("--devices", type=int, default=3, help="how many private users get a SuperNode")
    ap.add_argument("--run-config", default="", help='overrides, e.g. "num-rounds=2 cohort-size=3"')
    ap.add_argument("--workdir", type=Path, help="where certificates, logs and device files go (default: a temp dir)")
    ap.add_argument("--insecure", action="store_true", help="no TLS (and so no SuperNode authentication)")
    ap.add_argument("--no-auth", action="store_true", help="TLS without SuperNode authentication")
    ap.add_argument("--enroll", action="store_true",
                    help="the server gets only the public users' rows; the devices enroll (private-users=enrolled)")
    ap.add_argument("--source-module", default="",
                    help="a module with the app's own reader (and SUFFIX, write_rows for this trial's files)")
    ap.add_argument("--cold", action="store_true",
                    help="no warm worker on the devices (node config warm=false): every message imports torch again")
    ap.add_argument("--bad-keys", type=int, default=0,
                    help="this many more devices whose key the SuperLink never registered (they cannot join)")
    args = ap.parse_args(argv)

    from fedrec.config import ConfigError, FedRecConfig, parse_run_config
    from fedrec.data import load_interactions, split_users
    from fedrec.data.load import check_inputs

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="fedrec-federation-"))).resolve()
    data_path = args.data_path.resolve()
    try:
        overrides = parse_run_config(args.run_config)
        cfg = FedRecConfig.from_mapping(
            {"dataset": "csv", "data-path": str(data_path), "placement": "device", "output-dir": str(workdir / "results")}
            | overrides
        )
        check_inputs(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    data = split_users(load_interactions(cfg), cfg.public_fraction, cfg.seed)
    users = [data.user_ids[int(u)] for u in data.private[: args.devices + args.bad_keys]]
    devices = device_files(data_path, users, workdir / "devices", args.source_module)
    if args.cold:
        devices = [d | {"warm": False} for d in devices]
    run_config = {k: v for k, v in cfg.to_dict().items() if k in {"dataset", "data-path", "placement", "output-dir"}} | overrides
    if args.enroll:  # the server never sees a private user's row, nor the list of who they are
        public = server_file(data_path, [data.user_ids[int(u)] for u in data.public], workdir / "server" / "public.csv")
        run_config |= {"data-path": str(public), "private-users": "enrolled", "enroll-devices": args.devices}
        print(f"server: {public} holds the {len(data.public)} public users only", flush=True)
    faults = {args.devices + k: "unregistered-key" for k in range(args.bad_keys)}
    print(f"{len(devices)} devices ({', '.join(users)}); logs and files in {workdir}", flush=True)
    t0 = time.time()
    with LocalFederation(workdir, devices, tls=not args.insecure, auth=not (args.insecure or args.no_auth),
                         faults=faults) as fed:  # fmt: skip
        print(fed.run(run_config))
    print(f"done in {time.time() - t0:.0f} s; results in {workdir / 'results'}")
    if args.workdir is None:
        shutil.rmtree(workdir / "devices", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
