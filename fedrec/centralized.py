"""`mode=centralized`: the ceilings every federated number is read against.

Each ceiling trains on pooled data in one process, with the split and the full-ranking
evaluation of the federated run, and stops when validation NDCG@10 has not improved for
`centralized-patience` epochs (keeping the best epoch's weights), so that no ceiling is
cut short or over-trained by a fixed epoch count:

- `scratch`: the same architecture from random init on the public users' data and the
  private users' training prefixes: the bound without privacy and without federation;
- `full`: every weight of the base, fine-tuned on the private users' pooled prefixes;
- `transformer`: every weight of the base but the item table (which stays frozen), on the
  same prefixes: whether any adaptation of the shared, non-item parameters can gain at all,
  the bound for projection LoRA and every other adapter that leaves the items alone;
- `same`: exactly what the federated config trains (its LoRA and item adapter) on the
  same pooled prefixes: what federation and privacy are measured against.

Most-popular and the base are reported beside them. Every test metric carries a 95%
bootstrap interval over test users.
"""

from __future__ import annotations

import time
import numpy as np
import torch
from rich.console import Console

from fedrec.baselines import MostPopular
from fedrec.cohort import validation_users
from fedrec.config import FedRecConfig
from fedrec.metrics import bootstrap_intervals, metric_means
from fedrec.model.base import load_base, new_model
from fedrec.model.lora import adapter_bytes, adapter_parameters, adapter_state
from fedrec.report import print_comparison
from fedrec.results import ResultsDir
from fedrec.train.evaluate import evaluate_users, rank_sums, rank_users
from fedrec.train.pretrain import Fitting, fit_sequences
from fedrec.workload import prepare_workload, resolve_device

CEILING_LABELS = {
    "scratch": "from scratch, public + private data",
    "full": "full fine-tune of the base",
    "transformer": "every non-item weight of the base, item table frozen",
    "same": "the federated config's parameters",
}


def run_centralized(cfg: FedRecConfig, console: Console | None = None) -> dict:
    console = console or Console(soft_wrap=True)
    t0 = time.time()
    out = ResultsDir(cfg.output_dir, overwrite=cfg.overwrite)
    out.write_config(cfg)
    work = prepare_workload(cfg, log=console.print)
    data = work.data
    device = resolve_device(cfg.device)
    users = [int(u) for u in data.private]
    valid_users = [int(u) for u in validation_users(data.private, cfg.eval_users, cfg.data_seed_value)]
    private_seqs = [data.train[u] for u in users]
    summary: dict = {"mode": "centralized", "dataset": work.interactions.describe(), "private_users": len(users),
                     "public_users": len(data.public), "num_items": data.num_items, "validation_users": len(valid_users)}  # fmt: skip
    base_ranks: np.ndarray | None = None

    def test(key: str, model: torch.nn.Module) -> None:
        """Test metrics of `model` under `key`, with intervals and (against the base) paired gains."""
        nonlocal base_ranks
        full, sampled = rank_users(model, data, users, "test", max_seq_len=cfg.max_seq_len, device=device)
        boot = dict(samples=cfg.bootstrap_samples, seed=cfg.seed)
        summary[key] = metric_means(rank_sums(full, sampled))
        summary[f"{key}_ci"] = bootstrap_intervals(full, **boot)
        if base_ranks is None:
            base_ranks = full
        else:
            summary[f"{key}_gain_ci"] = bootstrap_intervals(full, baseline=base_ranks, **boot)

    def valid_ndcg(model: torch.nn.Module) -> float:
        sums = evaluate_users(model, data, valid_users, "valid", max_seq_len=cfg.max_seq_len, device=device)
        return metric_means(sums)["ndcg@10"]

    lora = work.model(device)
    test("base_test", lora)
    summary["base_valid"] = {"ndcg@10": valid_ndcg(lora)}
    out.append_metrics({"variant": "base", "epoch": 0, "valid": summary["base_valid"]})
    popular = MostPopular([data.full_sequence(int(u)) for u in data.public] + private_seqs, data.num_items).to(device)
    test("most_popular_test", popular)

    for name in cfg.ceiling_list():
        t_start = time.time()
        if name == "scratch":
            torch.manual_seed(cfg.seed)
            model = new_model(cfg, data.num_items).to(device)
            model.set_absent(data.cold)
            # Public users as the base saw them, private users' prefixes.
            seqs = data.public_sequences() + private_seqs
            params, lr = list(model.parameters()), cfg.pretrain_learning_rate
        elif name in ("full", "transformer"):
            model = load_base(cfg, data.num_items, work.base_path).to(device)
            model.set_absent(data.cold)
            for key, p in model.named_parameters():
                p.requires_grad_(name == "full" or not key.startswith("item_emb"))
            # `full` trains as pretraining did; `transformer`, an adaptation of shared weights as
            # LoRA's, at the adapters' `centralized-learning-rate`
            lr = cfg.pretrain_learning_rate if name == "full" else cfg.centralized_learning_rate
            seqs, params = private_seqs, [p for p in model.parameters() if p.requires_grad]
        else:
            model, seqs, lr = lora, private_seqs, cfg.centralized_learning_rate
            params = list(adapter_parameters(model).values())
        console.print(f"ceiling {name} ({CEILING_LABELS[name]}): {sum(p.numel() for p in params):,} parameters, "
                      f"{len(seqs):,} sequences, Adam lr {lr:g}, up to {cfg.centralized_epochs} epochs, "
                      f"patience {cfg.centralized_patience}")  # fmt: skip
        fit = Fitting(epochs=cfg.centralized_epochs, lr=lr, batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len,
                      seed=cfg.seed, device=device, patience=cfg.centralized_patience)  # fmt: skip
        best = fit_sequences(model, seqs, params, fit, validate=lambda: valid_ndcg(model),
                             on_epoch=_epoch_log(console, name, cfg.centralized_epochs, out))  # fmt: skip
        summary[f"ceiling_{name}_epoch"] = best
        summary[f"ceiling_{name}_seconds"] = round(time.time() - t_start, 1)
        test(f"ceiling_{name}_test", model)
        console.print(f"ceiling {name}: best validation epoch {best}, test NDCG@10 "
                      f"{summary[f'ceiling_{name}_test']['ndcg@10']:.4f}")  # fmt: skip
        if name == "same":
            state = adapter_state(model)
            out.save_adapter(state)
            summary["adapter_bytes"] = adapter_bytes(state)
            summary["adapter_dimension"] = sum(p.numel() for p in params)
    summary |= {"wall_seconds": round(time.time() - t0, 2), "results_dir": str(out.path)}
    out.write_summary(summary)
    out.release()
    print_comparison(summary, console)
    console.print(f"results: {out.path}")
    return summary


def _epoch_log(console: Console, name: str, epochs: int, out: ResultsDir):
    def log(epoch: int, loss: float, score: float | None) -> None:
        out.append_metrics({"variant": name, "epoch": epoch, "loss": loss, "valid": {"ndcg@10": score}})
        console.print(f"{name:>7} epoch {epoch:3d}/{epochs} | loss {loss:.4f} | val NDCG@10 {score:.4f}")

    return log
