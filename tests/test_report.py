import json

import pytest

from fedrec.inprocess import run_in_process
from fedrec.report import main as report_main
from fedrec.report import write_report, write_sweep_table


def _summary(epsilon, z=None, ndcg=0.25):
    return {
        "test": {"ndcg@10": ndcg}, "last_round_test": {"ndcg@10": ndcg - 0.01}, "base_test": {"ndcg@10": 0.2},
        "best_round": 3, "epsilon": epsilon, "delta": None if epsilon is None else 1e-4, "noise_multiplier": z,
        "clipping_norm": 0.5, "sampling_rate": None if epsilon is None else 0.06, "adapter_dimension": 1536,
        "noise_to_signal": None if z is None else z * 1536**0.5 / 64, "rounds": 5, "wall_seconds": 12.34,
        "results_dir": "/r", "test_ci": {"ndcg@10": [ndcg - 0.02, ndcg + 0.02]},
    }  # fmt: skip


def test_sweep_table_shows_what_epsilon_rests_on_only_when_a_run_is_private(tmp_path, capsys):
    points = [{"target-epsilon": "none"}, {"target-epsilon": "4"}]
    rows = write_sweep_table(points, [_summary(None), _summary(3.99, z=0.72, ndcg=0.21)], tmp_path, footer="took 9 s")
    head, rule, no_dp, dp, _blank, footer = (tmp_path / "sweep.md").read_text().splitlines()
    assert head.split(" | ")[5:10] == ["δ", "z", "C", "q", "z·√d/m"] and footer == "took 9 s"
    assert "| 0.2100 [0.1900, 0.2300] (r3) | 0.2000 | 0.2000 | 3.99 | 0.0001 | 0.72 | 0.5 | 0.06 | 0.441 | 1536 | – / – | 5 | 12.3 |" in dp
    assert "| none | – | – | 0.5 | – | – |" in no_dp  # a run without DP: ε none, no δ, z, q
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows and rows[1]["noise_multiplier"] == 0.72
    printed = capsys.readouterr().out  # 14 columns off a terminal (80 wide): nothing may be cut to "…"
    assert "…" not in printed and "0.441" in printed and "z·√d/m" in printed
    assert "the same in every run: base 0.2000, C 0.5, d 1536, KB down/up per user·round – / –, rounds 5, wall s 12.3" in printed

    write_sweep_table(points[:1], [_summary(None)], tmp_path / "public")
    assert "| z |" not in (tmp_path / "public" / "sweep.md").read_text()


