"""`python -m fedrec.simulate`: config → Flower simulation (or centralized baseline) → results dir.

The only module of `fedrec` that starts Flower. Config errors are reported in one line
before anything is loaded or trained.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import sys
import threading
import warnings
from pathlib import Path

from fedrec import interrupt
from fedrec.config import ConfigError, FedRecConfig, parse_run_config
from fedrec.data import load_interactions
from fedrec.data.split import public_count
from fedrec.data.interactions import DataError
from fedrec.data.load import check_inputs, check_item_files
from fedrec.results import check_output_dir, default_output_dir, lock_folder, unlock_folders
from fedrec.summary import RunSummary

# Otherwise glibc hands the large logits buffer back to the OS after every step and maps
# it afresh on the next, a large slowdown on CPU
# (experiments/README.md#malloc-thresholds); Ray workers inherit these from this
# process.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedrec.simulate", description=__doc__.splitlines()[0],
        epilog="Every config key, with its default and allowed values: python -m fedrec.simulate --keys "
        "(described in docs/configuration.md).",
    )  # fmt: skip
    parser.add_argument("--keys", action="store_true", help="list every config key with its default and allowed values, and exit")
    parser.add_argument("--config", help="TOML file with kebab-case keys (top level or [tool.flwr.app.config])")
    parser.add_argument("--run-config", default="", help='overrides, e.g. "num-rounds=10 dataset=movielens"')
    parser.add_argument("--output-dir", help="results directory (default results/<time>-<mode>)")
    parser.add_argument(
        "--sweep", default="",
        help='a grid of runs, e.g. "target-epsilon=1,4,8 lora-train=both,b-only": one results directory per '
        "point under --output-dir, a table of them at the end; cohort runs share one simulation",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", default="",
        help='repeat every point of --sweep (or the one run) with each seed, e.g. "0,1,2"; the table and '
        "the report (python -m fedrec.report) show mean ± std over seeds",
    )  # fmt: skip
    parser.add_argument(
        "--ray-address", metavar="HOST:PORT",
        help="run on an existing Ray cluster (`ray start --head` prints its address) instead of a local one; "
        "the same as --run-config ray-address=HOST:PORT",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace another run's files in --output-dir (without it such a folder is refused); "
        "the same as --run-config overwrite=true",
    )  # fmt: skip
    parser.add_argument(
        "--resume", metavar="DIR",
        help="continue the run in results folder DIR from its last checkpoint, with its stored config; "
        '--run-config may extend it, e.g. "num-rounds=100 max-epsilon=8"',
    )  # fmt: skip
    return parser


def build_config(argv: list[str] | None = None) -> FedRecConfig:
    return _config_from(_parser().parse_args(argv))


def _config_from(args: argparse.Namespace) -> FedRecConfig:
    if args.resume:
        return _resume_config(args)
    cfg = FedRecConfig()
    if args.config:
        cfg = FedRecConfig.from_toml(args.config, cfg)
    cfg = FedRecConfig.from_mapping(parse_run_config(args.run_config), cfg)
    if args.output_dir:
        cfg = cfg.replace(output_dir=args.output_dir)
    if args.ray_address:
        cfg = cfg.replace(ray_address=args.ray_address)
    if args.overwrite:
        cfg = cfg.replace(overwrite=True)
    if not cfg.output_dir:
        cfg = cfg.replace(output_dir=default_output_dir(cfg.mode))
    # Ray workers may start elsewhere: every path they read must be absolute.
    absolute = {"output_dir": str(Path(cfg.output_dir).resolve())}
    if cfg.data_path:
        absolute["data_path"] = str(Path(cfg.data_path).expanduser().resolve())
    if cfg.cache_dir:
        absolute["cache_dir"] = str(Path(cfg.cache_dir).expanduser().resolve())
    if cfg.item_features:
        absolute["item_features"] = str(Path(cfg.item_features).expanduser().resolve())
    return cfg.replace(**absolute)


def _resume_config(args: argparse.Namespace) -> FedRecConfig:
    """The stored config of the run in `--resume DIR`, with the changes a resumed run may make."""
    from fedrec.checkpoint import load, resume_config

    if args.config or args.sweep or args.output_dir or args.overwrite:
        raise ConfigError("--resume: the run keeps its stored config and folder; give changes with --run-config")
    state, stored, folder = load(args.resume)
    given = FedRecConfig.from_mapping(parse_run_config(args.run_config), stored)
    done = int(state["round"])
    if given.num_rounds < done:
        raise ConfigError(f"num-rounds={given.num_rounds}: the checkpoint has already run {done} rounds; "
                          f"give num-rounds={done} or more")  # fmt: skip
    # The run continues where its folder is now (moved or copied), never at the path it was written from.
    here = folder.resolve().parent
    return resume_config(stored, given.replace(output_dir=str(here))).replace(resume_from=str(folder.resolve()))


MIN_PRIVATE_USERS = 2  # fewer, and federated averaging is one user's own training


def check_population(cfg: FedRecConfig, users: int) -> None:
    """Enough users on both sides of the public/private split, said with the numbers."""
    private = users - public_count(users, cfg.public_fraction) if users >= 2 else 0
    if private < MIN_PRIVATE_USERS:
        raise ConfigError(f"public-fraction: {cfg.public_fraction} of {users:,} users leaves {private} private user(s); "
                          f"a run needs at least {MIN_PRIVATE_USERS} private users and 1 public user to pretrain on")


def check_data(cfg: FedRecConfig) -> None:
    """Parse the data files before Ray starts (the run takes the same parse): a malformed
    file, too few users or a bad item file is one line here. A teacher population is
    checked on the real file its teacher was trained on (its public users and catalogue)."""
    if cfg.dataset == "teacher":
        from fedrec.model.teacher import real_data_config  # torch: only where a teacher is named

        real = real_data_config(cfg)
    else:
        real = cfg
    interactions = load_interactions(real) if real.dataset != "synthetic" or cfg.item_features else None
    check_population(cfg, cfg.synthetic_users if interactions is None else interactions.num_users)
    if cfg.dataset == "teacher" and 0 < cfg.teacher_users < MIN_PRIVATE_USERS:  # 0: as many as the real file has
        raise ConfigError(f"teacher-users: {cfg.teacher_users} drawn user(s) would be the run's private users; "
                          f"a run needs at least {MIN_PRIVATE_USERS} (0 draws as many as {real.data_path} has)")  # fmt: skip
    if interactions is not None or cfg.item_text:
        check_item_files(cfg, (interactions or load_interactions(real)).item_ids)


def check_resources(cfg: FedRecConfig, log=print) -> None:
    """Refuse, before anything loads, the worker resources Ray could not place here.

    Flower's simulation would log "ActorPool is empty" and then hang instead of exiting
    (seen with client-num-gpus=0.5 on a machine without a GPU: Flower 1.41, Ray 2.55).
    Ray also hides the GPU from a worker that reserves none (CUDA_VISIBLE_DEVICES="",
    seen too), so device=cuda needs client-num-gpus.
    """
    if cfg.mode in ("centralized", "local"):
        return  # no simulation: trains in this process
    if cfg.private_users == "enrolled":
        raise ConfigError("private-users: enrolled devices join a deployment (`flwr run` against SuperNodes with "
                          "data-path, e.g. server.local_federation --enroll); a simulation's devices hold the data "
                          "file's own private users: use private-users=data")  # fmt: skip
    if cfg.ray_address:
        if cfg.placement != "cohort":
            raise ConfigError("ray-address: a Ray cluster runs placement=cohort (device placement is one node per user)")
        return  # the cluster's nodes have their own cores and GPUs; Ray places the workers there
    cores = len(os.sched_getaffinity(0))
    if cfg.client_num_cpus > cores:
        raise ConfigError(f"client-num-cpus={cfg.client_num_cpus:g}: this machine has {cores} CPU cores for the workers")
    if cfg.device == "cpu" and cfg.client_num_gpus == 0:
        return
    import torch

    gpus = torch.cuda.device_count()
    if cfg.device == "cuda" and not gpus:
        raise ConfigError("device=cuda but torch sees no CUDA device")
    if cfg.client_num_gpus > gpus:
        raise ConfigError(f"client-num-gpus={cfg.client_num_gpus:g}: torch sees {gpus} CUDA device(s) here, "
                          "so Ray could not place a single worker")  # fmt: skip
    if cfg.device == "cuda" and cfg.client_num_gpus == 0:
        raise ConfigError("device=cuda: set client-num-gpus (e.g. 0.5 puts two workers on one GPU); "
                          "Ray hides the GPU from simulated workers that reserve none")  # fmt: skip
    if cfg.device == "auto" and gpus and cfg.client_num_gpus == 0:
        log("device=auto: the workers reserve no GPU (client-num-gpus=0), so Ray hides it and they train on the CPU")


def run(cfg: FedRecConfig) -> RunSummary:
    """Run one experiment in this process and return its summary."""
    return run_many([cfg])[0]


# The knobs that shape a simulation's federation: runs that agree on them can share one.
FEDERATION_KEYS = ("placement", "num-workers", "client-num-cpus", "client-num-gpus", "ray-address")


def run_many(cfgs: list[FedRecConfig]) -> list[RunSummary]:
    """Run several experiments and return their summaries, in order.

    Cohort-placement runs that agree on FEDERATION_KEYS run one after another inside one
    Flower simulation: Ray, the workers' imports and data, and the shutdown are paid
    once per group instead of once per run: together they are most of a default run's wall
    time (experiments/README.md#shared-simulation). Each run is still a whole run with its own results directory and the same results as on
    its own (tests/integration/test_simulation.py).
    """
    dirs = [c.output_dir for c in cfgs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError("run_many: every run needs its own output-dir")
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cfgs):
        alone = c.mode in ("centralized", "local") or c.placement != "cohort"
        groups.setdefault(f"alone-{i}" if alone else c.fingerprint(*FEDERATION_KEYS), []).append(i)
    for members in groups.values():
        interrupt.check("before the next run")
        first = cfgs[members[0]]
        if first.mode == "centralized":
            from fedrec.centralized import run_centralized

            run_centralized(first)
        elif first.mode == "local":
            from fedrec.local_only import run_local

            run_local(first)
        else:
            launch([cfgs[i] for i in members])
    summaries = []
    for c in cfgs:
        path = Path(c.output_dir) / "summary.json"
        if not path.exists():
            raise RuntimeError(f"{c.output_dir}: the run ended without a summary; see the Flower log above")
        summaries.append(RunSummary.from_dict(json.loads(path.read_text())))
    return summaries


def launch(cfgs: FedRecConfig | list[FedRecConfig], server_app=None, client_app=None) -> None:
    """Pretrain the bases if needed, then run one Flower simulation of `cfgs` to its end.

    Several configs run one after another in that simulation; they must agree on
    FEDERATION_KEYS. `server_app` defaults to fedrec's ServerApp; benchmarks pass their
    own main that drives the same Strategy and ClientApp, tests a ClientApp with faults
    injected by a mod (`client_app`).
    """
    cfgs = [cfgs] if isinstance(cfgs, FedRecConfig) else list(cfgs)
    if len({c.fingerprint(*FEDERATION_KEYS) for c in cfgs}) > 1:
        raise ConfigError(f"one simulation runs only configs that agree on {', '.join(FEDERATION_KEYS)}")
    if len(cfgs) > 1 and cfgs[0].placement != "cohort":
        raise ConfigError("several runs share one simulation only with placement=cohort")
    cfg = cfgs[0]
    check_resources(cfg)
    for k, v in _MALLOC_ENV.items():
        os.environ.setdefault(k, v)
    init_args = {"logging_level": logging.ERROR, "log_to_driver": False} | (
        {"address": cfg.ray_address} if cfg.ray_address else {}
    )
    ray_start = _RayStart(init_args)  # Ray starts while this process imports torch, peft and Flower
    try:
        _simulate(cfgs, server_app, client_app, ray_start)
    finally:
        ray_start.close()


def _simulate(cfgs: list[FedRecConfig], server_app, client_app, ray_start: _RayStart) -> None:
    cfg = cfgs[0]
    from flwr.simulation import run_simulation

    from clients.app import app as default_client_app
    from clients.engine_poll import poll_messages_faster
    from server.app import ENV_OVERRIDES
    from server.app import app as default_server_app

    # The base model is pretrained here, before Flower creates any worker, so that none races it.
    from fedrec.workload import prepare_workload

    works = [prepare_workload(c, log=print) for c in cfgs]
    for w in works:  # the item adapter's public inputs: a bad features file stops here, in one line
        w.item_side
    work = works[0]
    os.environ[ENV_OVERRIDES] = json.dumps(cfg.to_dict() if len(cfgs) == 1 else [c.to_dict() for c in cfgs])
    num_nodes = cfg.num_workers if cfg.placement == "cohort" else len(work.data.private)
    poll_messages_faster()  # the 5 ms poll, applied only to simulations of few nodes
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _RunSimulationNotice) for f in flwr_log.filters):
        flwr_log.addFilter(_RunSimulationNotice())
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    ray_start.wait()  # Flower's Ray backend finds Ray running and uses it
    interrupt.reclaim()  # SIGTERM is fedrec's again (fedrec.interrupt)
    run_simulation(
        server_app=server_app or default_server_app,
        client_app=client_app or default_client_app,
        num_supernodes=num_nodes,
        backend_config={
            # Ray starts a worker process again when one dies; the strategy re-sends its users.
            "client_resources": {"num_cpus": cfg.client_num_cpus, "num_gpus": cfg.client_num_gpus, "max_restarts": -1},
            "init_args": ray_start.init_args,
        },
    )
    interrupt.raise_handed_over()  # the ServerApp stopped on a signal; the simulation has ended


class _RunSimulationNotice(logging.Filter):
    """Drops Flower's "`run_simulation` is deprecated" warning, printed by every run: fedrec
    calls it on purpose (one process, Ray started early, several runs per simulation), and
    its replacement `flwr run` is the deployment path (docs/deployment.md); other warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.args and "run_simulation" in str(record.args[0]) and "DEPRECATED" in str(record.msg))


