import json

from fedrec.report import write_sweep_table


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
    assert "| 0.2100 [0.1900, 0.2300] (r3) | 0.2000 | 0.2000 | 3.99 | 0.0001 | 0.72 | 0.5 | 0.06 | 0.441 | 1536 | 5 | 12.3 |" in dp
    assert "| – | – | – | 0.5 | – | – |" in no_dp  # a run without DP: no ε, δ, z, q
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows and rows[1]["noise_multiplier"] == 0.72
    printed = capsys.readouterr().out  # 14 columns off a terminal (80 wide): nothing may be cut to "…"
    assert "…" not in printed and "0.441" in printed and "z·√d/m" in printed
    assert "the same in every run: base 0.2000, C 0.5, d 1536, rounds 5, wall s 12.3" in printed

    write_sweep_table(points[:1], [_summary(None)], tmp_path / "public")
    assert "| z |" not in (tmp_path / "public" / "sweep.md").read_text()
