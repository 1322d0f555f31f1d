"""Issue-4 benchmark: users trained per second, device vs cohort placement, loop vs vectorized.

    .venv/bin/python experiments/bench_throughput.py [--quick] [--json PATH] [--device cpu|cuda]

Rows: (a) device placement, one SuperNode per user; (b) cohort placement, 2 workers, the
per-user loop; (c) cohort placement, vectorized; (c') the same with the scoring GEMMs in
bfloat16 (`scoring-dtype`); (d) the compute bound.

Workload: ML-1M-shaped synthetic data (6,040 users, 3,700 items, mean length 165 as in
ML-1M, truncated to 50), SASRec d=64 with 2 blocks, LoRA r=8, 1 local epoch, cohort 500.
Each placement runs in its own process through a real Flower simulation, driving
fedrec's Strategy and ClientApp with a ServerApp that only trains (no evaluation), so
the rate is training rounds only: send, local training, clipping and summing on the
workers, receive, server step. The first round is timed but left out of the rate. Each
round's line also shows the slowest worker's time in training, and each placement how
busy the server process was meanwhile (it shares the cores with the workers).

(d) is the pure-compute bound: the FLOPs of the same users' local steps (counted by
torch's FlopCounterMode on the vectorized engine) divided by the rate of a 2048³ fp32
GEMM measured in this run on all cores (the best of samples taken before, between and
after the placements). `--quick` runs a smaller population and cohort,
without the bf16 row, and runs the placements one after another in this process (start-up
then counts from the simulation's launch, after the imports).
"""

from __future__ import annotations

import time

_T_PROCESS = time.time()  # before torch/flwr imports: start-up is measured from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> (placement, local-engine, scoring dtype, rounds, quick rounds)
    "device": ("device", "loop", "float32", 3, 2),
    "cohort_loop": ("cohort", "loop", "float32", 3, 2),
    "cohort_vectorized": ("cohort", "vectorized", "float32", 20, 3),
    "cohort_vectorized_bf16": ("cohort", "vectorized", "bfloat16", 20, 0),  # 0: not in --quick
}
RESULT_FILE = "bench-rounds.json"


def workload(quick: bool, device: str, cache_dir: str, cohort: int = 0) -> dict:
    return {
        "synthetic-users": 300 if quick else 6040,
        "synthetic-items": 1000 if quick else 3700,
        "synthetic-mean-length": 165,
        "max-seq-len": 50,
        "hidden-size": 64,
        "num-blocks": 2,
        "lora-rank": 8,
        "local-epochs": 1,
        "cohort-size": cohort or (60 if quick else 500),
        "pretrain-epochs": 5,  # the rate does not depend on how good the base is
        "num-workers": 2,
        "client-num-cpus": 1,
        "client-num-gpus": 0.5 if device == "cuda" else 0,
        "device": device,
        "cache-dir": cache_dir,
    }


