"""What encoding a catalogue's texts costs: wall time and peak memory of the first run, and
of the second run, which reads the cache.

    .venv/bin/python experiments/bench_text_encoding.py --config experiments/beauty.toml \
        --run-config "item-encoder=id+text item-adapter=none lora-train=both item-text=../shared/data/amazon-s3rec/Beauty_item2text.json"

Each pass runs in its own process (peak RSS is per process), with an empty cache directory
for the first pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def _one_pass(argv: list[str]) -> dict:
    from fedrec.simulate import build_config
    from fedrec.data.split import split_users
    from fedrec.workload import _load_or_generate, item_text_embeddings

    cfg = build_config(argv)
    data = split_users(_load_or_generate(cfg), cfg.public_fraction, cfg.seed, cfg.cold_items)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak so far: imports and data
    t0 = time.perf_counter()
    emb = item_text_embeddings(cfg, data, log=lambda m: print(m, file=sys.stderr))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"items": int(emb.shape[0]), "dim": int(emb.shape[1]), "seconds": round(seconds, 2),
            "peak_rss_mib": round(peak / 1024, 1), "rss_before_encoding_mib": round(loaded / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-config", default="")
    parser.add_argument("--one-pass", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_pass:
        argv = ["--config", args.config, "--run-config", args.run_config]
        print(json.dumps(_one_pass(argv)))
        return
    with tempfile.TemporaryDirectory() as cache:
        run_config = f"{args.run_config} cache-dir={cache}".strip()
        rows = []
        for label in ("first (encodes)", "second (cache)"):
            out = subprocess.run([sys.executable, __file__, "--config", args.config, "--run-config", run_config,
                                  "--one-pass"], capture_output=True, text=True)  # fmt: skip
            if out.returncode:
                sys.exit(f"{label} pass failed:\n{out.stderr}")
            rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    print("| pass | items | seconds | peak RSS MiB | RSS before encoding MiB |")
    print("|---|---:|---:|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r['items']:,} | {r['seconds']} | {r['peak_rss_mib']} | {r['rss_before_encoding_mib']} |")


if __name__ == "__main__":
    main()
