"""Draw docs/architecture.png from the code's real imports and tests/test_layers.py's layers.

    .venv/bin/python docs/architecture_diagram.py

The picture is generated, not drawn by hand, so it cannot drift from the code: the layers
are the ones the layering test enforces, and each arrow between two layers is labelled
with how many imports cross it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_layers import LAYERS, import_graph, layer_of  # noqa: E402

DIGEST_KEY = "fedrec-import-digest"  # a PNG text chunk: tests/test_docs.py compares it with the code

APPS = [("server/ (ServerApp; GridPort = the run's port)", "server"), ("clients/ (ClientApp, device sources)", "clients")]


def layer_map(root: Path = ROOT) -> tuple[dict[int, list[str]], Counter]:
    """Each layer's fedrec modules and the import count between each pair of layers: all the picture shows."""
    graph = import_graph(root, ("fedrec", "clients", "server"))
    members: dict[int, list[str]] = {}
    for mod in graph:
        i = layer_of(mod)
        if i is not None and mod.startswith("fedrec."):
            members.setdefault(i, []).append(mod.removeprefix("fedrec."))
    crossing: Counter = Counter()
    for mod, deps in graph.items():
        src = layer_of(mod)
        for dep in deps:
            dst = layer_of(dep)
            if src is not None and dst is not None and src != dst:
                crossing[(src, dst)] += 1
    return {i: sorted(m) for i, m in members.items()}, crossing


def digest(root: Path = ROOT) -> str:
    """A hash of `layer_map`, stored in the PNG, so a test can tell a stale picture without drawing one."""
    members, crossing = layer_map(root)
    content = {
        "layers": {LAYERS[i][0]: mods for i, mods in sorted(members.items())},
        "crossings": sorted(f"{LAYERS[s][0]} -> {LAYERS[d][0]}: {n}" for (s, d), n in crossing.items()),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def main(out: Path = ROOT / "docs" / "architecture.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    members, crossing = layer_map()

    n = len(LAYERS)
    fig, ax = plt.subplots(figsize=(13, 0.95 * n + 1.5))
    ax.set_xlim(0, 13)
    ax.set_ylim(-0.6, n + 0.3)
    ax.axis("off")
    y_of = {i: n - 1 - i for i in range(n)}  # config on top, as docs/design.md lists the modules
    for i, (name, _prefixes) in enumerate(LAYERS):
        y = y_of[i]
        ax.add_patch(FancyBboxPatch((0.2, y + 0.12), 8.6, 0.7, boxstyle="round,pad=0.02", fc="#eef3fb", ec="#4a6fa5"))
        ax.text(0.35, y + 0.62, name, fontsize=10, weight="bold", va="center")
        mods = sorted(members.get(i, []))
        text = ", ".join(mods)
        if len(text) > 110:
            half = len(mods) // 2
            text = ", ".join(mods[:half]) + ",\n" + ", ".join(mods[half:])
        ax.text(0.35, y + 0.32, text, fontsize=7.5, va="center", family="monospace")
    for (src, dst), count in sorted(crossing.items()):
        if src - dst == 1:  # neighbouring layers: a short arrow on the left edge of the boxes
            ax.add_patch(FancyArrowPatch((8.95, y_of[src] + 0.3), (8.95, y_of[dst] + 0.62), arrowstyle="-|>",
                                         mutation_scale=9, color="#4a6fa5"))  # fmt: skip
            ax.text(9.05, (y_of[src] + y_of[dst]) / 2 + 0.47, str(count), fontsize=7, color="#4a6fa5")
    skips = sum(c for (s, d), c in crossing.items() if s - d > 1)
    ax.text(9.4, n - 0.2, "an arrow is an import: a layer\nimports only the layers above it\n(tests/test_layers.py); numbers:\n"
            f"imports between neighbours;\n{skips} more skip a layer", fontsize=8, va="top")  # fmt: skip
    # The Flower apps sit beside the core: they call into it, it never calls them.
    for k, (label, _pkg) in enumerate(APPS):
        y = n - 3.2 - 1.2 * k
        ax.add_patch(FancyBboxPatch((9.4, y), 3.4, 0.8, boxstyle="round,pad=0.02", fc="#fbf1e6", ec="#b5762c"))
        ax.text(9.5, y + 0.4, label, fontsize=8, va="center", wrap=True)
    ax.annotate("", xy=(8.85, y_of[LAYERS.index(next(l for l in LAYERS if l[0] == "run"))] + 0.45),
                xytext=(9.4, n - 2.8), arrowprops=dict(arrowstyle="-|>", color="#b5762c"))  # fmt: skip
    ax.text(9.4, n - 5.6, "Flower is imported only by\nserver/, clients/ and the entry\npoint fedrec/simulate.py", fontsize=8)
    ax.set_title("fedrec: the module map (generated from the imports)", fontsize=12, loc="left")
    fig.tight_layout()
    fig.savefig(out, dpi=110, metadata={DIGEST_KEY: digest()})
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main())