# ---------------------------------------------------------------- one variant, in its own process
def _bench_server_app():
    """The run's own builder and round, training rounds only (no evaluation)."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from fedrec.run import FederatedRun
    from fedrec.workload import describe_adapter, load_workload, update_keys
    from server.app import server_configs
    from server.grid_port import GridPort

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        (cfg,) = server_configs(context.run_config)
        work = load_workload(cfg)
        model = work.model()
        adapter = describe_adapter(cfg, model, work.item_side, log=lambda _m: None)
        strategy = GridPort(cfg, work.data.private, update_keys=update_keys(cfg, model), log=lambda _m: None)
        strategy.connect(grid)  # also warms every node: data, base model, torch
        run = FederatedRun(cfg, adapter.initial, strategy.population, dimension=adapter.dimension, log=lambda _m: None)
        ready_at, cpu_at = time.time(), time.process_time()
        rounds = []
        for rnd in range(1, cfg.num_rounds + 1):
            t = time.time()
            metrics = run.train_round(strategy, rnd)
            rounds.append({"round": rnd, "start": t, "seconds": time.time() - t, "users": int(metrics["users"]),
                           "worker_peak_rss_mb": metrics["worker-peak-rss-mb"],
                           "worker_peak_gpu_mb": metrics.get("worker-peak-gpu-mb"),
                           "worker_train_s": metrics["worker-train-seconds"]})  # fmt: skip
            r = rounds[-1]
            print(f"  round {rnd}: {r['users']} users in {r['seconds']:.2f} s (slowest worker trained {r['worker_train_s']:.2f} s)",
                  flush=True)  # fmt: skip
        # CPU the server process (ServerApp, Flower's engine threads, Ray driver) used while the
        # rounds ran, per second of them: it competes with the workers for the same cores.
        server_cpu = (time.process_time() - cpu_at) / (time.time() - ready_at)
        Path(cfg.output_dir, RESULT_FILE).write_text(json.dumps({"ready_at": ready_at, "rounds": rounds,
                                                                 "server_cpu_share": server_cpu}))  # fmt: skip
        print(f"  server process busy {server_cpu:.0%} of one core during the rounds", flush=True)

    return app


def run_variant(cfg, started: float) -> None:
    """One placement's Flower simulation; start-up is counted from `started`."""
    from fedrec.simulate import launch

    launch(cfg, _bench_server_app())
    result = json.loads(Path(cfg.output_dir, RESULT_FILE).read_text())
    result["process_start"] = started
    Path(cfg.output_dir, RESULT_FILE).write_text(json.dumps(result))


# ---------------------------------------------------------------- the compute bound
def gemm_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * n**3 / (time.perf_counter() - t)


