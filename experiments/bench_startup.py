"""Issue-18 benchmark: where the default run's start-up to round 1 goes.

    .venv/bin/python experiments/bench_startup.py [--repeats 3] [--config X.toml] [--run-config "..."]

Runs `python -m fedrec.simulate` on the default config (one round; the base and data
cached by a first, untimed run) and splits the wall time from launching the process to
round 1 by the timestamps the run writes (`summary.json`):
- launch → ServerApp start: the driver's imports, the cached data and base, Ray's start
  and Flower's simulation engine;
- ServerApp start → nodes warm: the workers' processes, their imports, data and model
  (the `identify` message each node answers before round 1);
- nodes warm → round 1: the run's set-up (the noise calibration of a DP run) and the base
  model's evaluation (round 0, timed by the run itself).
`--no-warmup` skips the first run where the data and base are already cached (a long plan's
warm-up is a whole run); `--calibration cold` moves the stored noise calibrations
(`noise-calibrations.json` in the cache folder) aside for each timed run, `warm` lets the
warm-up's be used. Also timed alone, each in a fresh process: the driver's imports (`server.app`,
`flwr.simulation`) and a local `ray.init` with 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.config import merge_run_config  # noqa: E402


def timed(code: str) -> float:
    t = time.time()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return time.time() - t


def one_run(out: Path, run_config: str, config: str = "", aside: Path | None = None) -> dict:
    """`aside`: the stored calibrations, moved away for this run and put back after it."""
    moved = aside.with_name(aside.name + ".bench-aside") if aside is not None else None
    if moved is not None and aside.exists():
        aside.rename(moved)
    launched = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "fedrec.simulate", *(["--config", config] if config else []),
                               "--output-dir", str(out), "--run-config", merge_run_config("num-rounds=1", run_config)],
                              cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    finally:
        if moved is not None and moved.exists():
            moved.replace(aside)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    s = json.loads((out / "summary.json").read_text())
    server = s["server_started_at"] - launched
    warm = server + s["ready_seconds"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"to_server": server, "to_warm": warm, "to_round1": s["round1_at"] - launched,
            "round0_eval": next(r["seconds"] for r in rows if r["round"] == 0),
            "calibration_stored": "an earlier run's" in proc.stdout,
            "whole": time.time() - launched, "worker_peak_rss_mb": s.get("worker_peak_rss_mb"),
            }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config", default="", help="a TOML config under the run-config (e.g. experiments/beauty-dp.toml)")
    ap.add_argument("--run-config", default="")
    ap.add_argument("--no-warmup", action="store_true", help="the data and base are cached: no untimed first run")
    ap.add_argument("--calibration", choices=("cold", "warm"), default="warm",
                    help="cold: every timed run calibrates its noise (the stored calibrations moved aside)")
    args = ap.parse_args()
    from fedrec.model.base import cache_dir
    from fedrec.simulate import build_config

    config_args = ["--config", args.config] if args.config else []
    cfg = build_config([*config_args, "--output-dir", tempfile.gettempdir(), "--run-config", args.run_config])
    aside = cache_dir(cfg) / "noise-calibrations.json" if args.calibration == "cold" else None
    with tempfile.TemporaryDirectory(prefix="fedrec-startup-") as tmp:
        if not args.no_warmup:
            one_run(Path(tmp, "warmup"), args.run_config, args.config)  # pretrains and caches the base (and data)
        runs = [one_run(Path(tmp, f"r{i}"), args.run_config, args.config, aside) for i in range(args.repeats)]
    imports = timed("import server.app, flwr.simulation")
    python = timed("pass")
    ray_init = timed("import ray; ray.init(num_cpus=2, include_dashboard=False, logging_level='ERROR'); ray.shutdown()")

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    rows = [
        ("launch -> ServerApp start (driver imports, data, Ray, Flower)", med("to_server")),
        ("ServerApp start -> nodes warm (workers: processes, imports, data, model)", med("to_warm") - med("to_server")),
        ("nodes warm -> round 1 (set-up and round 0)", med("to_round1") - med("to_warm")),
        ("  of which the base model's evaluation (round 0)", med("round0_eval")),
        ("  of which the run's set-up (noise calibration" + (", stored)" if all(r["calibration_stored"] for r in runs)
                                                             else ")"), med("to_round1") - med("to_warm") - med("round0_eval")),
        ("launch -> round 1", med("to_round1")),
        ("whole run", med("whole")),
        ("a worker's peak RSS, MB (largest)", max(r["worker_peak_rss_mb"] or 0 for r in runs)),
        ("alone: python start", python),
        ("alone: driver imports (server.app, flwr.simulation)", imports),
        ("alone: ray.init + shutdown, 2 CPUs", ray_init),
    ]
    print(f"median of {args.repeats} runs (seconds)")
    for name, value in rows:
        print(f"  {name:<75} {value:6.1f}")
    print(json.dumps({"runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
