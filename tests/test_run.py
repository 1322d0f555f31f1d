"""The run object: its rounds through the in-process port, and its checkpointable state."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec import checkpoint
from fedrec.config import FedRecConfig
from fedrec.inprocess import InProcessPort
from fedrec.results import ResultsDir
from fedrec.callbacks import RunCallback
from fedrec.run import FederatedRun, RunFacts
from fedrec.summary import RunSummary
from fedrec.workload import describe_adapter, prepare_workload


def _run(cfg: FedRecConfig, work, out=None) -> tuple[FederatedRun, InProcessPort]:
    port = InProcessPort(cfg, work)
    info = describe_adapter(cfg, port.model, work.item_side, log=lambda _m: None)
    run = FederatedRun(cfg, info.initial, work.data.private, dimension=info.dimension, out=out, log=lambda _m: None,
                       sent_keys=info.sent, public=work.data.public)
    return run, port


def _rows(run: FederatedRun) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in run.rows]


@pytest.mark.parametrize("dp", [False, True, "banded-mf"])
def test_a_run_resumed_from_its_state_dict_ends_where_an_uninterrupted_one_does(tiny_cfg, dp):
    privacy = {False: {}, True: dict(noise_multiplier=0.8, sampling="poisson", adaptive_clipping=True, clip_count_stddev=2.0),
               # correlated noise: the resumed run must carry the last bands' noise vectors
               "banded-mf": dict(noise_multiplier=0.8, sampling="cyclic", mechanism="banded-mf", mf_bands=3,
                                 model_selection="public")}[dp]  # fmt: skip
    cfg = tiny_cfg.replace(num_rounds=4, cohort_size=20, eval_every=2, clipping_norm=0.5, bootstrap_samples=0, **privacy)
    work = prepare_workload(cfg)

    whole, port = _run(cfg, work)
    whole.evaluate_base(port)
    whole.run_rounds(port)

    first, port = _run(cfg, work)
    first.evaluate_base(port)
    first.run_rounds(port, until=2)
    # Through bytes, as a checkpoint file would carry it.
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed, port = _run(cfg, work)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    assert resumed.round == 2
    resumed.run_rounds(port)

    assert resumed.round == whole.round == 4
    for k in whole.adapter:
        assert torch.equal(resumed.adapter[k], whole.adapter[k]), k
    assert resumed.mechanism.clipping_norm == whole.mechanism.clipping_norm
    assert resumed.users_trained == whole.users_trained
    if dp is True:
        assert resumed.mechanism.accountant.epsilons == whole.mechanism.accountant.epsilons
        assert resumed.mechanism.accountant.events == whole.mechanism.accountant.events
    if dp == "banded-mf":
        assert whole.mechanism.bands == 3 and resumed.mechanism.epsilons == whole.mechanism.epsilons
        assert resumed.pick.round == whole.pick.round and resumed.meter.signal == whole.meter.signal
    assert _rows(resumed) == _rows(whole)
    assert resumed.best.round == whole.best.round


def test_a_loaded_state_must_come_from_the_same_population(tiny_cfg):
    cfg = tiny_cfg.replace(num_rounds=2, cohort_size=10)
    work = prepare_workload(cfg)
    run, _port = _run(cfg, work)
    state = run.state_dict()
    other = FederatedRun(cfg, run.adapter, work.data.private[:-1], dimension=run.dimension, log=lambda _m: None)
    with pytest.raises(ValueError, match="population"):
        other.load_state_dict(state)


def test_execute_writes_the_results_directory_and_selects_on_validation(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(num_rounds=3, cohort_size=20, eval_every=1, bootstrap_samples=50)
    work = prepare_workload(cfg)
    run, port = _run(cfg, work, out=ResultsDir(tmp_path / "res"))
    summary = run.execute(port, started=0.0, ready_seconds=0.0, facts=RunFacts(dataset="synthetic"))
    assert summary.rounds == 3 and summary.users_trained == 60
    valid = [r["valid"]["ndcg@10"] for r in run.rows]
    assert summary.best_round == int(np.argmax(valid))  # round 0 (the base) is a candidate too
    assert summary.epsilon is None
    for name in ("metrics.jsonl", "summary.json", "privacy.json", "adapter.safetensors", "adapter_last_round.safetensors"):
        assert (tmp_path / "res" / name).exists(), name
    assert len((tmp_path / "res" / "metrics.jsonl").read_text().splitlines()) == 4


class _FailingPort:
    """The in-process port, failing as a federation with no worker left does (from round 3)."""

    def __init__(self, inner: InProcessPort) -> None:
        self.inner = inner

    def train(self, round_, cohort, adapter, clipping_norm):
        if round_ >= 3:
            raise RuntimeError("train: 2 of 2 nodes failed")
        return self.inner.train(round_, cohort, adapter, clipping_norm)

    def evaluate(self, round_, users, adapter, split):
        return self.inner.evaluate(round_, users, adapter, split)


def test_a_run_that_cannot_go_on_names_its_checkpoint_and_the_resume_command(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(num_rounds=5, cohort_size=10, checkpoint_every=2, eval_every=0, output_dir=str(tmp_path / "res"))
    work = prepare_workload(cfg)
    run, port = _run(cfg, work, out=ResultsDir(tmp_path / "res"))
    with pytest.raises(RuntimeError) as err:
        run.execute(_FailingPort(port), started=0.0, ready_seconds=0.0, facts=RunFacts())
    lines = str(err.value).splitlines()
    assert lines[0] == "train: 2 of 2 nodes failed"
    assert lines[1] == (f"last checkpoint: {tmp_path / 'res' / 'checkpoint'} (after round 2); continue with: "
                        f"python -m fedrec.simulate --resume {tmp_path / 'res'}")  # fmt: skip
    state, stored, _folder = checkpoint.load(tmp_path / "res")
    assert state["round"] == 2 and stored == run.cfg


def test_a_checkpoint_puts_the_clients_own_state_back_as_it_was(tiny_cfg, tmp_path):
    from fedrec.local_state import UserStateStore

    store_dir = tmp_path / "res" / "client-state"
    store = UserStateStore(store_dir)
    store.save(1, {"b": torch.ones(3)})
    store.save(2, {"b": torch.full((3,), 2.0)})
    cfg = tiny_cfg.replace(output_dir=str(tmp_path / "res"))
    checkpoint.save(tmp_path / "res", {"round": 4}, cfg, store_dir)
    store.save(1, {"b": torch.zeros(3)})  # rounds after the checkpoint: changed, and a new user
    store.save(3, {"b": torch.ones(3)})
    _state, _cfg, folder = checkpoint.load(tmp_path / "res")
    checkpoint.restore_client_state(folder, store_dir)
    assert torch.equal(store.load(1)["b"], torch.ones(3)) and torch.equal(store.load(2)["b"], torch.full((3,), 2.0))
    assert store.load(3) is None
    # A second checkpoint replaces the first whole.
    checkpoint.save(tmp_path / "res", {"round": 6}, cfg, store_dir)
    assert checkpoint.load(tmp_path / "res")[0]["round"] == 6
    assert not (tmp_path / "res" / "checkpoint.tmp").exists() and not (tmp_path / "res" / "checkpoint.old").exists()


class _RecordingPort(_FailingPort):
    """The in-process port, remembering which users each evaluation asked for."""

    def __init__(self, inner: InProcessPort) -> None:
        super().__init__(inner)
        self.asked: list[tuple[str, np.ndarray]] = []

    def train(self, round_, cohort, adapter, clipping_norm):
        return self.inner.train(round_, cohort, adapter, clipping_norm)

    def evaluate(self, round_, users, adapter, split):
        self.asked.append((split, np.asarray(users)))
        return self.inner.evaluate(round_, users, adapter, split)


def test_test_users_scores_a_seeded_sample_apart_from_validation(tiny_cfg):
    cfg = tiny_cfg.replace(num_rounds=2, cohort_size=10, eval_every=1, eval_users=15, test_users=20, bootstrap_samples=50)
    work = prepare_workload(cfg)
    run, inner = _run(cfg, work)
    port = _RecordingPort(inner)
    summary = run.execute(port, started=0.0, ready_seconds=0.0, facts=RunFacts())
    tests = [u for split, u in port.asked if split == "test"]
    valids = [u for split, u in port.asked if split == "valid"]
    assert len(tests) >= 2 and all(np.array_equal(u, tests[0]) for u in tests)  # base and result on one sample
    assert len(tests[0]) == 20 == summary.test_users and set(tests[0]) <= set(work.data.private.tolist())
    assert len(valids[0]) == 15 and not np.array_equal(np.sort(valids[0])[:15], np.sort(tests[0])[:15])
    again, _ = _run(cfg, work)
    assert np.array_equal(again.test_users, run.test_users)  # seeded
    assert len(_run(cfg.replace(test_users=0), work)[0].test_users) == len(work.data.private)
    lo, hi = summary.test_ci["ndcg@10"]
    assert lo <= summary.test["ndcg@10"] <= hi


def test_under_dp_the_headline_is_the_last_round_and_the_private_pick_only_a_diagnostic(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(num_rounds=4, cohort_size=20, eval_every=1, clipping_norm=0.5, sampling="poisson",
                           noise_multiplier=0.7, bootstrap_samples=0)  # fmt: skip
    work = prepare_workload(cfg)
    run, port = _run(cfg, work, out=ResultsDir(tmp_path / "res"))
    summary = run.execute(port, started=0.0, ready_seconds=0.0, facts=RunFacts())
    assert summary.selection == "last" and summary.best_round == 4
    assert summary.test == summary.last_round_test
    valid = [r["valid"]["ndcg@10"] for r in run.rows]
    diag = summary.diagnostic_private_best
    assert diag["round"] == int(np.argmax(valid))
    assert ("outside the privacy guarantee" in diag["note"]) == (diag["round"] != 4)
    rows = [r["train"] for r in run.rows[1:]]
    assert all(r["snr-noise"] == pytest.approx(0.7 * run.dimension**0.5 / 20) for r in rows)
    assert all("snr-agreed" in r and "snr-run" in r for r in rows)


class _StopAfter(RunCallback):
    """A researcher's measurement: sees every row and the result, stops the run after round 2."""

    def __init__(self) -> None:
        self.begun, self.rounds, self.result = 0, [], None

    def on_begin(self, run) -> None:
        self.begun += 1

    def after_round(self, run, row) -> bool:
        self.rounds.append(row["round"])
        return row["round"] == 2

    def on_end(self, run, result) -> None:
        self.result = result