class _RayStart:
    """`ray.init` in a thread, started before this process's imports instead of after them.

    Ray's start (~5-7 s here) is mostly waiting on the processes it spawns, so it overlaps
    the driver's imports of torch, peft and Flower (experiments/README.md#startup).
    It does what Flower's Ray backend would do (`init_args`, the driver's sys.path as
    the workers' PYTHONPATH, no dashboard), so that backend finds Ray running and uses it.
    The thread stays alive until `close`: Ray's processes are bound to the thread that
    started them and die with it (Linux's parent-death signal is per thread).
    """

    def __init__(self, init_args: dict) -> None:
        self.init_args = init_args
        self._ready, self._release = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fedrec-ray-start", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            import ray

            pythonpath = os.pathsep.join(sys.path + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
            os.environ["PYTHONPATH"] = pythonpath
            # Ray 2.55 warns at every init about a future change for workers that reserve no
            # GPU; fedrec relies on today's behaviour (check_resources) and says so there.
            warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False, **self.init_args)
        except BaseException as e:  # raised in the main thread by wait()
            self._error = e
        finally:
            self._ready.set()
        self._release.wait()

    def wait(self) -> None:
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._ready.wait()
        import ray

        if ray.is_initialized():  # Flower's backend shuts Ray down at a normal end; not after an error
            ray.shutdown()
        self._release.set()
        self._thread.join()