def test_report_of_two_tiny_runs_draws_every_figure_and_tabulates_the_summaries(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg.replace(num_rounds=4, cohort_size=30, eval_every=2, clipping_norm=0.5, bootstrap_samples=50)
    plain = run_in_process(cfg, tmp_path / "runs" / "plain", log=lambda _m: None)
    private = run_in_process(cfg.replace(target_epsilon=4.0, sampling="poisson", audit_canaries=40), tmp_path / "runs" / "dp",
                             log=lambda _m: None)
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert "report:" in capsys.readouterr().out
    out = tmp_path / "report"
    for name in ("report.md", "ndcg_vs_epsilon.png", "valid_vs_rounds.png", "norm_vs_rounds.png",
                 "epsilon_vs_rounds.png", "bytes_vs_rounds.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).with_suffix(".pdf").stat().st_size > 0, name  # vector beside it
    groups = json.loads((out / "report.json").read_text())["groups"]
    assert len(groups) == 2
    by_eps = {g["epsilon"] is None: g for g in groups}
    assert by_eps[True]["test_ndcg10"] == [plain.test["ndcg@10"]]
    dp = by_eps[False]
    assert dp["test_ndcg10"] == [private.test["ndcg@10"]] and dp["epsilon"] == pytest.approx(private.epsilon)
    assert dp["z"] == private.noise_multiplier and dp["q"] == private.sampling_rate
    assert dp["audit_lower_bound"] == [private.audit["epsilon_lower_bound"]]
    text = (out / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ") and f"{private.epsilon:.3g}" in line)
    low, high = private.test_ci["ndcg@10"]
    assert f"{private.test['ndcg@10']:.4f} [{low:.4f}, {high:.4f}]" in row
    assert f"{private.audit['epsilon_lower_bound']:.2f} / " in row
    # Provenance: the commit, the stack's versions and the machine, in the summary and the report.
    import subprocess

    import torch

    from fedrec.provenance import PACKAGES, REPO

    for record in (json.loads((tmp_path / "runs" / "dp" / "summary.json").read_text())["provenance"],
                   json.loads((out / "report.json").read_text())["provenance"]):  # fmt: skip
        assert sorted(record["versions"]) == sorted(PACKAGES)
        assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0] and record["versions"]["flwr"]
        assert record["machine"]["cores"] >= 1 and record["machine"]["cpu"] and "gpu" in record["machine"]
        if (REPO / ".git").exists():
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
            assert record["git"]["commit"] == head and isinstance(record["git"]["dirty"], bool)


def test_report_of_an_empty_folder_is_a_one_line_error(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "no results directory" in capsys.readouterr().err


def test_report_names_what_it_skips_and_refuses_a_local_reference_on_other_users(tmp_path, capsys):
    from fedrec.report import write_report

    def run(name: str, summary: dict | None, config: str = "seed = 0\n") -> None:
        folder = tmp_path / "runs" / name
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "config.toml").write_text(config)
        if summary is not None:
            (folder / "summary.json").write_text(json.dumps(summary))

    ours = {"dataset": "synthetic(users=120)", "private_users": 100, "test_users": 100,
            "test": {"ndcg@10": 0.25, "hr@10": 0.4}}
    run("fed", _summary(None) | ours)
    run("fed-seed-1", _summary(None) | ours, config="seed = 1\n")  # another seed of the same data: kept
    run("other-data", _summary(None) | ours | {"dataset": "movielens(ml-100k)"},
        config='seed = 0\ndataset = "movielens"\ndata-path = "/data/ml-100k"\n')
    run("cut", None)
    (tmp_path / "runs" / "cut" / "checkpoint" / "manifest.json").write_text('{"round": 3, "client_state": {}}')
    run("failed", None)
    run("local", {"mode": "local", "dataset": ours["dataset"], "private_users": 100, "local_users": 40,
                  "base_test": {"ndcg@10": 0.28}, "local_test": {"ndcg@10": 0.30},
                  "local_test_gain_ci": {"ndcg@10": [0.01, 0.03]}})  # fmt: skip

    report = write_report([tmp_path / "runs"], tmp_path / "report")
    err = capsys.readouterr().err
    record = json.loads((tmp_path / "report" / "report.json").read_text())
    skipped = {line.split(":")[0].rsplit("/", 1)[1]: line for line in record["skipped"]}
    assert sorted(skipped) == ["cut", "failed", "other-data"]
    assert "stopped after round 3" in skipped["cut"] and "--resume" in skipped["cut"]
    assert "before its first checkpoint" in skipped["failed"] and "another dataset" in skipped["other-data"]
    assert all(f"skipped {line}" in err for line in record["skipped"])
    assert "local only" not in record["references"]  # 40 of 100 users: not the federated runs' test users
    assert "ranked 40 of 100 private users" in record["not_references"][0] and "0.2800" in record["not_references"][0]
    assert "Not a reference: local only" in report.read_text()


def test_the_population_law_takes_each_sizes_own_non_private_gain_and_finds_where_half_is_kept(tmp_path):
    """Runs of several population sizes (synthetic-users varies): the share each ε keeps is
    against the same N's non-private gain, averaged over seeds; the N that keeps 50% is
    interpolated in log N."""
    from fedrec.report import half_crossings

    def run(name: str, users: int, eps: float | None, seed: int, test: float) -> None:
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        s = _summary(eps, z=None if eps is None else 1.0, ndcg=test) | {"private_users": users - 20}
        s["test"]["hr@10"] = s["test"]["ndcg@10"] * 2
        # the last round: the non-private runs' 0.02 better than their headline, the private ones' the same
        s["last_round_test"] = {"ndcg@10": test + (0.02 if eps is None else 0.0)}
        (d / "summary.json").write_text(json.dumps(s))
        (d / "config.toml").write_text(f"seed = {seed}\nsynthetic-users = {users}\n"
                                       + (f"target-epsilon = {eps}\n" if eps else "noise-multiplier = 0.0\n"))
        (d / "metrics.jsonl").write_text(json.dumps({"round": 1, "train": {"snr-agreed": 0.01 * users / 1000}}) + "\n")

    # base 0.2; non-private gains 0.04 (N=1000) and 0.02 (N=10000); ε=8 keeps 25% and 75%
    run("a", 1020, None, 0, 0.24)
    run("b", 10020, None, 0, 0.22)
    for seed, jitter in ((0, -0.001), (1, 0.0), (2, 0.001)):
        run(f"a8-{seed}", 1020, 8.0, seed, 0.21 + jitter)
        run(f"b8-{seed}", 10020, 8.0, seed, 0.215 + jitter)
    write_report([tmp_path / "runs"], tmp_path / "report")
    law = json.loads((tmp_path / "report" / "report.json").read_text())["population_law"]
    cells = {(r["users"], r["epsilon"]): r for r in law}
    assert cells[(1000, "8")]["kept"] == pytest.approx(0.25) and cells[(10000, "8")]["kept"] == pytest.approx(0.75)
    assert cells[(1000, "8")]["seeds"] == 3 and cells[(1000, "8")]["kept_ci"][0] < 0.25 < cells[(1000, "8")]["kept_ci"][1]
    assert cells[(1000, "none")]["agreed"] == pytest.approx(0.0102)
    half = half_crossings(law)[("federated", "8")]
    assert half["at"] == pytest.approx(10**3.5, rel=1e-6)  # halfway in log N
    assert half["from"] < half["at"] < half["to"]
    # at the last round the references are 0.06 and 0.04: ε=8 keeps 1/6 and 3/8, never half
    assert cells[(1000, "8")]["kept_last"] == pytest.approx(1 / 6) and cells[(10000, "8")]["kept_last"] == pytest.approx(0.375)
    assert half_crossings(law, kept="kept_last")[("federated", "8")]["at"] is None
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## The population law" in text and (tmp_path / "report" / "gain_kept_vs_users.png").stat().st_size > 0


def test_a_law_above_half_at_every_size_puts_the_whole_interval_at_or_below_the_smallest():
    from fedrec.report import _law_lines

    rows = [{"method": "federated", "users": n, "epsilon": "8", "seeds": 3, "z": 0.5, "q": 0.01, "base": 0.2,
             "gain": 0.05, "gain_ci": None, "kept": 0.9, "kept_ci": [0.8, 1.0], "best_rounds": [50, 50, 50],
             "gain_last": 0.05, "kept_last": 0.9, "kept_last_ci": [0.6, 1.2], "agreed": 0.04} for n in (1000, 10000)]  # fmt: skip
    assert "| federated | 8 | ≤ 1,000 [≤ 1,000, ≤ 1,000] | ≤ 1,000 [≤ 1,000, ≤ 1,000] |" in _law_lines(rows)
    rows[0]["kept_ci"] = [0.4, 1.4]  # the lower end reaches half between the sizes (log-interpolated)
    assert "| federated | 8 | ≤ 1,000 [≤ 1,000, 1,778] |" in "\n".join(_law_lines(rows))
