"""`mode=centralized`: the ceiling beside every federated number.

Fine-tunes the same base model on the private users' pooled training sequences, once
fully (every weight) and once with the same LoRA adapter, and evaluates both with the
same full-ranking protocol.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console

from fedrec.baselines import MostPopular
from fedrec.config import FedRecConfig
from fedrec.metrics import metric_means
from fedrec.model.base import load_base
from fedrec.model.lora import adapter_bytes, adapter_parameters, adapter_state
from fedrec.report import print_comparison
from fedrec.results import ResultsDir
from fedrec.train import evaluate_users, fit_sequences
from fedrec.workload import load_workload, resolve_device

# LoRA's low-rank factors learn slower than full weights at the same step size; 10x is
# the usual ratio (e.g. the LoRA paper's GPT-2 runs use 2e-4 vs full fine-tuning ~1e-5-1e-4).
LORA_LR_FACTOR = 10.0


def run_centralized(cfg: FedRecConfig, console: Console | None = None) -> dict:
    console = console or Console(soft_wrap=True)
    t0 = time.time()
    out = ResultsDir(cfg.output_dir)
    out.write_config(cfg)
    work = load_workload(cfg, log=console.print)
    data = work.data
    device = resolve_device(cfg.device)
    users = [int(u) for u in data.private]
    seqs = [data.train[u] for u in users]

    def evaluate(model: torch.nn.Module, split: str) -> dict[str, float]:
        return metric_means(evaluate_users(model, data, users, split, max_seq_len=cfg.max_seq_len, device=device))

    def epoch_log(tag: str, model: torch.nn.Module):
        def log(epoch: int, loss: float) -> None:
            row = {"variant": tag, "epoch": epoch, "loss": loss, "valid": evaluate(model, "valid")}
            out.append_metrics(row)
            console.print(f"{tag:>4} epoch {epoch:3d}/{cfg.centralized_epochs} | loss {loss:.4f} | val NDCG@10 {row['valid']['ndcg@10']:.4f}")

        return log

    popular = MostPopular([data.full_sequence(int(u)) for u in data.public] + seqs, data.num_items).to(device)
    popular_test = evaluate(popular, "test")
    lora = work.model(device)
    base_test = evaluate(lora, "test")
    base_valid = evaluate(lora, "valid")
    out.append_metrics({"variant": "base", "epoch": 0, "valid": base_valid})

    full = load_base(cfg, data.num_items, work.base_path).to(device)
    for p in full.parameters():
        p.requires_grad_(True)
    fit_sequences(
        full, seqs, list(full.parameters()), epochs=cfg.centralized_epochs, lr=cfg.pretrain_learning_rate,
        batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len, seed=cfg.seed, device=device,
        on_epoch=epoch_log("full", full),
    )  # fmt: skip
    full_test = evaluate(full, "test")

    fit_sequences(
        lora, seqs, list(adapter_parameters(lora).values()), epochs=cfg.centralized_epochs,
        lr=cfg.pretrain_learning_rate * LORA_LR_FACTOR, batch_size=cfg.batch_size,
        max_seq_len=cfg.max_seq_len, seed=cfg.seed, device=device, on_epoch=epoch_log("lora", lora),
    )  # fmt: skip
    lora_test = evaluate(lora, "test")
    state = adapter_state(lora)
    out.save_adapter(state)
    summary = {
        "mode": "centralized",
        "dataset": work.interactions.describe(),
        "most_popular_test": popular_test,
        "base_test": base_test,
        "base_valid": base_valid,
        "centralized_full_test": full_test,
        "centralized_lora_test": lora_test,
        "epochs": cfg.centralized_epochs,
        "users_trained": len(users) * cfg.centralized_epochs,
        "wall_seconds": round(time.time() - t0, 2),
        "adapter_bytes": adapter_bytes(state),
        "private_users": len(users),
        "results_dir": str(out.path),
    }
    out.write_summary(summary)
    print_comparison(summary, console)
    console.print(f"results: {out.path}")
    return summary