def test_a_callback_sees_every_round_and_may_stop_the_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(num_rounds=5, cohort_size=10, eval_every=1, bootstrap_samples=0)
    work = prepare_workload(cfg)
    port = InProcessPort(cfg, work)
    info = describe_adapter(cfg, port.model, work.item_side, log=lambda _m: None)
    probe = _StopAfter()
    run = FederatedRun(cfg, info.initial, work.data.private, dimension=info.dimension, out=ResultsDir(tmp_path / "res"),
                       log=lambda _m: None, callbacks=[probe])  # fmt: skip
    summary = run.execute(port, started=0.0, ready_seconds=0.0, facts=RunFacts())
    assert probe.begun == 1 and probe.rounds == [0, 1, 2] and run.round == summary.rounds == 2
    assert probe.result.summary is summary and summary.best_round == run.best.round
    # The standard callbacks ran too: the rows, the summary and the adapter of the picked round are on disk.
    assert len((tmp_path / "res" / "metrics.jsonl").read_text().splitlines()) == 3
    written = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert RunSummary.from_dict(written) == summary and written == summary.to_dict()


def test_a_summary_file_reads_back_into_the_same_file():
    """Every mode's summary.json (federated, centralized, local-only) survives the typed record."""
    federated = RunSummary(dataset="x", test={"ndcg@10": 0.1}, subsets={"cold": ({"users": 1.0}, {"users": 1.0})},
                           epsilon=None, diagnostic_private_best={"round": 2})  # fmt: skip
    data = federated.to_dict()
    assert list(data)[:3] == ["mode", "dataset", "placement"] and "audit" not in data and "test_cold" in data
    centralized = {"mode": "centralized", "dataset": "x", "ceiling_full_test": {"ndcg@10": 0.2}, "epsilon": None}
    for d in (data, centralized):
        back = RunSummary.from_dict(d)
        assert back.to_dict() == d and list(back.to_dict()) == list(d)
    assert RunSummary.from_dict(centralized).model_metrics("ceiling_full_test")[0] == {"ndcg@10": 0.2}


