"""How easy is the house to change? The measures issue 26 set targets on, from the source.

    python experiments/code_measures.py                 # this checkout
    python experiments/code_measures.py --tree /other   # another checkout (e.g. before a change)

Prints: the longest function and the longest file in fedrec/; the longest function in
fedrec/run.py and fedrec/train/ (target ≤ 60 lines); the engines' largest parameter count
(target ≤ 8); files in fedrec/ over 450 lines; and how many times fedrec/ reads a
summary.json key by string (`x["epsilon"]`, `x.get("epsilon")`) rather than by attribute.
Six-line duplicated runs are counted by the `duplicates` tool, not here.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The functions that train users: the ones with the long argument lists issue 26 named.
ENGINES = ("train_users_vectorized", "_shared_table_group", "train_users", "train_silo", "fit_sequences",
           "train_cohort", "train_group", "train_shared_table_group")  # fmt: skip
# summary.json's keys: the federated fields, and the other modes' own.
SUMMARY_KEYS = {
    "mode", "dataset", "placement", "base_test", "test", "base_valid", "valid", "best_round", "last_round_test",
    "base_test_ci", "test_ci", "last_round_test_ci", "test_gain_ci", "rounds", "selection", "diagnostic_private_best",
    "epsilon", "delta", "noise_multiplier", "sampling_rate", "clipping_norm", "adapter_dimension", "noise_to_signal",
    "silo_epsilon", "users_trained", "users_per_second", "train_seconds", "ready_seconds", "round1_at",
    "server_started_at", "worker_peak_rss_mb", "wall_seconds", "adapter_bytes", "adapter_parameters",
    "private_users", "test_users", "public_users", "num_items", "results_dir", "communication", "audit",
    "local_test", "local_test_ci", "local_test_gain_ci", "most_popular_test",
}  # fmt: skip


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def span(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def parameters(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs] + ([a.vararg] if a.vararg else []) + ([a.kwarg] if a.kwarg else [])
    return len([n for n in names if n.arg not in ("self", "cls")])


def summary_key_reads(tree: ast.AST) -> int:
    count = 0
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant)):  # fmt: skip
            key = node.args[0].value
        count += isinstance(key, str) and key in SUMMARY_KEYS and isinstance(node, (ast.Subscript, ast.Call)) \
            and _reads_summary(node)
    return count


def _reads_summary(node: ast.AST) -> bool:
    """A read of a summary-like object: its name (or the name it hangs from) says summary,
    or it is one of the short names the readers used for one (s, x, s[0])."""
    target = node.value if isinstance(node, ast.Subscript) else node.func.value
    text = ast.unparse(target)
    return "summary" in text or text in ("s", "x", "s[0]")


def measure(tree_root: Path) -> dict:
    files = sorted((tree_root / "fedrec").rglob("*.py"))
    lengths, longest_fn, scoped, engines, key_reads = {}, ("", 0), ("", 0), ("", 0), 0
    for path in files:
        rel = str(path.relative_to(tree_root))
        text = path.read_text()
        lengths[rel] = len(text.splitlines())
        tree = ast.parse(text)
        key_reads += summary_key_reads(tree)
        for fn in functions(tree):
            name = f"{rel}:{fn.name}"
            if span(fn) > longest_fn[1]:
                longest_fn = (name, span(fn))
            if (rel == "fedrec/run.py" or rel.startswith("fedrec/train/")) and span(fn) > scoped[1]:
                scoped = (name, span(fn))
            if fn.name in ENGINES and parameters(fn) > engines[1]:
                engines = (name, parameters(fn))
    longest_file = max(lengths.items(), key=lambda kv: kv[1])
    return {
        "longest function in fedrec/": longest_fn,
        "longest file in fedrec/": longest_file,
        "longest function in fedrec/run.py and fedrec/train/ (target ≤ 60)": scoped,
        "largest engine parameter count (target ≤ 8)": engines,
        "files in fedrec/ over 450 lines": sorted(f"{k} ({v})" for k, v in lengths.items() if v > 450),
        "summary keys read by string in fedrec/": key_reads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    args = ap.parse_args()
    for name, value in measure(args.tree).items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
