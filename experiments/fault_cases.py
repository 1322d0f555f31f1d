"""What a user sees for bad input and faults: each case runs the real command line in a
subprocess and is sorted by what came out.

    .venv/bin/python experiments/fault_cases.py [--only NAME,...] [--out FILE.md]

Outcomes: `error` (exit 2, one `fedrec: …` line on standard error), `notice` (the run
goes on and says what it did), `stop` (Ctrl-C or SIGTERM: exit 130/143 within 10 s, with
what was kept and how to go on), and the failures the goal excludes: `traceback`, `hang`
(no end within the case's time), `silent` (it did something other than asked, or nothing,
without a word), `unclear` (an error, but not in one line). Results:
experiments/README.md#fault-cases.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEDREC_SHARED_DATA", REPO.parent / "shared" / "data"))
# A workload that pretrains and runs in seconds (the tests' TINY).
TINY = ("synthetic-users=150 synthetic-items=80 synthetic-clusters=4 synthetic-mean-length=15 public-fraction=0.2 "
        "hidden-size=32 num-blocks=1 max-seq-len=20 pretrain-epochs=8 bootstrap-samples=20")  # fmt: skip


@dataclass
class Case:
    name: str
    args: list[str]  # after `python -m fedrec.simulate`; "{tmp}" is the case's folder
    expect: str  # error | notice | stop
    says: str = ""  # a substring the output must hold (error line, notice, stop message)
    setup: Callable[[Path], None] | None = None
    signal_after: tuple[str, int] | None = None  # (output to wait for, signal)
    timeout: float = 120.0
    env: dict[str, str] = field(default_factory=dict)


def _write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)

    return setup


def _csv(users: int, per_user: int = 6) -> str:
    rows = ["user,item,timestamp"]
    for u in range(users):
        rows += [f"u{u},i{(u + j) % 30},{1000 + j}" for j in range(per_user)]
    return "\n".join(rows) + "\n"


def _finished_run(tmp: Path) -> None:
    _simulate(tmp, ["--output-dir", str(tmp / "done"), "--run-config", f"{TINY} num-rounds=2 checkpoint-every=1"])


def _finished_then(change: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        _finished_run(tmp)
        change(tmp / "done")

    return setup


def _simulate(tmp: Path, args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedrec.simulate", *args], capture_output=True, text=True, cwd=REPO,
                          env=os.environ | {"FEDREC_CACHE_DIR": str(tmp.parent / "cache")}, timeout=600)  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"set-up run failed: {proc.stderr[-2000:]}")


def _damage_state(done: Path, old: bool) -> None:
    if old:
        shutil.copytree(done / "checkpoint", done / "checkpoint.old")
    (done / "checkpoint" / "state.pt").write_bytes(b"\0" * 100)


def _held_folder(tmp: Path) -> None:
    (tmp / "busy").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | "
                               "os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(120)\n",
                               str(tmp / "busy" / ".fedrec.lock")], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    holder.stdout.readline()
    _HOLDERS.append(holder)


def _background(tmp: Path, out: Path, extra: str, ready: Callable[[], bool], timeout: float) -> subprocess.Popen:
    """A run into `out` in a session of its own, once `ready()` (or after `timeout` s)."""
    proc = subprocess.Popen([sys.executable, "-m", "fedrec.simulate", "--output-dir", str(out), "--run-config",
                             _merged(TINY, extra)], cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ | {"FEDREC_CACHE_DIR": str(tmp.parent / "cache")})  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc


def _running_run(tmp: Path) -> None:
    """A run into {tmp}/same that is past its start (its folder locked) when the case starts."""
    out = tmp / "same"
    _HOLDERS.append(_background(tmp, out, "num-rounds=200", lambda: (out / ".fedrec.lock").exists(), 60))


def _killed_before_checkpoint(tmp: Path) -> None:
    """A run SIGKILLed after its third metrics row and before its first checkpoint."""
    rows = tmp / "killed" / "metrics.jsonl"
    proc = _background(tmp, tmp / "killed", "num-rounds=200 checkpoint-every=100",
                       lambda: rows.exists() and rows.read_text().count("\n") >= 3, 120)  # fmt: skip
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


_HOLDERS: list[subprocess.Popen] = []
RC = ["--run-config"]


def _merged(*parts: str) -> str:
    """run-config strings joined, later keys replacing earlier ones (a key given twice is its own case)."""
    pairs: dict[str, str] = {}
    for part in parts:
        for item in part.split():
            key, _, value = item.partition("=")
            pairs[key] = item
    return " ".join(pairs.values())


def cases() -> list[Case]:
    run = lambda extra="": ["--output-dir", "{tmp}/out", *RC, _merged(TINY, "num-rounds=2", extra)]  # noqa: E731
    ml = SHARED / "ml-100k" / "u.data"
    c = [
        # --- config values
        Case("unknown key", run("foo=1"), "error", "foo: unknown key"),
        Case("negative rounds", run("num-rounds=-1"), "error", "num-rounds"),
        Case("nan learning rate", run("learning-rate=nan"), "error", "learning-rate"),
        Case("zero cohort", run("cohort-size=0"), "error", "cohort-size"),
        Case("negative epsilon", run("target-epsilon=-1"), "error", "target-epsilon"),
        Case("rank zero", run("lora-rank=0"), "error", "lora-rank"),
        Case("unknown dataset", run("dataset=nope"), "error", "dataset"),
        Case("unknown sampling", run("sampling=maybe"), "error", "sampling"),
        Case("negative clip", run("clipping-norm=-0.5"), "error", "clipping-norm"),
        Case("unknown device", run("device=tpu"), "error", "device"),
        Case("no workers", run("num-workers=0"), "error", "num-workers"),
        Case("negative eval users", run("eval-users=-5"), "error", "eval-users"),
        Case("not a number", run("num-rounds=many"), "error", "num-rounds"),
        Case("key given twice", ["--output-dir", "{tmp}/out", *RC, "num-rounds=3 num-rounds=5"], "error", "given twice"),
        Case("no = in run-config", run("num-rounds"), "error", "num-rounds"),
        Case("max-epsilon without noise", run("target-epsilon=0 clipping-norm=0.5 max-epsilon=1"), "error", "max-epsilon"),
        Case("epsilon without a clip", run("target-epsilon=4"), "error", "clipping-norm"),
        Case("data-path with synthetic data", run("data-path={tmp}/d.csv"), "error", "data-path", _write("d.csv", _csv(20))),
        Case("every user public", run("public-fraction=1.0"), "error", "public-fraction"),
        Case("too many cores", run("client-num-cpus=999"), "error", "client-num-cpus"),
        Case("a GPU that is not there", run("client-num-gpus=1"), "error", "client-num-gpus"),
        Case("device placement on a Ray cluster", run("placement=device ray-address=127.0.0.1:6379"), "error", "ray-address"),
        # --- files given on the command line
        Case("--config missing", ["--config", "{tmp}/none.toml"], "error", "not found"),
        Case("--config a folder", ["--config", "{tmp}"], "error", "is a folder"),
        Case("--config binary", ["--config", "{tmp}/b.toml"], "error", "--config", _write("b.toml", bytes(range(256)))),
        Case("--config bad TOML", ["--config", "{tmp}/c.toml"], "error", "c.toml", _write("c.toml", "num-rounds = = 3\n")),
        Case("--config unknown key", ["--config", "{tmp}/k.toml"], "error", "bogus", _write("k.toml", "bogus = 1\n")),
        Case("--output-dir a file", ["--output-dir", "{tmp}/f", *RC, TINY], "error", "is a file", _write("f", "x")),
        Case("--output-dir not writable", ["--output-dir", "/proc/fedrec/out", *RC, TINY], "error", "cannot be created"),
        Case("--output-dir holds a finished run", ["--output-dir", "{tmp}/done", *RC, f"{TINY} num-rounds=2"], "error",
             "holds another run's files", _finished_run),  # fmt: skip
        Case("--output-dir in use by a running run", ["--output-dir", "{tmp}/busy", *RC, TINY], "error", "in use by another run",
             _held_folder),  # fmt: skip
        Case("two runs into one folder at once", ["--output-dir", "{tmp}/same", *RC, _merged(TINY, "num-rounds=2")], "error",
             "in use by another run", _running_run),  # fmt: skip
        Case("a rerun into a run killed before its first checkpoint", ["--output-dir", "{tmp}/killed", *RC, TINY], "error",
             "holds another run's files", _killed_before_checkpoint),  # fmt: skip
        Case("--sweep without values", ["--output-dir", "{tmp}/s", "--sweep", "target-epsilon", *RC, TINY], "error", "--sweep"),
        Case("--sweep over output-dir", ["--output-dir", "{tmp}/s", "--sweep", "output-dir=a,b", *RC, TINY], "error", "cannot be swept"),
        Case("--seeds and a seed sweep", ["--output-dir", "{tmp}/s", "--sweep", "seed=1,2", "--seeds", "0,1", *RC, TINY], "error",
             "--seeds"),  # fmt: skip
        # --- resume
        Case("--resume a folder without checkpoint", ["--resume", "{tmp}"], "error", "resume"),
        Case("--resume below the rounds run", ["--resume", "{tmp}/done", *RC, "num-rounds=1"], "error", "already run 2 rounds",
             _finished_run),  # fmt: skip
        Case("--resume changing a finished round's key", ["--resume", "{tmp}/done", *RC, "learning-rate=0.1"], "error",
             "learning-rate", _finished_run),  # fmt: skip
        Case("--resume with --output-dir", ["--resume", "{tmp}/done", "--output-dir", "{tmp}/x"], "error", "--resume",
             _finished_run),  # fmt: skip
        Case("--resume damaged state.pt, old whole", ["--resume", "{tmp}/done", *RC, "num-rounds=3"], "notice", "is damaged",
             _finished_then(lambda d: _damage_state(d, old=True))),  # fmt: skip
        Case("--resume damaged state.pt", ["--resume", "{tmp}/done"], "error", "is damaged",
             _finished_then(lambda d: _damage_state(d, old=False))),  # fmt: skip
        Case("--resume damaged config.json", ["--resume", "{tmp}/done"], "error", "config.json",
             _finished_then(lambda d: (d / "checkpoint" / "config.json").write_text("{not json"))),  # fmt: skip
        Case("--resume a copied folder", ["--resume", "{tmp}/copy", *RC, "num-rounds=3"], "notice", "resuming after round 2",
             _finished_then(lambda d: shutil.copytree(d, d.parent / "copy"))),  # fmt: skip
        Case("--resume a moved folder", ["--resume", "{tmp}/moved", *RC, "num-rounds=3"], "notice", "resuming after round 2",
             _finished_then(lambda d: shutil.move(d, d.parent / "moved"))),  # fmt: skip
        # --- data files
        Case("data-path missing", run("dataset=csv data-path={tmp}/none.csv"), "error", "does not exist"),
        Case("CSV without a column", run("dataset=csv data-path={tmp}/d.csv"), "error", "d.csv",
             _write("d.csv", "user,item\nu1,i1\n")),  # fmt: skip
        Case("CSV with a bad timestamp", run("dataset=csv data-path={tmp}/d.csv"), "error", "d.csv:3",
             _write("d.csv", "user,item,timestamp\nu1,i1,1\nu1,i2,noon\n")),  # fmt: skip
        Case("empty CSV", run("dataset=csv data-path={tmp}/d.csv"), "error", "d.csv", _write("d.csv", "")),
        Case("binary data file", run("dataset=csv data-path={tmp}/d.csv"), "error", "d.csv", _write("d.csv", bytes(range(256)) * 4)),
        Case("a 2-user CSV", run("dataset=csv data-path={tmp}/d.csv"), "error", "private user", _write("d.csv", _csv(2))),
        Case("item-features missing", run("item-adapter=features item-features={tmp}/none.json"), "error", "does not exist"),
        Case("sqlite file as CSV", run("dataset=csv data-path={tmp}/d.csv"), "error", "d.csv", _sqlite("d.csv")),
        # --- signals
        Case("Ctrl-C mid-round", ["--output-dir", "{tmp}/out", *RC, f"{TINY} num-rounds=200 eval-every=1"], "stop",
             "--resume", signal_after=(r"round +4/200", signal.SIGINT)),  # fmt: skip
        Case("SIGTERM mid-round", ["--output-dir", "{tmp}/out", *RC, f"{TINY} num-rounds=200 eval-every=1"], "stop",
             "--resume", signal_after=(r"round +4/200", signal.SIGTERM)),  # fmt: skip
        Case("Ctrl-C while pretraining", ["--output-dir", "{tmp}/out", *RC, _merged(TINY, "pretrain-epochs=5000 pretrain-patience=0")],
             "stop", "none of it was kept", signal_after=(r"base model: pretraining on", signal.SIGINT),
             env={"FEDREC_CACHE_DIR": "{tmp}/fresh-cache"}),  # fmt: skip
        Case("Ctrl-C in a sweep", ["--output-dir", "{tmp}/sw", "--seeds", "0,1", *RC, f"{TINY} num-rounds=60 eval-every=1"],
             "stop", "runs had finished", signal_after=(r"run 2/2[\s\S]*round +3/60", signal.SIGINT)),  # fmt: skip
    ]
    if ml.exists():
        c += [
            Case("item-features malformed", run(f"dataset=movielens data-path={ml} item-adapter=features "
                                                "item-features={tmp}/f.json"), "error", "not valid JSON",
                 _write("f.json", '{"1": [1],\n "2": oops}\n')),  # fmt: skip
            Case("item-features with an unknown item", run(f"dataset=movielens data-path={ml} item-adapter=features "
                                                           "item-features={tmp}/f.json"), "error", "not in the interaction data",
                 _write("f.json", '{"no-such-item": [1]}\n')),  # fmt: skip
        ]
    return c


def _sqlite(name: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        with sqlite3.connect(tmp / name) as db:
            db.execute("create table t (a)")

    return setup


def run_case(case: Case, tmp: Path) -> tuple[str, float, str]:
    """(outcome, seconds, the lines it printed that matter)."""
    fill = lambda s: s.replace("{tmp}", str(tmp))  # noqa: E731
    if case.setup:
        case.setup(tmp)
    env = os.environ | {"FEDREC_CACHE_DIR": str(tmp.parent / "cache")} | {k: fill(v) for k, v in case.env.items()}
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    t0 = time.monotonic()
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "fedrec.simulate", *map(fill, case.args)], cwd=REPO, env=env,
                                stdout=o, stderr=e, start_new_session=True)  # fmt: skip
        signalled = None
        if case.signal_after:
            signalled = _signal_when(proc, out, err, *case.signal_after, t0=t0, timeout=case.timeout)
        try:
            proc.wait(timeout=max(1.0, case.timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "hang", time.monotonic() - t0, err.read_text()[-300:]
    seconds = time.monotonic() - t0
    stdout, stderr = out.read_text(), err.read_text()
    said = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback" in stderr or "Traceback" in stdout:
        return "traceback", seconds, stderr[-400:]
    if case.expect == "error":
        if proc.returncode == 0:
            return "silent", seconds, stdout[-300:]
        one = len(said) == 1 and said[0].startswith("fedrec: ") and case.says in said[0]
        return ("error" if one and proc.returncode == 2 else "unclear"), seconds, "\n".join(said[-3:])
    if case.expect == "notice":
        ok = proc.returncode == 0 and case.says in stdout + stderr
        notice = [line for line in (stdout + stderr).splitlines() if case.says in line]
        return ("notice" if ok else "silent" if proc.returncode == 0 else "unclear"), seconds, "\n".join(notice[-1:])
    stop_s = seconds - (signalled or 0.0)
    clean = proc.returncode in (130, 143) and stop_s < 10 and case.says in stderr
    return ("stop" if clean else "unclear"), stop_s, "\n".join(said[-2:])


def _signal_when(proc: subprocess.Popen, out: Path, err: Path, pattern: str, sig: int, *, t0: float,
                 timeout: float) -> float | None:  # fmt: skip
    """Send `sig` once the output matches `pattern`; the seconds from the start it was sent at."""
    import re

    while time.monotonic() < t0 + timeout and proc.poll() is None:
        if re.search(pattern, out.read_text() + err.read_text()):
            proc.send_signal(sig)
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--out", type=Path, help="write the table (markdown) here too")
    args = parser.parse_args()
    chosen = [c for c in cases() if not args.only or c.name in args.only.split(",")]
    root = Path(tempfile.mkdtemp(prefix="fedrec-faults-"))
    rows, counts = [], Counter()
    try:
        for i, case in enumerate(chosen, start=1):
            tmp = root / f"case-{i}"
            tmp.mkdir()
            outcome, seconds, said = run_case(case, tmp)
            counts[outcome] += 1
            line = said.strip().splitlines()[-1] if said.strip() else ""
            rows.append(f"| {i} | {case.name} | {case.expect} | **{outcome}** | {seconds:.1f} | {line[:150].replace('|', '/')} |")
            print(f"[{i}/{len(chosen)}] {case.name}: {outcome} ({seconds:.1f} s) {line[:120]}", flush=True)
            for holder in _HOLDERS:  # each in a session of its own, with what it started
                os.killpg(holder.pid, signal.SIGKILL)
                holder.wait()
            _HOLDERS.clear()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = ["| # | case | expected | outcome | s | last line |", "|---:|---|---|---|---:|---|", *rows, "",
             "counts: " + ", ".join(f"{k} {counts[k]}" for k in ("error", "notice", "stop", "traceback", "hang", "silent",
                                                                 "unclear"))]  # fmt: skip
    print("\n".join(table))
    if args.out:
        args.out.write_text("\n".join(table) + "\n")
    return 0 if not (counts["traceback"] or counts["hang"] or counts["silent"] or counts["unclear"]) else 1


if __name__ == "__main__":
    sys.exit(main())