def sweep_configs(base: FedRecConfig, spec: str) -> list[tuple[dict, FedRecConfig]]:
    """The grid `key=v1,v2 key2=a,b` over `base`: (the point's values, its config), one
    results directory per point under base's output directory."""
    axes: list[tuple[str, list[str]]] = []
    for item in spec.split():
        key, _, values = item.partition("=")
        if not values:
            raise ConfigError(f"{item}: expected key=v1,v2,... in --sweep")
        if key == "lora-targets":
            raise ConfigError("lora-targets: its values hold commas; sweep it with fedrec.simulate.run_many")
        if key in ("output-dir", *(k for k, _ in axes)):
            raise ConfigError(f"--sweep: {key} cannot be swept" if key == "output-dir" else f"--sweep: {key} given twice")
        axes.append((key, values.split(",")))
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        point = parse_run_config(" ".join(f"{k}={v}" for (k, _), v in zip(axes, combo)))
        name = ",".join(f"{k}={v}" for (k, _), v in zip(axes, combo))
        points.append((point, FedRecConfig.from_mapping(point, base).replace(output_dir=str(Path(base.output_dir) / name))))
    return points


def main(argv: list[str] | None = None) -> int:
    """The command line; Ctrl-C and SIGTERM stop it cleanly (fedrec.interrupt)."""
    try:
        return interrupt.guarded(lambda: _main(argv))
    except BrokenPipeError:  # the reader of the output went away (`--keys | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush finds a sink
        return 0
    finally:
        unlock_folders()


