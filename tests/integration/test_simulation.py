"""Real Flower simulations (Ray backend), started the way a user starts them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedrec.config import merge_run_config
from safetensors.torch import load_file

TINY = (
    "synthetic-users=150 synthetic-items=80 synthetic-clusters=4 synthetic-mean-length=15 "
    "public-fraction=0.2 hidden-size=32 num-blocks=1 max-seq-len=20 pretrain-epochs=8"
)


def simulate(tmp_path: Path, name: str, run_config: str) -> dict:
    out = tmp_path / name
    cmd = [
        sys.executable, "-m", "fedrec.simulate", "--output-dir", str(out),
        "--run-config", merge_run_config(TINY, run_config),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    summary["_stdout"] = proc.stdout
    return summary


def test_federated_run_beats_base_and_writes_results(tmp_path):
    s = simulate(tmp_path, "fed", "num-rounds=40 cohort-size=30 eval-every=10")
    assert s["test"]["ndcg@10"] > s["base_test"]["ndcg@10"]
    assert s["best_round"] > 0
    assert s["rounds"] == 40 and s["users_trained"] == 40 * 30
    out = Path(s["results_dir"])
    names = ("config.toml", "metrics.jsonl", "summary.json", "summary.txt", "adapter.safetensors", "valid_ndcg10.png")
    for name in names:
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(41))
    assert "valid" in rows[0] and "valid" in rows[10] and "valid" in rows[40] and "valid" not in rows[5]
    assert sum(t.numel() * 4 for t in load_file(out / "adapter.safetensors").values()) == s["adapter_bytes"]
    assert "round  40/40" in s["_stdout"] and "federated" in s["_stdout"]
    for key in ("test", "base_test"):  # every test metric with its 95% interval over users
        ci = s[f"{key}_ci"]
        assert set(ci) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)}
        assert all(lo <= s[key][m] <= hi for m, (lo, hi) in ci.items())
    gain = s["test_gain_ci"]["ndcg@10"]
    assert gain[0] <= s["test"]["ndcg@10"] - s["base_test"]["ndcg@10"] <= gain[1]


def test_cohort_and_device_placement_give_the_same_aggregate(tmp_path):
    # FedAvg with server lr 1: the final adapter is init + the two rounds' mean updates,
    # so equal adapters mean equal aggregates. Clipping on, so it is exercised too.
    common = ("num-rounds=2 cohort-size=12 eval-every=0 server-optimizer=sgd server-learning-rate=1.0 clipping-norm=0.05 "
              "item-adapter=rows item-rows=16")  # an item adapter on both paths too
    cohort = simulate(tmp_path, "cohort", f"{common} placement=cohort num-workers=2")
    device = simulate(tmp_path, "device", f"{common} placement=device")  # a node per user, one worker per core
    a = load_file(Path(cohort["results_dir"]) / "adapter_last_round.safetensors")
    b = load_file(Path(device["results_dir"]) / "adapter_last_round.safetensors")
    assert a.keys() == b.keys() and "base_model.model.item_delta.R" in a
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    rows = [
        [json.loads(line) for line in (Path(s["results_dir"]) / "metrics.jsonl").read_text().splitlines()]
        for s in (cohort, device)
    ]
    for rc, rd in zip(rows[0][1:], rows[1][1:]):
        assert rc["train"]["users"] == rd["train"]["users"] == 12
        assert rc["train"]["update-norm"] > 0 and rc["train"]["clipped-fraction"] > 0
        for key in ("loss", "update-norm", "clipped-fraction"):
            assert rc["train"][key] == pytest.approx(rd["train"][key], rel=1e-5)
    assert cohort["last_round_test"]["ndcg@10"] == pytest.approx(device["last_round_test"]["ndcg@10"], abs=1e-6)
    # Communication, counted on the real messages: each device gets the whole adapter and sends its update.
    payload = device["communication"]["per_user_round"]
    assert payload == cohort["communication"]["per_user_round"]
    assert payload["down"] == device["adapter_bytes"] and payload["up"] == device["adapter_dimension"] * 4
    for rc, rd in zip(rows[0][1:], rows[1][1:]):
        assert rd["train"]["messages-down"] == rd["train"]["messages-up"] == 12  # one per sampled user
        assert rd["train"]["array-bytes-down"] == 12 * payload["down"]
        assert rd["train"]["array-bytes-up"] == 12 * payload["up"]
        assert rc["train"]["array-bytes-down"] == 2 * payload["down"]  # one message per cohort worker
        assert rc["train"]["array-bytes-up"] == 2 * payload["up"]  # a worker's sum has one user's shape
        assert rd["train"]["wire-bytes-up"] > rd["train"]["array-bytes-up"]  # framing and counts on top
    assert device["communication"]["run_total"]["up"] == 24 * payload["up"]
    assert device["communication"]["once_per_device"]["base"] > payload["down"]


def test_centralized_mode_reports_every_ceiling_early_stopped(tmp_path):
    s = simulate(tmp_path, "central", "mode=centralized centralized-epochs=30 centralized-patience=2 item-adapter=rows "
                 "item-rows=20 ceilings=scratch,full,transformer,same")  # fmt: skip
    for name in ("scratch", "full", "transformer", "same"):
        m, ci, epoch = s[f"ceiling_{name}_test"], s[f"ceiling_{name}_test_ci"], s[f"ceiling_{name}_epoch"]
        assert m["users"] == s["private_users"] and ci["ndcg@10"][0] <= m["ndcg@10"] <= ci["ndcg@10"][1]
        # epoch 0 (the starting weights) may win for full/same; a random start never beats training
        assert (1 if name == "scratch" else 0) <= epoch <= 30, name
    assert s["ceiling_full_test"]["ndcg@10"] > s["base_test"]["ndcg@10"]
    assert s["adapter_dimension"] == 20 * 32 + 2 * 8 * 32 * 6  # item rows + LoRA r=8 on six 32x32 projections
    rows = [json.loads(line) for line in (Path(s["results_dir"]) / "metrics.jsonl").read_text().splitlines()]
    for name in ("scratch", "full", "transformer", "same"):  # each stopped `patience` epochs after its best
        epochs = [r["epoch"] for r in rows if r["variant"] == name]
        assert epochs[-1] == 30 or epochs[-1] == s[f"ceiling_{name}_epoch"] + 2, name


def test_dp_run_writes_ledger_and_stops_at_max_epsilon(tmp_path):
    s = simulate(
        tmp_path,
        "dp",
        "num-rounds=30 cohort-size=20 eval-every=5 sampling=poisson noise-multiplier=0.8 clipping-norm=0.5 max-epsilon=3 "
        "audit-canaries=60",
    )
    ledger = json.loads((Path(s["results_dir"]) / "privacy.json").read_text())
    assert ledger["accountant"] == "pld" and ledger["sampling"] == "poisson"
    # The canaries the audit included join the sampled population, and so its δ = 1/N; the
    # evaluated users stay the private ones.
    audit = json.loads((Path(s["results_dir"]) / "audit.json").read_text())
    assert audit["real_users"] == s["private_users"] == s["test"]["users"] and len(audit["scores"]) == 60
    assert ledger["population"] == audit["sampled_population"] == s["private_users"] + audit["included"]
    assert ledger["delta"] == pytest.approx(1 / ledger["population"]) == audit["delta"]
    assert s["audit"]["claimed_epsilon"] == s["epsilon"] and 0 <= s["audit"]["epsilon_lower_bound"] <= s["epsilon"]
    rows = [json.loads(line) for line in (Path(s["results_dir"]) / "metrics.jsonl").read_text().splitlines()][1:]
    assert sum(r["train"]["canaries"] for r in rows) > 0
    eps = [r["epsilon"] for r in ledger["rounds"]]
    assert 0 < len(eps) < 30 and eps == sorted(eps) and eps[-1] <= 3
    assert s["rounds"] == len(eps) and s["epsilon"] == eps[-1]
    assert s["noise_to_signal"] == pytest.approx(0.8 * s["adapter_dimension"] ** 0.5 / 20)
    assert f"stopping before round {len(eps) + 1}" in s["_stdout"]


def test_silo_dpsgd_run_reports_growing_silo_epsilon(tmp_path):
    s = simulate(tmp_path, "silo", "partition=silo num-silos=3 num-rounds=3 eval-every=0 learning-rate=0.1")
    rows = [json.loads(line) for line in (Path(s["results_dir"]) / "metrics.jsonl").read_text().splitlines()][1:]
    eps = [r["train"]["silo-epsilon"] for r in rows]
    assert len(eps) == 3 and 0 < eps[0] < eps[1] < eps[2] == s["silo_epsilon"]
    assert all(r["train"]["users"] == s["private_users"] for r in rows)  # every silo, every round
    ledgers = sorted((Path(s["results_dir"]) / "client-state").glob("silo-*.json"))
    assert len(ledgers) == 3 and all(json.loads(p.read_text())[0][2] > 0 for p in ledgers)
    assert "not users across silos" in s["_stdout"]


def test_secagg_with_dp_noise_releases_the_same_adapter_as_plain_central_dp(tmp_path):
    # Same seed, same cohorts, same noise draw: SecAgg+ only changes what the server sees
    # (the unmasked sum instead of each update), not what it releases. FedAvg (sgd, 1.0): Adam
    # would turn quantization-sized differences of near-zero coordinates into ±lr steps.
    common = (
        "synthetic-users=40 public-fraction=0.85 placement=device num-rounds=2 cohort-size=5 eval-every=0 "
        "clipping-norm=0.05 noise-multiplier=0.8 sampling=poisson accountant=pld "
        "server-optimizer=sgd server-learning-rate=1.0"
    )
    plain = simulate(tmp_path, "plain", common)
    secure = simulate(tmp_path, "secagg", f"{common} secure-aggregation=secagg+")
    assert "SecAgg+ (3 shares, threshold 2)" in secure["_stdout"]
    a = load_file(Path(plain["results_dir"]) / "adapter_last_round.safetensors")
    b = load_file(Path(secure["results_dir"]) / "adapter_last_round.safetensors")
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5, k
    assert secure["epsilon"] == pytest.approx(plain["epsilon"]) and secure["epsilon"] > 0
    # SecAgg+'s stages (keys, shares, masked vectors, unmasking) cost more than one plain exchange per user.
    for way in ("down", "up"):
        assert secure["communication"]["wire_total"][way] > 1.2 * plain["communication"]["wire_total"][way]


@pytest.mark.evidence
def test_the_sum_secagg_unmasks_under_distributed_dp_carries_the_devices_noise(tmp_path):
    """noise-placement=devices through Flower's real SecAgg+: the released step minus the
    same cohort's step without noise is the unmasked sum's noise over m, and its spread is
    what the plan says the survivors' Skellam shares add up to: the server never held the
    sum without it."""
    import numpy as np

    common = ("synthetic-users=40 public-fraction=0.85 placement=device num-rounds=1 cohort-size=5 eval-every=0 "
              "clipping-norm=0.05 sampling=poisson secure-aggregation=secagg+ server-optimizer=sgd server-learning-rate=1.0")  # fmt: skip
    clean = simulate(tmp_path, "clean", common)
    noised = simulate(tmp_path, "noised", f"{common} noise-multiplier=0.8 noise-placement=devices")
    assert "distributed DP on the devices" in noised["_stdout"] and "round   1/1 | users    5" in noised["_stdout"]
    plan = json.loads((Path(noised["results_dir"]) / "privacy.json").read_text())["plan"]
    a = load_file(Path(clean["results_dir"]) / "adapter_last_round.safetensors")
    b = load_file(Path(noised["results_dir"]) / "adapter_last_round.safetensors")
    # Without DP the mean divides by the 5 users who reported; under DP by the expected 5.
    noise = np.concatenate([((b[k] - a[k]).double() * plan["expected_users"]).numpy().ravel() for k in a])
    expected = (5 * plan["device_variance"]) ** 0.5 / plan["scale"]  # five survivors' shares, back in float units
    assert noise.std() == pytest.approx(expected, rel=0.05)
    assert abs(noise.mean()) < 4 * expected / noise.size**0.5


# Two simulations: the second step of .ci/run (`pytest -m evidence`). The default suite
# shares one simulation between runs in test_cli_sweep_runs_the_grid_and_writes_its_table.
@pytest.mark.evidence
def test_runs_sharing_one_simulation_equal_the_same_runs_on_their_own(tmp_path):
    """run_many: two configs in one Flower simulation (Ray and workers start once), the
    second with another adapter (b-only) and DP, so a worker's cached model is not reused
    for it. Each must give what it gives in a simulation of its own."""
    common = merge_run_config(TINY, "num-rounds=4 cohort-size=20 eval-every=2 clipping-norm=0.5")
    second = "lora-train=b-only sampling=poisson target-epsilon=6"
    code = (
        "import sys\n"
        "from fedrec.simulate import build_config, run_many\n"
        f"a = build_config(['--output-dir', {str(tmp_path / 'shared-a')!r}, '--run-config', {common!r}])\n"
        f"b = build_config(['--output-dir', {str(tmp_path / 'shared-b')!r}, '--run-config', {merge_run_config(common, second)!r}])\n"
        "run_many([a, b])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run 2/2" in proc.stdout
    alone = simulate(tmp_path, "alone-b", f"num-rounds=4 cohort-size=20 eval-every=2 clipping-norm=0.5 {second}")
    shared = json.loads((tmp_path / "shared-b" / "summary.json").read_text())
    for key in ("test", "base_test", "valid", "best_round", "rounds", "epsilon", "noise_multiplier", "adapter_dimension"):
        assert shared[key] == alone[key], key
    a = load_file(tmp_path / "shared-b" / "adapter_last_round.safetensors")
    b = load_file(Path(alone["results_dir"]) / "adapter_last_round.safetensors")
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "shared-a" / "summary.json").read_text())["adapter_dimension"] == 2 * shared["adapter_dimension"]


def torch_equal(x, y) -> bool:
    return bool((x == y).all())


def test_run_many_refuses_shared_output_dirs_and_mixed_federations(tmp_path):
    from fedrec.config import ConfigError, FedRecConfig
    from fedrec.simulate import launch, run_many

    a = FedRecConfig(output_dir=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="own output-dir"):
        run_many([a, a.replace(lora_train="b-only")])
    with pytest.raises(ConfigError, match="agree on"):
        launch([a, a.replace(output_dir=str(tmp_path / "b"), num_workers=3)])
    assert not (tmp_path / "a").exists()  # refused before anything ran


def test_cli_sweep_runs_the_grid_and_writes_its_table(tmp_path):
    out = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "fedrec.simulate", "--output-dir", str(out),
        "--run-config", merge_run_config(TINY, "num-rounds=2 cohort-size=20 eval-every=0 clipping-norm=0.5"),
        "--sweep", "lora-train=both,b-only", "--seeds", "0,1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["lora-train"], r["seed"]) for r in rows] == [("both", 0), ("both", 1), ("b-only", 0), ("b-only", 1)]
    summaries = []
    for r in rows:
        summary = json.loads((Path(r["results_dir"]) / "summary.json").read_text())
        assert Path(r["results_dir"]).parent == out and summary["test"]["ndcg@10"] == r["test_ndcg10"]
        assert r["up_kb_per_user_round"] == summary["communication"]["per_user_round"]["up"] / 1024
        summaries.append(summary)
    dims = [s["adapter_dimension"] for s in summaries]
    assert dims[0] == 2 * dims[2]  # each point really ran its own config
    assert summaries[0]["base_test"] != summaries[1]["base_test"]  # another seed: another split and base
    assert len((out / "sweep.md").read_text().splitlines()) == 6 and "run 4/4" in proc.stdout  # head, rule, 4 rows
    # The report the sweep ends with: one group per lora-train value, its two seeds summarized.
    report = json.loads((out / "report.json").read_text())
    groups = {g["method"]: g for g in report["groups"]}
    assert set(groups) == {"lora-train=both", "lora-train=b-only"}
    assert groups["lora-train=both"]["seeds"] == [0, 1]
    assert groups["lora-train=both"]["test_ndcg10"] == [s["test"]["ndcg@10"] for s in summaries[:2]]
    assert "± " in (out / "report.md").read_text() and (out / "ndcg_vs_epsilon.png").stat().st_size > 0


def test_cli_sweep_errors_are_one_line_config_errors(capsys):
    # The CLI's own function, in this process: a subprocess per case only added Python's
    # start-up (`python -m fedrec.simulate`'s exit code and stderr: test_config's CLI tests).
    from fedrec.simulate import main

    for spec, message in (("num-rounds", "expected key=v1,v2"), ("lora-targets=q_proj,v_proj", "run_many"),
                          ("seed=1,2 seed=3", "given twice"), ("num-rounds=2,x", "num-rounds")):  # fmt: skip
        assert main(["--sweep", spec]) == 2, spec
        err = capsys.readouterr().err
        assert err.startswith("fedrec: config error: ") and len(err.strip().splitlines()) == 1 and message in err, spec


def test_worker_resources_ray_cannot_place_are_one_line_config_errors(tmp_path, capsys):
    """Flower's simulation would log 'ActorPool is empty' and hang; fedrec refuses first.

    The CLI's own function, in this process (refused before Ray or any model loads)."""
    import os

    import torch

    from fedrec.simulate import main

    cores = len(os.sched_getaffinity(0))
    cases = [(f"client-num-cpus={cores + 1}", "CPU cores"), ("", "client-num-cpus=1,64")]
    if not torch.cuda.device_count():
        cases += [("client-num-gpus=0.5", "Ray could not place"), ("device=cuda", "no CUDA device")]
    for run_config, message in cases:
        sweep = ["--sweep", message] if not run_config else []  # a grid with one point that cannot run
        assert main(["--output-dir", str(tmp_path / "out"), "--run-config", merge_run_config(TINY, run_config), *sweep]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fedrec: config error: ") and len(err.strip().splitlines()) == 1, err
        assert (message if run_config else "client-num-cpus=64") in err
        assert not (tmp_path / "out").exists()  # nothing ran, not even the sweep's first point
