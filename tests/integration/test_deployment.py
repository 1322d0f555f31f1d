"""Flower's deployment runtime on 127.0.0.1: a real SuperLink, one real SuperNode per device.

TLS with a CA made for the test, SuperNode authentication, each device reading only its
own file (CSV, JSON lines, SQLite). The result must equal the simulation of the same
cohort, which never leaves one process.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.local_federation import LocalFederation, device_files
from conftest import write_csv_dataset

pytestmark = pytest.mark.skipif(shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None,
                                reason="flower-superlink is not installed beside this Python")  # fmt: skip

CONFIG = {
    "dataset": "csv", "placement": "device", "public-fraction": 0.925, "hidden-size": 16, "num-blocks": 1,
    "max-seq-len": 20, "pretrain-epochs": 5, "num-rounds": 2, "cohort-size": 3, "eval-every": 0,
    "clipping-norm": 0.05, "server-optimizer": "sgd", "server-learning-rate": 1.0,
}  # fmt: skip


def simulate(tmp_path: Path, config: dict, name: str) -> Path:
    out = tmp_path / name
    pairs = " ".join(f"{k}={v}" for k, v in run_config(config).items())
    cmd = [sys.executable, "-m", "fedrec.simulate", "--output-dir", str(out), "--run-config", pairs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def deploy(tmp_path: Path, config: dict, name: str, stranger: bool = False) -> tuple[Path, str, dict[str, str]]:
    """Returns the results folder, `flwr run`'s output, and why devices could not join."""
    workdir = tmp_path / name
    workdir.mkdir()
    devices = device_files(Path(config["data-path"]), config["_devices"], workdir / "devices")
    faults = {}
    if stranger:  # a fourth SuperNode whose user the run does not know: reported, left out
        devices.append(devices[0] | {"user-id": "nobody", "state-dir": str(workdir / "stranger")})
        # and two that cannot join at all: a key the SuperLink never registered, no CA certificate
        faults = {len(devices): "unregistered-key", len(devices) + 1: "no-ca"}
        devices += [devices[0] | {"state-dir": str(workdir / f"faulty-{i}")} for i in faults]
    with LocalFederation(workdir, devices, tls=True, auth=True, faults=faults) as fed:
        out = fed.run(run_config(config) | {"output-dir": str(workdir / "results")})
        failed = dict(fed.failed)
    return workdir / "results", out, failed


def _assert_same_adapters(a: Path, b: Path, atol: float) -> None:
    x, y = load_file(a / "adapter_last_round.safetensors"), load_file(b / "adapter_last_round.safetensors")
    assert x.keys() == y.keys()
    moved = max(float(v.abs().max()) for v in x.values())
    assert moved > 10 * atol  # the rounds really changed the adapter
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=atol, msg=k)


def run_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    from fedrec.config import FedRecConfig
    from fedrec.data import load_interactions, split_users

    tmp = tmp_path_factory.mktemp("deploy-data")
    config = CONFIG | {"data-path": str(write_csv_dataset(tmp / "data.csv")), "cache-dir": str(tmp / "cache")}
    cfg = FedRecConfig.from_mapping(config)
    data = split_users(load_interactions(cfg), cfg.public_fraction, cfg.seed)
    assert len(data.private) == 3  # public-fraction leaves exactly three private users: the devices
    return config | {"_devices": [data.user_ids[int(u)] for u in data.private]}


@pytest.fixture(scope="module")
def simulated(dataset, tmp_path_factory) -> Path:
    return simulate(tmp_path_factory.mktemp("deploy-sim"), dataset, "sim")


