"""Runs that survive: SIGKILL and resume, a killed cohort worker, faulty client replies.

Real Flower simulations in subprocesses (a kill must take Ray's workers with it), compared
with uninterrupted runs of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrec.config import merge_run_config
import torch
from safetensors.torch import load_file

from tests.integration.test_simulation import TINY

REPO = Path(__file__).resolve().parents[2]
# Long enough that a kill after the round-2 checkpoint lands before the end: every round evaluates.
RUN = "num-rounds=10 cohort-size=30 eval-every=1 checkpoint-every=2 bootstrap-samples=50"
PRIVACY = {
    "plain": "clipping-norm=0.5",
    "dp": "clipping-norm=0.5 noise-multiplier=0.8 sampling=poisson",
    "adaptive": "clipping-norm=0.5 noise-multiplier=0.8 sampling=poisson adaptive-clipping=true clip-count-stddev=2.0",
}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedrec.simulate", *args]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _checkpoint_round(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "manifest.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # wall-clock and memory readings differ between any two runs
        r.pop("seconds", None)
        # So do the messages' wire bytes: every message carries the run's config, whose
        # output-dir (and resume-from) differ between the runs compared.
        for k in ("worker-peak-rss-mb", "worker-train-seconds", "wire-bytes-down", "wire-bytes-up"):
            r.get("train", {}).pop(k, None)
    return rows


@pytest.mark.parametrize(
    "privacy",
    # Three whole runs each (uninterrupted, killed, resumed): the second step of .ci/run
    # (`pytest -m evidence`), to keep the default suite short. The default suite resumes
    # a run in `test_resume_refuses_a_change_...` below.
    [pytest.param(p, marks=pytest.mark.evidence) for p in ("plain", "dp", "adaptive")],
)
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, privacy):
    config = merge_run_config(TINY, f"{RUN} {PRIVACY[privacy]}")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run(_cmd("--output-dir", str(whole), "--run-config", config))

    proc = subprocess.Popen(_cmd("--output-dir", str(cut), "--run-config", config), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while _checkpoint_round(cut) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its Ray workers, mid-round
    proc.wait()
    killed_at = _checkpoint_round(cut)
    assert 2 <= killed_at < 10 and not (cut / "summary.json").exists(), "the kill came too late to test a resume"

    resumed = _run(_cmd("--resume", str(cut)))
    assert f"resuming after round {killed_at}" in resumed.stdout

    for name in ("adapter.safetensors", "adapter_last_round.safetensors"):
        a, b = load_file(whole / name), load_file(cut / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    ledger = lambda out: json.loads((out / "privacy.json").read_text())  # noqa: E731
    assert ledger(cut) == ledger(whole)
    assert _rows(cut) == _rows(whole)
    s_whole, s_cut = (json.loads((o / "summary.json").read_text()) for o in (whole, cut))
    assert s_cut["test"] == s_whole["test"] and s_cut["epsilon"] == s_whole["epsilon"]


def test_resume_refuses_a_change_to_what_already_ran_and_allows_more_rounds(tmp_path):
    config = merge_run_config(TINY, "num-rounds=2 cohort-size=20 eval-every=0")
    out = tmp_path / "run"
    _run(_cmd("--output-dir", str(out), "--run-config", config))
    bad = subprocess.run(_cmd("--resume", str(out), "--run-config", "learning-rate=0.1"), capture_output=True,
                         text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("fedrec: config error: learning-rate: the checkpoint ran with 0.5")
    more = _run(_cmd("--resume", str(out), "--run-config", "num-rounds=4"))
    assert "resuming after round 2" in more.stdout and "round   4/4" in more.stdout
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # appended, nothing lost or repeated


# A ClientApp whose process is SIGKILLed on its first train message of round 2.
KILLER = '''
import os, signal
from pathlib import Path
from flwr.clientapp import ClientApp
from clients.app import evaluate, query, train as real_train

MARK = Path(os.environ["FEDREC_KILL_MARK"])
app = ClientApp()
app.query()(query)
app.evaluate()(evaluate)


@app.train()
def train(msg, context):
    if int(msg.content["task"]["round"]) == 2 and not MARK.exists():
        MARK.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return real_train(msg, context)
'''


def test_a_killed_cohort_worker_is_replaced_within_the_round(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    config = merge_run_config(TINY, "num-rounds=3 cohort-size=30 eval-every=0")
    whole = tmp_path / "whole"
    _run(_cmd("--output-dir", str(whole), "--run-config", config))
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import killer\n"
        "from fedrec.simulate import build_config, launch\n"
        "launch(build_config(sys.argv[2:]), client_app=killer.app)\n"
    )
    env = os.environ | {"FEDREC_KILL_MARK": str(tmp_path / "killed"), "PYTHONPATH": f"{REPO}:{tmp_path}"}
    killed = tmp_path / "killed-run"
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), "--output-dir", str(killed), "--run-config", config],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "killed").exists()  # a worker process really died
    assert "train: worker node(s)" in proc.stdout and "go to" in proc.stdout
    a, b = load_file(whole / "adapter_last_round.safetensors"), load_file(killed / "adapter_last_round.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same users trained the same way


# One training round in device placement, with faults injected into chosen users' replies by
# a ClientApp mod; the round's sum is compared with the in-process sum over the other users.
FAULTY = '''
import json, math, os, sys
import torch
from flwr.app import ArrayRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from clients.app import evaluate, query, train as real_train
from fedrec.inprocess import InProcessPort
from fedrec.run import make_sampler
from fedrec.simulate import build_config, launch
from fedrec.workload import describe_adapter, prepare_workload, update_keys
from server.app import server_configs
from server.grid_port import GridPort

FAULTS = json.loads(os.environ.get("FEDREC_FAULTS", "{}"))  # user → what goes wrong in their reply


def inject(msg, context, call_next):
    reply = call_next(msg, context)
    users = list(msg.content["task"].get("user-ids", []))
    fault = FAULTS.get(str(users[0])) if msg.metadata.message_type == "train" and len(users) == 1 else None
    if fault is None or reply.has_error():
        return reply
    update = reply.content["update"].to_torch_state_dict()
    key = sorted(update)[0]
    if fault == "non-finite":
        update[key].view(-1)[0] = math.nan
    elif fault == "inf":
        update[key].view(-1)[-1] = math.inf
    elif fault == "shape":
        update[key] = torch.zeros(3)
    elif fault == "dtype":
        update[key] = update[key].double()
    elif fault == "norm":
        update = {k: v * 1000 + 1 for k, v in update.items()}
    elif fault == "keys":
        del update[key]
    reply.content["update"] = ArrayRecord(update)
    return reply


client = ClientApp(mods=[inject])
client.query()(query)
client.evaluate()(evaluate)
client.train()(real_train)
server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    (cfg,) = server_configs(context.run_config)
    work = prepare_workload(cfg)
    model = work.model()
    info = describe_adapter(cfg, model, work.item_side, log=lambda _m: None)
    strategy = GridPort(cfg, work.data.private, update_keys=update_keys(cfg, model), log=print)
    strategy.connect(grid)
    cohort = make_sampler(cfg, strategy.population).draw(1)
    got = strategy.train(1, cohort, info.initial, cfg.clipping_norm).total
    clean = [u for u in cohort if str(int(u)) not in FAULTS]
    want = InProcessPort(cfg, work).train(1, clean, info.initial, cfg.clipping_norm).total
    diff = max(float((got.delta[k] - want.delta[k]).abs().max()) for k in want.delta)
    json.dump({"rejected": got.rejected, "users": got.num_users, "want_users": want.num_users, "diff": diff,
               "keys_equal": sorted(got.delta) == sorted(want.delta)}, open(os.environ["FEDREC_OUT"], "w"))


if __name__ == "__main__":
    cfg = build_config(sys.argv[1:])
    work = prepare_workload(cfg)
    cohort = make_sampler(cfg, work.data.private).draw(1)
    kinds = ["non-finite", "inf", "shape", "dtype", "norm", "keys"]
    os.environ["FEDREC_FAULTS"] = json.dumps({str(int(u)): k for u, k in zip(cohort, kinds)})
    FAULTS.update(json.loads(os.environ["FEDREC_FAULTS"]))
    launch(cfg, server_app=server, client_app=client)
'''


def test_faulty_replies_are_rejected_and_the_round_sums_the_others(tmp_path):
    (tmp_path / "faulty.py").write_text(FAULTY)
    config = (f"{TINY} placement=device cohort-size=12 "
              "num-rounds=1 clipping-norm=0.5")  # fmt: skip
    out = tmp_path / "result.json"
    env = os.environ | {"FEDREC_OUT": str(out), "PYTHONPATH": f"{REPO}:{tmp_path}"}
    proc = subprocess.run([sys.executable, str(tmp_path / "faulty.py"), "--output-dir", str(tmp_path / "run"),
                           "--run-config", config], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    # NaN and Inf are both non-finite; each other fault has its own reason.
    assert got["rejected"] == {"non-finite": 2, "shape": 1, "dtype": 1, "norm": 1, "keys": 1}
    assert got["users"] == got["want_users"] == 6 and got["keys_equal"]
    assert got["diff"] < 1e-6  # the sum of the other six users, as the same engine computes it in-process
    assert proc.stdout.count("update rejected") == 6
