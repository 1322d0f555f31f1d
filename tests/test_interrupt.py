"""Ctrl-C and SIGTERM (fedrec.interrupt): a stop at a safe point keeps a checkpoint from which
the run resumes to the uninterrupted result; the processes a driver started are found and
stopped; a folder in use is refused before anything starts. The same through real Flower
simulations and real signals: tests/integration/test_signals.py (evidence)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec import checkpoint, interrupt
from fedrec.config import ConfigError, FedRecConfig
from fedrec.inprocess import InProcessPort
from fedrec.results import LOCK, ResultsDir, lock_folder, unlock_folders
from fedrec.run import FederatedRun, RunFacts
from fedrec.train.pretrain import Fitting, fit_sequences
from fedrec.workload import describe_adapter, prepare_workload


@pytest.fixture(autouse=True)
def no_stop_left_behind():
    interrupt.reset()
    yield
    interrupt.reset()


def _run(cfg: FedRecConfig, work, out=None) -> tuple[FederatedRun, InProcessPort]:
    port = InProcessPort(cfg, work)
    info = describe_adapter(cfg, port.model, work.item_side, log=lambda _m: None)
    run = FederatedRun(cfg, info.initial, work.data.private, dimension=info.dimension, out=out, log=lambda _m: None,
                       sent_keys=info.sent, public=work.data.public)  # fmt: skip
    return run, port


class _StopIn:
    """The in-process port; a stop is asked for during round `at`'s training, and the port
    gives up as the grid's wait does (`server.stoppable_grid`) or, with `finish`, as a round
    that must finish does: the stop is seen after it."""

    def __init__(self, inner: InProcessPort, at: int, finish: bool = False) -> None:
        self.inner, self.at, self.finish = inner, at, finish

    def train(self, round_, cohort, adapter, clipping_norm):
        if round_ == self.at:
            interrupt.request(signal.SIGTERM)
            if not self.finish:
                interrupt.check("in the middle of a round, which was abandoned")
        return self.inner.train(round_, cohort, adapter, clipping_norm)

    def evaluate(self, round_, users, adapter, split):
        interrupt.check("while evaluating")  # held (fedrec.interrupt.holding) within a round
        return self.inner.evaluate(round_, users, adapter, split)


@pytest.mark.parametrize("finish", [False, True], ids=["abandoned", "finished"])
def test_a_stopped_run_keeps_a_checkpoint_that_resumes_to_the_uninterrupted_result(tiny_cfg, tmp_path, finish):
    cfg = tiny_cfg.replace(num_rounds=5, cohort_size=10, eval_every=1, checkpoint_every=0, bootstrap_samples=0,
                           clipping_norm=0.5, noise_multiplier=0.7, sampling="poisson")  # fmt: skip
    work = prepare_workload(cfg)
    whole, port = _run(cfg, work, out=ResultsDir(tmp_path / "whole"))
    whole.execute(port, started=0.0, ready_seconds=0.0, facts=RunFacts())

    out = tmp_path / "cut"
    cut, port = _run(cfg.replace(output_dir=str(out)), work, out=ResultsDir(out))
    with pytest.raises(interrupt.Interrupted) as stop:
        cut.execute(_StopIn(port, at=3, finish=finish), started=0.0, ready_seconds=0.0, facts=RunFacts())
    kept = 3 if finish else 2  # a finished round is kept whole, with its validation row; an abandoned one not at all
    assert stop.value.exit_code == 143
    assert stop.value.message.endswith(f"(after round {kept}); continue with: python -m fedrec.simulate --resume {out}")
    assert not (out / "summary.json").exists()  # checkpoint-every=0: written for the stop all the same
    interrupt.reset()

    state, _stored, folder = checkpoint.load(out)
    assert state["round"] == kept and [r["round"] for r in state["rows"]] == list(range(kept + 1))
    resumed, port = _run(cfg.replace(output_dir=str(out)), work, out=ResultsDir(out, resume_round=kept))
    resumed.resume(state, folder)
    resumed.execute(port, started=0.0, ready_seconds=0.0, facts=RunFacts())
    for k in whole.adapter:
        assert torch.equal(resumed.adapter[k], whole.adapter[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed.rows) == strip(whole.rows)
    assert resumed.mechanism.accountant.epsilons == whole.mechanism.accountant.epsilons


def test_pretraining_stops_between_minibatches():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    model.loss = lambda x, y, _s: ((model(x.float()) - 1) ** 2).mean()  # type: ignore[attr-defined]
    seqs = [np.arange(1, 6) for _ in range(64)]
    epochs = []
    fit = Fitting(epochs=50, lr=0.1, batch_size=8, max_seq_len=4, seed=0, device=torch.device("cpu"))

    def on_epoch(e, _loss, _score):
        epochs.append(e)
        if e == 2:
            interrupt.request()

    with pytest.raises(interrupt.Interrupted, match="none of it was kept"):
        fit_sequences(model, seqs, list(model.parameters()), fit, on_epoch=on_epoch)
    assert epochs == [1, 2]


def test_a_held_stretch_lets_the_stop_wait_for_its_end():
    interrupt.request()
    with interrupt.holding():
        interrupt.check("here")  # does not raise
    with pytest.raises(interrupt.Interrupted, match="^stopped after it$"):
        interrupt.check("after it")
    assert interrupt.wait(5.0)  # returns at once once a stop is asked for


def test_every_process_below_the_driver_is_found_and_stopped():
    # A child and a grandchild, as Ray's raylet and its workers are.
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    deadline = time.monotonic() + 10
    while len(interrupt.descendants(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    below = interrupt.descendants(parent.pid)
    assert len(below) == 2
    assert set(below) <= set(interrupt.descendants())  # this process's tree holds them too
    assert set(interrupt.kill_descendants(parent.pid)) == set(below)
    parent.wait(timeout=10)
    for pid in below:
        assert _gone(pid), pid


def _gone(pid: int) -> bool:
    """No such process, or a zombie (dead, waiting for its new parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


HOLD = "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n"


def test_a_folder_in_use_is_refused_in_one_line_before_anything_starts(tmp_path, capsys):
    from fedrec.simulate import main

    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("the other run's")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
        with pytest.raises(ConfigError, match="in use by another run"):
            lock_folder(out)
        t0 = time.monotonic()
        assert main(["--output-dir", str(out), "--run-config", "num-rounds=1"]) == 2
        assert time.monotonic() - t0 < 5  # refused before data, Ray or Flower
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"fedrec: config error: output-dir: {out} is in use by another run that is still going"]
        assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before
    finally:
        holder.kill()
        holder.wait()


def test_the_drivers_lock_covers_its_own_run_and_a_folder_it_made_for_nothing_goes(tmp_path):
    used, unused = tmp_path / "used", tmp_path / "a" / "unused"
    lock_folder(used)
    lock_folder(unused)
    results = ResultsDir(used)  # the driver's own run, in the same process: not refused
    results.append_metrics({"round": 0})
    unlock_folders()
    assert (used / "metrics.jsonl").exists() and not unused.exists() and (tmp_path / "a").exists()
    ResultsDir(used, resume_round=0).release()  # the lock is free again


def test_the_exit_status_is_the_shells():
    assert interrupt.Interrupted("x", signal.SIGINT).exit_code == 130
    assert interrupt.Interrupted("x", signal.SIGTERM).exit_code == 143
    code = "import sys\nfrom fedrec.interrupt import check, guarded, request\n" \
           "def main():\n    request()\n    check('here')\nsys.exit(guarded(main))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip() == "fedrec: stopped here"


def test_a_signal_after_the_work_is_said_and_keeps_its_status():
    code = "import sys\nfrom fedrec.interrupt import guarded, request\n" \
           "def main():\n    request()\n    return 0\nsys.exit(guarded(main))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "after the work had finished" in proc.stderr
