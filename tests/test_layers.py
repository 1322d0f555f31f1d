"""The architecture, held by parsing imports (docs/architecture.md draws the same layers).

Every import counts, the lazy ones inside functions too: a lazy import still makes the
importer depend on the imported. Data flows down `LAYERS`; a module may import its own
layer or the ones below it, never one above, and nothing may loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the first layer with a prefix that matches it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("process", ("fedrec.interrupt", "fedrec.provenance", "fedrec.progress")),
    ("config", ("fedrec.config_parse", "fedrec.config_sections", "fedrec.config", "fedrec.config_keys")),
    ("data", ("fedrec.data",)),
    ("model", ("fedrec.model", "fedrec.baselines")),
    ("round arithmetic", ("fedrec.metrics", "fedrec.aggregate", "fedrec.local_state", "fedrec.cohort",
                          "fedrec.communication")),
    ("privacy", ("fedrec.privacy",)),
    ("train", ("fedrec.train",)),
    ("workload", ("fedrec.workload",)),
    ("results", ("fedrec.summary", "fedrec.results", "fedrec.report", "fedrec.figures")),
    ("run", ("fedrec.checkpoint", "fedrec.port", "fedrec.callbacks", "fedrec.tracking", "fedrec.finish", "fedrec.run",
             "fedrec.assemble",
             "fedrec.inprocess",
             "fedrec.centralized", "fedrec.local_only", "fedrec.snr", "fedrec.teacher")),
    ("entry point", ("fedrec.simulate",)),
]
ENTRY_POINT = "fedrec.simulate"  # the one core module that starts the Flower apps
OUTSIDE_CORE = ("flwr", "clients", "server")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module `path` imports, absolute; `from a import b` counts a.b where that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base == "__future__":
                continue
            found.add(base)
            for a in node.names:
                candidate = f"{base}.{a.name}"
                if (root / Path(*candidate.split("."))).with_suffix(".py").exists() or (root / Path(*candidate.split("."))).is_dir():
                    found.add(candidate)
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    graph = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            graph[module_name(path, root)] = imports_of(path, root)
    return graph


def layer_of(module: str) -> int | None:
    for i, (_name, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        here = layer_of(mod)
        for dep in deps:
            there = layer_of(dep)
            if here is not None and there is not None and there > here:
                bad.append(f"{mod} ({LAYERS[here][0]}) imports {dep} ({LAYERS[there][0]})")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _core_graph() -> dict[str, set[str]]:
    graph = import_graph(ROOT, ("fedrec",))
    # a package's __init__ is its own module, and importing a submodule runs it: not an edge to count
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def test_every_core_module_has_a_layer():
    assert [m for m in _core_graph() if layer_of(m) is None and m != "fedrec"] == []


def test_imports_point_down_the_layers():
    assert upward_imports(_core_graph()) == []


def test_no_import_cycles():
    graph = _core_graph()
    assert cycles(graph) == []
    apps = import_graph(ROOT, ("clients", "server"))
    assert cycles(apps) == []


def test_the_core_never_imports_flower_or_the_apps():
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in _core_graph().items()
        if mod != ENTRY_POINT
        for dep in deps
        if dep.split(".")[0] in OUTSIDE_CORE
    ]
    assert bad == []


def test_the_adapter_types_import_only_torch():
    assert imports_of(ROOT / "fedrec/model/types.py", ROOT) == {"torch"}


def test_the_clients_do_not_import_the_server():
    bad = [f"{m} imports {d}" for m, deps in import_graph(ROOT, ("clients",)).items() for d in deps if d.split(".")[0] == "server"]
    assert bad == []


@pytest.mark.parametrize("kind", ["upward", "cycle"])
def test_the_checks_fail_on_a_planted_violation(tmp_path, kind):
    """The checks above would see a violation: plant one in a copy of the core and look."""
    import shutil

    shutil.copytree(ROOT / "fedrec", tmp_path / "fedrec", ignore=shutil.ignore_patterns("__pycache__"))
    planted = tmp_path / "fedrec/model/types.py" if kind == "upward" else tmp_path / "fedrec/train/batches.py"
    extra = "import fedrec.run\n" if kind == "upward" else "from fedrec.train.loop import train_users\n"
    planted.write_text(planted.read_text() + extra)
    graph = import_graph(tmp_path, ("fedrec",))
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    if kind == "upward":
        assert upward_imports(graph) == ["fedrec.model.types (model) imports fedrec.run (run)"]
    else:
        assert ["fedrec.train.batches", "fedrec.train.loop"] in cycles(graph)