def test_a_privacy_ledger_from_another_mechanism_is_refused():
    from fedrec.privacy.accountant import RoundEvent, make_accountant

    ledger = make_accountant("pld", "poisson", 1000, 1e-3)
    ledger.record(RoundEvent(1, 0.1, 1.0, 0.5, 100), 0.5)
    same = make_accountant("pld", "poisson", 1000, 1e-3)
    same.load_state_dict(ledger.to_dict())
    assert same.events == ledger.events and same.spent == 0.5
    for other in (make_accountant("prv", "poisson", 1000, 1e-3), make_accountant("pld", "poisson", 999, 1e-3),
                  make_accountant("pld", "poisson", 1000, 1e-4)):  # fmt: skip
        with pytest.raises(ValueError, match="does not fit this run's mechanism"):
            other.load_state_dict(ledger.to_dict())


def test_a_moved_run_folder_resumes_where_it_is_and_a_damaged_checkpoint_is_one_line(tiny_cfg, tmp_path):
    import shutil

    from fedrec.config import ConfigError
    from fedrec.inprocess import run_in_process
    from fedrec.simulate import build_config

    cfg = tiny_cfg.replace(num_rounds=2, cohort_size=10, eval_every=1, checkpoint_every=1, bootstrap_samples=0)
    run_in_process(cfg, tmp_path / "a", log=lambda _m: None)
    moved = tmp_path / "b"
    shutil.move(tmp_path / "a", moved)
    with pytest.raises(ConfigError, match="^num-rounds=1: the checkpoint has already run 2 rounds; give num-rounds=2 or more$"):
        build_config(["--resume", str(moved), "--run-config", "num-rounds=1"])
    resumed = build_config(["--resume", str(moved), "--run-config", "num-rounds=3"])
    assert resumed.output_dir == str(moved.resolve()) and resumed.resume_from == str(moved.resolve() / "checkpoint")
    summary = run_in_process(resumed, Path(resumed.output_dir), log=lambda _m: None)
    assert summary.rounds == 3 and not (tmp_path / "a").exists()
    assert [json.loads(line)["round"] for line in (moved / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]

    # A damaged state.pt: the whole previous checkpoint is used and said; with none whole, one line.
    shutil.copytree(moved / "checkpoint", moved / "checkpoint.old")
    (moved / "checkpoint" / "state.pt").write_bytes(b"\0" * 64)
    said = []
    _state, _cfg, folder = checkpoint.load(moved, log=said.append)
    assert folder == moved / "checkpoint.old" and "is damaged" in said[0] and "resuming from" in said[0]
    shutil.rmtree(moved / "checkpoint.old")
    with pytest.raises(ConfigError) as err:
        checkpoint.load(moved)
    assert str(err.value).startswith("resume-from: ") and "is damaged" in str(err.value) and "\n" not in str(err.value)


def test_a_results_folder_belongs_to_one_run(tiny_cfg, tmp_path, capsys):
    import hashlib

    from fedrec.config import ConfigError
    from fedrec.inprocess import run_in_process
    from fedrec.simulate import main

    cfg = tiny_cfg.replace(num_rounds=1, cohort_size=10, bootstrap_samples=0)
    done = tmp_path / "done"
    run_in_process(cfg, done, log=lambda _m: None)

    def sums() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(done.rglob("*")) if p.is_file()}

    before = sums()
    with pytest.raises(ConfigError, match="holds another run's files .*--overwrite.*--resume"):
        run_in_process(cfg.replace(seed=1), done, log=lambda _m: None)
    # The command line says so in one line, before any work.
    assert main(["--output-dir", str(done), "--run-config", "num-rounds=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedrec: config error: output-dir: {done} holds another run's files")
    (tmp_path / "a-file").write_text("x")
    assert main(["--output-dir", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err.strip() == f"fedrec: config error: output-dir: {tmp_path / 'a-file'} is a file, not a folder"
    assert sums() == before  # nothing in the folder changed

    # A folder a running run holds is refused at once; once the run is over, --overwrite replaces it.
    held = ResultsDir(tmp_path / "held")
    with pytest.raises(ConfigError, match="is in use by another run"):
        ResultsDir(tmp_path / "held", overwrite=True)  # even --overwrite: nothing of the running one is touched
    assert (tmp_path / "held" / "metrics.jsonl").exists()
    held.release()
    summary = run_in_process(cfg.replace(seed=1, overwrite=True), done, log=lambda _m: None)
    assert summary.rounds == 1 and sums() != before
    assert len((done / "metrics.jsonl").read_text().splitlines()) == 2  # this run's rows alone
