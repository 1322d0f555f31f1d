"""`python -m fedrec.snr --config X`: will a private run keep its gain? Measured before it is paid for.

Runs a few rounds of the config without noise (its adapter, cohort and clip C, in this
process), reads the signal-to-noise meter's `agreed`: ‖E[clip(Δ_u)]‖/C, what the users'
clipped updates share (`fedrec.privacy.snr`). Then, for each ε and each plan (how users
take part, how many per round, how many rounds), it prints the ratio a run would reach
between the signal summed over its rounds (T·agreed, if the direction persisted) and the
noise the mechanism would put on the sum of its mean updates. Above 1 the plan is
predicted to keep a gain; below, the noise wins. The direction does not persist as the
model learns, so the ratio is an upper estimate of what a plan can keep.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import numpy as np

from fedrec.config import ConfigError, FedRecConfig, parse_run_config
from fedrec.data.load import check_inputs
from fedrec.privacy.snr import predicted_run_snr

DEFAULT_PLANS = "config,poisson:1000x100,poisson:4000x25,all:x20,cyclic:1000x100"
MEASURED_ROUNDS = 3  # rounds without noise whose agreed signal the prediction uses


@dataclass(frozen=True)
class Plan:
    """How users take part: `poisson` (m expected per round), `all` (every user every round)
    or `cyclic` (N // m groups in turn, banded correlated noise); T rounds."""

    sampling: str
    users: int  # m (poisson, cyclic); ignored for all
    rounds: int

    @property
    def name(self) -> str:
        return f"{self.sampling} m={self.users:,} T={self.rounds}" if self.sampling != "all" else f"all T={self.rounds}"

    @classmethod
    def parse(cls, text: str, cfg: FedRecConfig) -> Plan:
        """`poisson:1000x100`, `all:x20`, `cyclic:1000x100` or `config` (the config's own)."""
        if text == "config":
            sampling = cfg.sampling if cfg.sampling != "fixed" else "poisson"
            return cls(sampling, cfg.cohort_size, cfg.num_rounds)
        try:
            sampling, rest = text.split(":")
            users, rounds = rest.split("x")
            plan = cls(sampling, int(users or 0), int(rounds))
        except ValueError:
            raise ConfigError(f"--plans: '{text}' is not SAMPLING:MxT (e.g. poisson:1000x100, all:x20)") from None
        if sampling not in ("poisson", "all", "cyclic") or plan.rounds < 1 or (sampling != "all" and plan.users < 1):
            raise ConfigError(f"--plans: '{text}': sampling is poisson, all or cyclic, with m >= 1 and T >= 1")
        return plan


def noise_on_sum(plan: Plan, epsilon: float, population: int, dimension: int, delta: float, bands: int) -> float:
    """The noise norm on the sum of a plan's T mean updates at ε, in units of C."""
    from fedrec.privacy import factorization as mf
    from fedrec.privacy.accountant import calibrate_gaussian, calibrate_noise, make_accountant

    if plan.sampling == "poisson":
        m = min(plan.users, population)
        z = calibrate_noise(epsilon, plan.rounds, lambda: make_accountant("pld", "poisson", population, delta),
                            m / population, m)  # fmt: skip
        return z * math.sqrt(dimension * plan.rounds) / m
    groups = 1 if plan.sampling == "all" else max(1, population // plan.users)
    kind = "all" if plan.sampling == "all" else "cyclic"
    c = mf.optimal_bands(plan.rounds, bands if kind == "cyclic" else 1, kind, groups)
    z = calibrate_gaussian(epsilon, delta)
    per_round = population / groups
    return z * mf.sensitivity(c, plan.rounds, kind, groups) * mf.prefix_noise(c, plan.rounds)[-1] * math.sqrt(dimension) / per_round


def measure(cfg: FedRecConfig, rounds: int, log=print) -> tuple[list[float], int, int]:
    """(agreed/C per round, d, N) from `rounds` rounds of `cfg` without noise."""
    from fedrec.inprocess import InProcessPort
    from fedrec.run import FederatedRun
    from fedrec.workload import describe_adapter, prepare_workload

    work = prepare_workload(cfg, log=log)
    port = InProcessPort(cfg, work)
    info = describe_adapter(cfg, port.model, work.item_side, log=log)
    run = FederatedRun(cfg, info.initial, work.data.private, dimension=info.dimension, log=lambda _m: None,
                       sent_keys=info.sent)  # fmt: skip
    agreed = []
    for rnd in range(1, rounds + 1):
        row = run.train_round(port, rnd)
        if "snr-agreed" not in row:
            raise ConfigError("the meter needs each user's squared norm: it is unknown under secure-aggregation")
        agreed.append(row["snr-agreed"])
        log(f"round {rnd}/{rounds}: {int(row['users'])} users, ‖mean‖/C {row['snr-mean-norm']:.4f} "
            f"(1/√m {row['users'] ** -0.5:.4f}), agreed/C {row['snr-agreed']:.4f}")  # fmt: skip
    return agreed, info.dimension, len(work.data.private)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedrec.snr", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="TOML file (as for fedrec.simulate)")
    ap.add_argument("--run-config", default="", help='overrides, e.g. "item-adapter=table clipping-norm=5"')
    ap.add_argument("--rounds", type=int, default=MEASURED_ROUNDS,
                    help=f"rounds measured without noise (default {MEASURED_ROUNDS})")
    ap.add_argument("--epsilons", default="8,4,2,1", help="ε values to predict for (default 8,4,2,1)")
    ap.add_argument("--plans", default=DEFAULT_PLANS,
                    help=f"comma-separated plans SAMPLING:MxT, or config (default {DEFAULT_PLANS})")
    args = ap.parse_args(argv)
    try:
        cfg = FedRecConfig.from_toml(args.config) if args.config else FedRecConfig()
        cfg = FedRecConfig.from_mapping(parse_run_config(args.run_config), cfg)
        check_inputs(cfg)
        if cfg.clipping_norm <= 0:
            raise ConfigError("clipping-norm: the meter measures in units of the clip; set clipping-norm > 0")
        if args.rounds < 1:
            raise ConfigError("--rounds: at least 1")
        epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
        if not epsilons or min(epsilons) <= 0:
            raise ConfigError("--epsilons: positive numbers, e.g. 8,4,2,1")
        plans = [Plan.parse(p.strip(), cfg) for p in args.plans.split(",") if p.strip()]
        # The measured rounds: the config's cohort and clip, no noise, no evaluation.
        probe = cfg.replace(noise_multiplier=0.0, target_epsilon=0.0, num_rounds=args.rounds, audit_canaries=0, model_selection="auto",
                            sampling="poisson" if cfg.sampling in ("all", "cyclic") else cfg.sampling)  # fmt: skip
    except (ConfigError, ValueError) as err:
        print(f"fedrec.snr: {err}", file=sys.stderr)
        return 2
    agreed_rounds, dimension, population = measure(probe, args.rounds)
    agreed = float(np.mean(agreed_rounds))
    from fedrec.run import run_delta

    delta = run_delta(cfg, population)
    print(f"\nagreed signal {agreed:.4f}·C per round (mean of {args.rounds} rounds without noise), d = {dimension:,}, "
          f"N = {population:,}, δ = {delta:.3g}; predicted ratio of the run's summed signal to the noise on it "
          "(> 1: keeps a gain):")  # fmt: skip
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("plan")
    for eps in epsilons:
        table.add_column(f"ε = {eps:g}", justify="right")
    for plan in plans:
        cells = []
        for eps in epsilons:
            noise = noise_on_sum(plan, eps, population, dimension, delta, cfg.mf_bands)
            snr = predicted_run_snr(agreed, 0.0, dimension, 1, plan.rounds, noise_on_sum=noise)
            cells.append(f"{snr:.2f} " + ("keeps" if snr >= 1 else "loses"))
        table.add_row(plan.name, *cells)
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