def _main(argv: list[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.keys:
            from fedrec.config_keys import keys_text

            print(keys_text())
            return 0
        cfg = _config_from(args)
        spec = args.sweep
        if args.seeds:
            if "seed=" in f" {spec}":
                raise ConfigError("--seeds: the sweep already varies seed; give one or the other")
            spec = f"{spec} seed={args.seeds}".strip()
        points = sweep_configs(cfg, spec) if spec else []
        for c in [c for _, c in points] or [cfg]:
            if not c.resume_from:  # a folder of its own (a resumed run continues in its own)
                check_output_dir(c.output_dir, c.overwrite)
            check_inputs(c)  # the files and packages it names, here, before anything starts
            check_resources(c, log=lambda _m: None)  # launch() says the note once, beside the run
            # Data files are parsed before Ray starts (the run takes the same parse).
            check_data(c)
        for c in [c for _, c in points] or [cfg]:
            # Held from here to the end, and checked again under the lock: a run started at the
            # same moment is refused here in one line, before Ray or Flower start.
            lock_folder(c.output_dir)
            if not c.resume_from:
                check_output_dir(c.output_dir, c.overwrite)
    except ConfigError as e:
        print(f"fedrec: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"fedrec: data error: {e}", file=sys.stderr)
        return 2
    try:
        if not points:
            run(cfg)
            return 0
        summaries = run_many([c for _, c in points])
    except DataError as e:
        print(f"fedrec: data error: {e}", file=sys.stderr)
        return 2
    except interrupt.Interrupted as stop:
        if points:  # which points of the sweep are whole, and that the rest never started
            done = [c.output_dir for _, c in points if (Path(c.output_dir) / "summary.json").exists()]
            stop.message += (f"\nfedrec: the sweep stopped: {len(done)} of {len(points)} runs had finished; "
                             "the others are incomplete or never started")  # fmt: skip
        raise
    from fedrec.report import write_report, write_sweep_table

    write_sweep_table([p for p, _ in points], summaries, Path(cfg.output_dir))
    print(f"report: {write_report([Path(cfg.output_dir)], Path(cfg.output_dir))}")
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written by now; the interpreter's last garbage collection over torch's,
    # Ray's and Flower's objects was a noticeable share of every run's exit, so it skips them
    # (experiments/README.md#shared-simulation).
    gc.freeze()
    sys.exit(code)
