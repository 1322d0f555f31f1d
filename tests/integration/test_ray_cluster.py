"""fedrec on an existing Ray cluster (`ray-address`): a real two-node cluster on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = (
    "synthetic-users=150 synthetic-items=80 synthetic-clusters=4 synthetic-mean-length=15 public-fraction=0.2 "
    "hidden-size=32 num-blocks=1 max-seq-len=20 pretrain-epochs=8 num-rounds=3 cohort-size=20 eval-every=0 "
    "num-workers=2 client-num-cpus=1"
)


def _simulate(tmp_path: Path, name: str, *extra: str) -> tuple[dict, list[dict], str]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "fedrec.simulate", "--output-dir", str(out),
           "--run-config", TINY, *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), rows, proc.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.evidence
def test_a_two_node_cluster_spreads_the_workers_and_gives_the_single_node_result(tmp_path):
    from ray.cluster_utils import Cluster

    single, single_rows, _ = _simulate(tmp_path, "single")  # a local Ray, started by the run itself
    # A head and a second node, one CPU each, so each of the two workers must take a node of its own.
    # Both on this machine, at the address Ray picks for it (pinning 127.0.0.1 left the
    # driver waiting for a node at the machine's own address: Ray 2.55).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    pids: list[int] = []
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        pids = [p.process.pid for node in cluster.list_all_nodes() for procs in node.all_processes.values() for p in procs]
        two, two_rows, stdout = _simulate(tmp_path, "two", "--ray-address", cluster.address)
    finally:
        cluster.shutdown()  # stops the nodes this test started, by their own processes: no `ray stop`
    assert pids and not any(_alive(p) for p in pids)

    trained = [r["train"] for r in two_rows if "train" in r]
    assert len(trained) == 3 and all(t["worker-ray-nodes"] == 2 and t["worker-processes"] == 2 for t in trained)
    assert "2 processes trained, on 2 Ray node(s)" in stdout
    assert all(r["train"]["worker-ray-nodes"] == 1 for r in single_rows if "train" in r)
    # The same users train the same way wherever they land; only the order of a float sum may differ.
    for key in ("test", "base_test", "valid"):
        assert two[key] == pytest.approx(single[key], abs=1e-6), key
    assert [r["train"]["loss"] for r in two_rows if "train" in r] == pytest.approx(
        [r["train"]["loss"] for r in single_rows if "train" in r], abs=1e-6
    )