# Real SuperLink + SuperNode processes (~3 min each on two cores): both deployments are the
# second step of .ci/run (`pytest -m evidence`), which runs on every stop. The default suite
# keeps device placement and SecAgg+ in simulation (test_simulation) and the device side of
# the ClientApp (test_sources, test_client_replies).
@pytest.mark.evidence
def test_tls_deployment_equals_the_simulation_of_the_same_cohort(tmp_path, dataset, simulated):
    deployed, out, failed = deploy(tmp_path, dataset, "deploy", stranger=True)
    assert "user 'nobody' is not a private user of this run; left out" in out
    assert sorted(failed) == ["device-4", "device-5"]  # named with their reasons, and stopped
    assert "refused its authentication key" in failed["device-4"] and "CERTIFICATE_VERIFY_FAILED" in failed["device-5"]
    assert "devices: 3 real devices; base model and catalogue sent to 3" in out
    assert "round   2/2 | users    3" in out
    _assert_same_adapters(deployed, simulated, atol=1e-5)
    # The base travelled once to each of the three devices, counted on the real setup messages.
    comm = json.loads((deployed / "summary.json").read_text())["communication"]
    assert comm["setup_wire"]["array-bytes-down"] == 3 * comm["once_per_device"]["base"]
    assert comm["wire_per_user_round"]["down"] > comm["per_user_round"]["down"]


@pytest.mark.evidence
def test_secagg_deployment_gives_the_same_sum(tmp_path, dataset, simulated):
    """SecAgg+ on: the server only unmasks the cohort's sum, and it is the plain run's sum
    up to quantization (2C/2^22 per coordinate and user)."""
    deployed, out, _failed = deploy(tmp_path, dataset | {"secure-aggregation": "secagg+"}, "deploy-secagg")
    assert "SecAgg+ (3 shares, threshold 2)" in out
    assert "round   2/2 | users    3 | loss nan" in out  # per-user losses never left the devices
    _assert_same_adapters(deployed, simulated, atol=1e-5)


@pytest.mark.evidence
def test_the_plug_in_guides_one_machine_trial(tmp_path):
    """docs/plug-in-client.md's first command, as written (tiny model settings added): a
    server that holds public users only, four devices that enroll and read their files with
    the guide's own reader, a fifth whose key was never registered, SecAgg+ with the noise
    added on the devices."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "plug-in-client.md").read_text()
    command = re.findall(r"```bash\n(.*?)```", guide, flags=re.S)[0].replace("\\\n", " ")
    (store,) = [b for b in re.findall(r"```python\n(.*?)```", guide, flags=re.S) if b.startswith("# myapp/store.py")]
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "store.py").write_text(store)
    write_csv_dataset(tmp_path / "data.csv")
    args = shlex.split(command)
    assert args[:3] == [".venv/bin/python", "-m", "server.local_federation"]
    at = args.index("--run-config") + 1
    args[at] += " hidden-size=16 num-blocks=1 max-seq-len=20 pretrain-epochs=5"
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}
    proc = subprocess.run([sys.executable, *args[1:], "--workdir", str(tmp_path / "fed")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"device-4 \(u\d+\) cannot join: the SuperLink refused its authentication key", out)
    assert "enrollment: 4 devices enrolled" in out and "private users: the devices that enroll" in out
    assert "round   3/3 | users" in out
    # The server's file holds no device's row; each device read its own `.events` file.
    devices = sorted((tmp_path / "fed" / "devices").glob("device-*.events"))
    assert len(devices) == 5
    public = (tmp_path / "fed" / "server" / "public.csv").read_text()
    users = set(re.findall(r"u\d+", " ".join(re.findall(r"\(([^)]*)\); logs", out))))
    assert len(users) == 5 and not any(f"\n{u}," in public for u in users)
    privacy = json.loads((tmp_path / "fed" / "results" / "privacy.json").read_text())
    assert privacy["mechanism"] == "distributed-skellam" and privacy["rounds"][-1]["epsilon"] > 0
    assert privacy["population"] == 4 and privacy["delta"] == 0.25  # N and δ = 1/N: the devices that enrolled
    # One warm worker per device served its messages.
    logs = [p.read_text() for p in (tmp_path / "fed" / "devices").glob("state-*/warm-worker.log")]
    assert len(logs) == 4 and all("train: " in log for log in logs)
