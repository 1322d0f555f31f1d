"""Does the signal-to-noise meter's prediction agree with what a privacy sweep measured?

    .venv/bin/python experiments/snr_verdicts.py results/beauty-dp25 [more sweep folders]

For every private run under the folders: the prediction `python -m fedrec.snr` makes for its
plan and ε (the agreed signal measured in the first rounds of the same method's run without
noise, the noise the run's mechanism puts on the sum of its mean updates), and the
measured verdict (keeps a gain: the paired 95% interval of its test NDCG@10 gain over the
base lies above 0). Prints one row per run and how many agree.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.config import FedRecConfig  # noqa: E402
from fedrec.privacy.snr import predicted_run_snr  # noqa: E402
from fedrec.snr import MEASURED_ROUNDS, Plan, noise_on_sum  # noqa: E402


def load(path: Path) -> tuple[FedRecConfig, dict, list[dict]]:
    cfg = FedRecConfig.from_mapping(tomllib.loads((path / "config.toml").read_text()))
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return cfg, json.loads((path / "summary.json").read_text()), rows


def method(cfg: FedRecConfig) -> tuple:
    """What tells the methods apart: everything but the privacy, seed and output."""
    d = cfg.to_dict()
    return tuple(sorted((k, json.dumps(v)) for k, v in d.items() if k not in (
        "target-epsilon", "noise-multiplier", "output-dir", "seed", "max-epsilon")))  # fmt: skip


def main() -> int:
    runs = [load(p.parent) for d in sys.argv[1:] for p in sorted(Path(d).rglob("summary.json"))]
    agreed = {}
    for cfg, _s, rows in runs:
        if not cfg.dp_enabled:
            first = [r["train"]["snr-agreed"] for r in rows[1 : 1 + MEASURED_ROUNDS] if "snr-agreed" in r.get("train", {})]
            agreed[method(cfg)] = sum(first) / len(first)
    lines = ["| method | plan | ε | agreed/C | predicted run SNR | predicted | measured gain [95% CI] | measured | agree |",
             "|---|---|---:|---:|---:|---|---|---|---|"]  # fmt: skip
    hits = total = 0
    for cfg, s, rows in runs:
        if not cfg.dp_enabled or method(cfg) not in agreed:
            continue
        a = agreed[method(cfg)]
        plan = Plan(cfg.sampling, cfg.cohort_size, cfg.num_rounds)
        delta = s["delta"]
        bands = cfg.mf_bands if cfg.mechanism == "banded-mf" else 1
        noise = noise_on_sum(plan, cfg.target_epsilon, s["private_users"], s["adapter_dimension"], delta, bands)
        snr = predicted_run_snr(a, 0.0, s["adapter_dimension"], 1, cfg.num_rounds, noise_on_sum=noise)
        lo, hi = s["test_gain_ci"]["ndcg@10"]
        predicted, measured = snr >= 1, lo > 0
        hits += predicted == measured
        total += 1
        name = "none (LoRA)" if cfg.item_adapter == "none" else cfg.item_adapter
        lines.append(f"| {name} | {plan.name} | {cfg.target_epsilon:g} | {a:.4f} | {snr:.3g} | "
                     f"{'keeps' if predicted else 'loses'} | {s['test']['ndcg@10'] - s['base_test']['ndcg@10']:+.4f} "
                     f"[{lo:+.4f}, {hi:+.4f}] | {'keeps' if measured else 'loses'} | {'yes' if predicted == measured else 'no'} |")  # fmt: skip
    print("\n".join(lines))
    print(f"\nthe prediction agrees with the measured verdict in {hits} of {total} private runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
