"""Where a run's gain lives: its test NDCG@10 gain over the base, split by how popular the
test target is, and the size of its item update by the same deciles.

    .venv/bin/python experiments/gain_by_popularity.py RESULTS_DIR [RESULTS_DIR ...]

Items are cut into ten deciles of equal item count by how often they occur in the private
users' training prefixes (decile 10: the most frequent). For each decile: the share of
test targets in it, the base's and the run's NDCG@10 on those users, the gain and its
share of the whole gain, how often public users saw those items, and the mean size of the
run's item update on them (‖ΔE_i‖ for table-like adapters, |s_i| and |b_i| for `affine`).
Each run's adapter is read from its results directory (`adapter.safetensors`, the
result's round) and ranked again on every test user.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedrec.config import FedRecConfig  # noqa: E402
from fedrec.model.lora import load_adapter_state  # noqa: E402
from fedrec.train.evaluate import rank_users  # noqa: E402
from fedrec.workload import prepare_workload  # noqa: E402


def ndcg(ranks: np.ndarray) -> np.ndarray:
    return np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)


def counts(seqs, num_items: int) -> np.ndarray:
    c = np.zeros(num_items + 1)
    for s in seqs:
        np.add.at(c, np.asarray(s, dtype=np.int64), 1)
    return c[1:]


def analyse(path: Path) -> str:
    cfg = FedRecConfig.from_mapping(tomllib.loads((path / "config.toml").read_text()))
    work = prepare_workload(cfg, log=lambda _m: None)
    data, users = work.data, [int(u) for u in work.data.private]
    model = work.model()
    base_ranks, _ = rank_users(model, data, users, "test", max_seq_len=cfg.max_seq_len, device=torch.device("cpu"))
    state = load_file(str(path / "adapter.safetensors"))
    load_adapter_state(model, state)
    ranks, _ = rank_users(model, data, users, "test", max_seq_len=cfg.max_seq_len, device=torch.device("cpu"))
    item = model.get_base_model().item_delta
    size, what = np.zeros(data.num_items), "‖ΔE_i‖"
    if item is not None:
        with torch.no_grad():
            if item.kind == "affine":
                size = (item.per_item(item.scale).abs() + item.per_item(item.bias).abs()).numpy()
                what = "|s_i| + |b_i|"
            elif item.delta() is not None:
                size = item.delta()[1:].norm(dim=1).numpy()
    private = counts([data.train[u] for u in users], data.num_items)
    public = counts(data.public_sequences(), data.num_items)
    order = np.argsort(private, kind="stable")  # least to most frequent
    decile = np.empty(data.num_items, dtype=np.int64)
    decile[order] = np.arange(data.num_items) * 10 // data.num_items
    target_decile = decile[np.array([data.target(u, "test") for u in users]) - 1]
    gain = ndcg(ranks) - ndcg(base_ranks)
    lines = [f"## {path}", "", f"{cfg.item_adapter}, ε target {cfg.target_epsilon or '–'}: test NDCG@10 "
             f"{ndcg(base_ranks).mean():.4f} → {ndcg(ranks).mean():.4f} (gain {gain.mean():+.4f}) on {len(users):,} users",
             "", f"| decile (private popularity) | items' private count | public count | test targets | base NDCG@10 | "
             f"run NDCG@10 | gain | share of the gain | mean {what} |", "|" + "---|" * 9]  # fmt: skip
    for d in range(10):
        mine = target_decile == d
        items = decile == d
        share = gain[mine].sum() / gain.sum() if gain.sum() else float("nan")
        lines.append(f"| {d + 1} | {private[items].min():.0f}–{private[items].max():.0f} | {public[items].mean():.1f} | "
                     f"{mine.mean():.1%} | {ndcg(base_ranks)[mine].mean():.4f} | {ndcg(ranks)[mine].mean():.4f} | "
                     f"{gain[mine].mean():+.4f} | {share:+.0%} | {size[items].mean():.4g} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    args = ap.parse_args()
    for d in args.dirs:
        print(analyse(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
