"""How to train many users' LoRA at once: per-user loop vs torch.func vmap vs stacked batched matmuls.

    .venv/bin/python experiments/bench_vectorize_methods.py [--users 300] [--threads 1]

One local SGD step for the same users of the ML-1M-shaped synthetic workload (3,700
items, length 50, d=64, 2 blocks, LoRA r=8), dropout off so all three compute the same
thing; prints users/s and the largest difference of each method's summed update from
the loop's. `torch.func` is the library route (`vmap(grad(functional_call))` over the
peft model with stacked adapter parameters); it needs a fixed-shape loss, so it scores
every position and masks padding.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fedrec.config import FedRecConfig
from fedrec.model.lora import adapter_state
from fedrec.train.batches import next_item_batch
from fedrec.train.loop import train_users
from fedrec.train.settings import LocalTraining, RoundContext
from fedrec.train.vectorized import train_users_vectorized
from fedrec.workload import prepare_workload


def vmap_step(model, state, data, users, max_len: int, lr: float) -> dict[str, torch.Tensor]:
    # functional_call needs the module's own parameter names (peft keeps ".default." in them)
    names = {n: n.replace(".default", "") for n, p in model.named_parameters() if p.requires_grad}
    inputs, targets = next_item_batch([data.train[u] for u in users], max_len)

    def user_loss(params, x, y):
        hidden = functional_call(model, params, (x[None],))[0]
        ce = F.cross_entropy(model.item_scores(hidden), (y - 1).clamp(min=0), reduction="none")
        keep = (y > 0).to(ce.dtype)
        return (ce * keep).sum() / keep.sum().clamp(min=1)

    stacked = {n: state[k].expand(len(users), *state[k].shape) for n, k in names.items()}
    grads = vmap(grad(user_loss), in_dims=(0, 0, 0))(stacked, inputs, targets)
    return {names[n]: -lr * g.sum(0) for n, g in grads.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = FedRecConfig(synthetic_users=6040, synthetic_items=3700, synthetic_mean_length=165, dropout=0.0,
                       pretrain_epochs=5, local_epochs=1)  # fmt: skip
    work = prepare_workload(cfg, log=print)
    model = work.model().eval()
    state = adapter_state(model)
    users = [int(u) for u in work.data.private[: args.users]]
    args = (LocalTraining(local_epochs=1, learning_rate=0.5, max_seq_len=cfg.max_seq_len, seed=0),
            RoundContext(round=1, clipping_norm=0.0, device=torch.device("cpu")))  # fmt: skip
    runs = {
        "loop (peft model, autograd per user)": lambda: train_users(model, state, work.data, users, *args).delta,
        "torch.func vmap(grad(functional_call))": lambda: vmap_step(model, state, work.data, users, cfg.max_seq_len, 0.5),
        "stacked batched matmuls (fedrec.train.vectorized)": lambda: train_users_vectorized(
            model, state, work.data, users, *args
        ).delta,
    }
    reference = None
    for name, fn in runs.items():
        fn()  # warm-up
        t = time.perf_counter()
        delta = fn()
        seconds = time.perf_counter() - t
        reference = reference or delta
        diff = max(float((delta[k] - reference[k]).abs().max()) for k in reference)
        print(f"{name:<46} {len(users) / seconds:8.0f} users/s   max |Δ - loop| {diff:.1e}")


if __name__ == "__main__":
    main()