def _baddbmm_flops(self_shape, a_shape, b_shape, out_shape=None, **_kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def local_step_flops(cfg, users) -> float:
    """FLOPs of training `users` once with the vectorized engine, as torch counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fedrec.model.lora import adapter_state
    from fedrec.train.engine import train_cohort
    from fedrec.workload import load_workload

    work = load_workload(cfg)
    model = work.model()
    # torch's counter has no formula for the in-place baddbmm_ the LoRA path adds with
    # (it would count 0); the same FLOPs as the out-of-place op.
    inplace = {torch.ops.aten.baddbmm_: _baddbmm_flops}
    with FlopCounterMode(display=False, custom_mapping=inplace) as counter:
        train_cohort(cfg.replace(local_engine="vectorized"), model, adapter_state(model), work.data,
                     [int(u) for u in users], round_=1, clipping_norm=cfg.clipping_norm, device=torch.device("cpu"))
    return float(counter.get_total_flops())


def rate(result: dict) -> tuple[float, float, float]:
    """(users/s over rounds 2.., first round's seconds, share of those rounds spent outside training)."""
    later = result["rounds"][1:] or result["rounds"]
    seconds = sum(r["seconds"] for r in later)
    outside = 1.0 - sum(r["worker_train_s"] for r in later) / seconds
    return sum(r["users"] for r in later) / seconds, result["rounds"][0]["seconds"], outside


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 users, cohort 60, no bf16 row (smoke check, under 1 min; all in this process)")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cohort", type=int, default=0, help="users per round (default 500; --quick 60)")
    ap.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these placements")
    ap.add_argument("--variant-config", help=argparse.SUPPRESS)  # internal: run one variant
    args = ap.parse_args()
    from fedrec.config import FedRecConfig

    if args.variant_config:
        run_variant(FedRecConfig.from_mapping(json.loads(args.variant_config)), _T_PROCESS)
        return 0
    from fedrec.run import make_sampler
    from fedrec.workload import prepare_workload

    cache = os.environ.get("FEDREC_CACHE_DIR") or str(Path.home() / ".cache" / "fedrec")
    base = FedRecConfig.from_mapping(workload(args.quick, args.device, cache, args.cohort))
    work = prepare_workload(base, log=print)  # pretrains (and caches) the base before any timing
    cohort = make_sampler(base, work.data.private).draw(1)
    # The machine's GEMM rate is the best of samples taken before, between and after the
    # placements: one sample can land on a slow moment, which would flatter (d)/(c).
    gemm_samples = [gemm_flops_per_s()]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fedrec-bench-") as tmp:
        for name, (placement, engine, dtype, rounds, quick_rounds) in VARIANTS.items():
            if (args.only and name not in args.only) or (args.quick and not quick_rounds):
                continue
            cfg = base.replace(placement=placement, local_engine=engine, scoring_dtype=dtype,
                               num_rounds=quick_rounds if args.quick else rounds, output_dir=str(Path(tmp, name)))  # fmt: skip
            Path(cfg.output_dir).mkdir(parents=True)
            print(f"{name}: placement={placement}, local-engine={engine}, scoring-dtype={dtype}, {cfg.num_rounds} rounds",
                  flush=True)  # fmt: skip
            if args.quick:  # one simulation after another in this process: no second import of torch, peft, flwr
                run_variant(cfg, time.time())
            else:  # its own process, so that start-up to round 1 includes the imports a user waits for
                cmd = [sys.executable, __file__, "--variant-config", json.dumps(cfg.to_dict())]
                subprocess.run(cmd, check=True, cwd=ROOT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
            results[name] = json.loads(Path(cfg.output_dir, RESULT_FILE).read_text())
            gemm_samples.append(gemm_flops_per_s())

    gemm = max(gemm_samples)
    counted = cohort[:500]  # FLOPs per user are counted on the CPU: a sample of a large cohort is enough
    flops = local_step_flops(base, counted) * len(cohort) / len(counted)
    bound = len(cohort) / (flops / gemm)
    users_per_s = {name: rate(r)[0] for name, r in results.items()}
    users_per_s["compute_bound"] = bound
    vec = results.get("cohort_vectorized")
    out = {
        "users_per_s": users_per_s,
        "startup_s": vec["rounds"][0]["start"] - vec["process_start"] if vec else None,
        "peak_rss_mb": max(r["worker_peak_rss_mb"] for r in vec["rounds"]) if vec else None,
        "peak_gpu_mb": max((r.get("worker_peak_gpu_mb") or 0 for r in vec["rounds"]), default=0) if vec else None,
        "first_round_s": {name: rate(r)[1] for name, r in results.items()},
        # share of a round not spent in the slowest node's train handler: Flower transport,
        # polling, (de)serialization, server step (device placement: per-message overhead)
        "outside_training_share": {name: rate(r)[2] for name, r in results.items()},
        "gemm_gflops": gemm / 1e9,
        "gemm_gflops_samples": [round(g / 1e9, 1) for g in gemm_samples],
        "mflops_per_user": flops / len(cohort) / 1e6,
        "cohort": len(cohort),
        "population": len(work.data.private),
        "num_workers": base.num_workers,
        "device": args.device,
        "quick": args.quick,
    }
    print(f"\n{'placement':<24}{'users/s':>10}{'first round s':>15}{'outside training':>18}")
    for name, value in users_per_s.items():
        first, outside = out["first_round_s"].get(name), out["outside_training_share"].get(name)
        extra = "" if first is None else f"{first:15.2f}{outside:17.0%}"
        print(f"{name:<24}{value:10.0f}{extra}")
    # The two CPU targets, for each vectorized row: (c)/(a) >= 30 and (d)/(c) <= 2
    # (for the full workload only: --quick's small cohort is mostly per-round overhead).
    aim = ("", "") if args.quick else (" (target >= 30x)", " (target <= 2x)")
    for name in ("cohort_vectorized", "cohort_vectorized_bf16"):
        if name not in results:
            continue
        c = users_per_s[name]
        if "device" in results:
            print(f"{name} / device: {c / users_per_s['device']:.1f}x{aim[0]}")
        if "cohort_loop" in results:
            print(f"{name} / loop: {c / users_per_s['cohort_loop']:.1f}x")
        print(f"compute bound / {name}: {bound / c:.2f}x{aim[1]}")
    if vec:
        print(f"start-up to round 1: {out['startup_s']:.1f} s; peak memory per worker: {out['peak_rss_mb']:.0f} MB"
              + (f"; peak GPU memory per worker: {out['peak_gpu_mb']:.0f} MB" if out["peak_gpu_mb"] else ""))
    print(f"fp32 GEMM {out['gemm_gflops']:.0f} GFLOP/s (best of {out['gemm_gflops_samples']}); "
          f"{out['mflops_per_user']:.1f} MFLOP per user's local training")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
