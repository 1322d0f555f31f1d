"""Ctrl-C and SIGTERM on real `python -m fedrec.simulate` runs (Flower simulation, Ray workers).

Each stop must end the driver within 10 s with the shell's status, keep a checkpoint (or say
that nothing was kept, during pretraining), leave none of the processes it started, and the
resumed run must equal an uninterrupted one. Evidence suite (`pytest -m evidence`): about
two minutes of simulations.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedrec.config import merge_run_config
from fedrec.interrupt import descendants
from tests.integration.test_simulation import TINY
from tests.integration.test_survive import _rows

pytestmark = pytest.mark.evidence

REPO = Path(__file__).resolve().parents[2]
RUN = merge_run_config(TINY, "num-rounds=30 cohort-size=30 eval-every=1 checkpoint-every=0 bootstrap-samples=50 "
                             "clipping-norm=0.5 noise-multiplier=0.8 sampling=poisson")  # fmt: skip
STOP_WITHIN_S = 10.0


class Driver:
    """`python -m fedrec.simulate ARGS` in a session of its own, its output in files."""

    def __init__(self, tmp: Path, name: str, *args: str, env: dict | None = None) -> None:
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        self.proc = subprocess.Popen([sys.executable, "-m", "fedrec.simulate", *args], cwd=REPO, start_new_session=True,
                                     stdout=self.out.open("w"), stderr=self.err.open("w"),
                                     env=os.environ | (env or {}))  # fmt: skip

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.out.read_text() + self.err.read_text()):
            assert self.proc.poll() is None, f"ended before {pattern!r}:\n{self.out.read_text()[-2000:]}{self.err.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s"
            time.sleep(0.05)

    def stop(self, sig: int, group: bool = False, again_after: float | None = None) -> tuple[int, float, list[int]]:
        """Send `sig` (to the whole session, as a terminal's Ctrl-C does, with `group`);
        returns the exit status, the seconds it took, and the processes it had started."""
        started = descendants(self.proc.pid)
        assert started, "the driver had started no process (Ray)"
        t0 = time.monotonic()
        os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)
        if again_after is not None:
            time.sleep(again_after)
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return code, time.monotonic() - t0, started

    @property
    def stderr(self) -> str:
        return self.err.read_text()


def _gone(pids: list[int], within: float = 5.0) -> list[int]:
    """The pids still running after `within` s (a zombie waiting for init to reap it is gone)."""
    deadline = time.monotonic() + within
    while True:
        left = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                left.append(pid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _simulate(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "fedrec.simulate", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _same_result(a: Path, b: Path) -> None:
    for name in ("adapter.safetensors", "adapter_last_round.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert _rows(a) == _rows(b)
    assert json.loads((a / "privacy.json").read_text()) == json.loads((b / "privacy.json").read_text())
    sa, sb = (json.loads((o / "summary.json").read_text()) for o in (a, b))
    assert sa["test"] == sb["test"] and sa["epsilon"] == sb["epsilon"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signals") / "whole"
    _simulate("--output-dir", str(out), "--run-config", RUN)
    return out


def _resumed_equals(out: Path, whole: Path, stderr: str) -> None:
    kept = int(re.search(r"\(after round (\d+)\); continue with: python -m fedrec\.simulate --resume (\S+)", stderr).group(1))
    assert 1 <= kept < 30 and not (out / "summary.json").exists()
    again = _simulate("--resume", str(out))
    assert f"resuming after round {kept}" in again.stdout
    _same_result(out, whole)


def test_ctrl_c_in_a_terminal_mid_round_stops_within_seconds_and_resumes_to_the_same_result(tmp_path, whole):
    out = tmp_path / "cut"
    run = Driver(tmp_path, "cut", "--output-dir", str(out), "--run-config", RUN)
    run.wait_for(r"round +2/30")  # many rounds left: a loaded CI machine may see the line late
    code, seconds, started = run.stop(signal.SIGINT, group=True)  # to every process of the session, Ray's too
    assert code == 130, run.stderr[-3000:]
    assert seconds < STOP_WITHIN_S, seconds
    assert _gone(started) == []
    assert "Traceback" not in run.stderr
    _resumed_equals(out, whole, run.stderr)


def test_sigterm_in_a_sweep_keeps_the_finished_run_and_the_checkpoint_of_the_one_in_progress(tmp_path, whole):
    out = tmp_path / "sweep"
    run = Driver(tmp_path, "sweep", "--output-dir", str(out), "--run-config", RUN, "--seeds", "1,0")
    run.wait_for(r"run 2/2[\s\S]*round +2/30")
    code, seconds, started = run.stop(signal.SIGTERM)
    assert code == 143 and seconds < STOP_WITHIN_S, (code, seconds, run.stderr[-3000:])
    assert _gone(started) == []
    assert "1 of 2 runs had finished" in run.stderr
    assert (out / "seed=1" / "summary.json").exists()
    _resumed_equals(out / "seed=0", whole, run.stderr)


def test_ctrl_c_during_pretraining_and_a_second_ctrl_c_stop_at_once(tmp_path):
    slow = merge_run_config(RUN, "pretrain-epochs=3000 pretrain-patience=0")
    run = Driver(tmp_path, "pretrain", "--output-dir", str(tmp_path / "p"), "--run-config", slow,
                 env={"FEDREC_CACHE_DIR": str(tmp_path / "cache")})  # fmt: skip
    run.wait_for(r"base model: pretraining on")
    time.sleep(1.0)  # into its epochs
    code, seconds, started = run.stop(signal.SIGINT)
    assert code == 130 and seconds < STOP_WITHIN_S, (code, seconds, run.stderr[-3000:])
    assert _gone(started) == []
    assert run.stderr.strip().splitlines()[-1] == (
        "fedrec: stopped during centralized training (pretraining or a ceiling); none of it was kept: "
        "run the same command again")  # fmt: skip
    assert not (tmp_path / "p").exists()  # the folder it had reserved held nothing, and went
    assert not list((tmp_path / "cache").glob("base-*"))

    run = Driver(tmp_path, "twice", "--output-dir", str(tmp_path / "t"), "--run-config", RUN)
    run.wait_for(r"round +2/30")
    code, seconds, started = run.stop(signal.SIGINT, again_after=0.05)
    assert code == 130 and seconds < 2.0, (code, seconds, run.stderr[-3000:])
    assert "second SIGINT: stopping at once" in run.stderr
    assert _gone(started) == []
