"""`python -m fedrec.teacher --config X --out teacher.pt`: the teacher a `dataset=teacher`
population is drawn from (fedrec.model.teacher).

The teacher is the config's `scratch` ceiling (fedrec.centralized): the config's
architecture from random init on the public users and the private users' training
prefixes, early-stopped on private validation NDCG@10. Saved with the real first-item and
length distributions of the private users, the catalogue, and the data file's digest, so
that a population drawn from it keeps the real data's public users and base.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fedrec.cohort import validation_users
from fedrec.config import ConfigError, FedRecConfig, parse_run_config
from fedrec.data import load_interactions, split_users
from fedrec.data.load import check_inputs, source_file
from fedrec.metrics import metric_means
from fedrec.model.base import _content_digest, new_model
from fedrec.model.teacher import real_statistics, save_teacher
from fedrec.train.evaluate import evaluate_users
from fedrec.train.pretrain import Fitting, fit_sequences


def train_teacher(cfg: FedRecConfig, out: Path, epochs: int, log=print) -> dict:
    """Train the scratch ceiling of `cfg`'s real data and save it as a teacher at `out`."""
    if cfg.dataset in ("synthetic", "teacher"):
        raise ConfigError(f"dataset: a teacher learns from a real data file, not dataset={cfg.dataset}")
    started = time.time()
    data_seed = cfg.data_seed_value
    real = load_interactions(cfg)
    log(f"data: {real.describe()}")
    split = split_users(real, cfg.public_fraction, data_seed)
    private = [int(u) for u in split.private]
    valid = [int(u) for u in validation_users(split.private, cfg.eval_users, data_seed)]
    device = torch.device("cpu")
    torch.manual_seed(data_seed)
    model = new_model(cfg, split.num_items)
    seqs = split.public_sequences() + [split.train[u] for u in private]

    def score(users: list[int], which: str) -> float:
        sums = evaluate_users(model, split, users, which, max_seq_len=cfg.max_seq_len, device=device)
        return metric_means(sums)["ndcg@10"]

    log(f"teacher: the scratch ceiling, {len(seqs):,} sequences, Adam lr {cfg.pretrain_learning_rate:g}, "
        f"up to {epochs} epochs, patience {cfg.centralized_patience} on {len(valid):,} validation users")  # fmt: skip
    fit = Fitting(epochs=epochs, lr=cfg.pretrain_learning_rate, batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len,
                  seed=data_seed, device=device, patience=cfg.centralized_patience)  # fmt: skip

    def on_epoch(epoch: int, loss: float, valid_ndcg: float | None) -> None:
        log(f"teacher epoch {epoch:3d}/{epochs} | loss {loss:.4f} | val NDCG@10 {valid_ndcg or 0.0:.4f}")

    best = fit_sequences(model, seqs, list(model.parameters()), fit, validate=lambda: score(valid, "valid"),
                         on_epoch=on_epoch)  # fmt: skip
    model.eval()
    test = score(private, "test")
    stats = real_statistics([split.full_sequence(u) for u in private], split.num_items)
    meta = {"dataset": cfg.dataset, "source": real.source,
            "data_digest": _content_digest(source_file(cfg.dataset, Path(cfg.data_path).expanduser().resolve())),
            "public_fraction": cfg.public_fraction, "data_seed": data_seed, "private_users": len(private),
            "public_users": len(split.public), "best_epoch": best, "test_ndcg10": test,
            "seconds": round(time.time() - started, 1)}  # fmt: skip
    save_teacher(out, model, stats, meta)
    log(f"teacher: epoch {best}, test NDCG@10 {test:.4f} on the {len(private):,} private users; "
        f"repeats in the real data: {'yes' if stats['repeats'] else 'no'}; saved {out} ({meta['seconds']:.0f} s)")  # fmt: skip
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedrec.teacher", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="TOML file (as for fedrec.simulate) naming the real data")
    ap.add_argument("--run-config", default="", help='overrides, e.g. "data-seed=1"')
    ap.add_argument("--out", type=Path, required=True, help="the teacher file to write")
    ap.add_argument("--epochs", type=int, default=0, help="at most this many epochs (default: centralized-epochs)")
    args = ap.parse_args(argv)
    try:
        cfg = FedRecConfig.from_toml(args.config) if args.config else FedRecConfig()
        cfg = FedRecConfig.from_mapping(parse_run_config(args.run_config), cfg)
        check_inputs(cfg)
        train_teacher(cfg, args.out, args.epochs or cfg.centralized_epochs)
    except (ConfigError, ValueError) as e:
        print(f"fedrec.teacher: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from fedrec.interrupt import guarded

    sys.exit(guarded(main))
