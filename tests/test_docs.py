"""The documents stay true to the code: citations resolve, the picture matches the imports.

Code comments cite the numbers behind a choice by `<file>.md#<anchor>`. A heading can be
reworded at any time, so a citation must name an anchor (an explicit `<a id="...">` or a
heading's slug) and this test resolves every one; a section cited by its quoted title
would break silently, so that form fails here.
"""

from __future__ import annotations

import importlib.util
import re
import struct
import tomllib
import unicodedata
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("fedrec", "clients", "server", "experiments", "tests", "docs")
SCANNED_SUFFIXES = {".py", ".toml", ".md"}

CITATION = re.compile(r"(?<![\w/.:-])((?:\.\./|[\w.-]+/)*[\w.-]+\.md)#([\w-]+)")
# `section "Title"`, or `README.md, "Title"`: a section named by its words, across line breaks
# and comment markers
QUOTED_SECTION = re.compile(r"(?:\bsection\s+|\.md,\s*)(?:#\s*)?[\"“]")


def scanned_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", root / "pyproject.toml"]
    for d in SCANNED_DIRS:
        files += [p for p in sorted((root / d).rglob("*")) if p.suffix in SCANNED_SUFFIXES and p.is_file()]
    return [f for f in files if f.exists() and f.resolve() != Path(__file__).resolve() and "__pycache__" not in f.parts]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = md.read_text()
    found = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    seen: dict[str, int] = {}
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return found


def broken_citations(root: Path = ROOT) -> list[str]:
    bad = []
    cache: dict[Path, set[str]] = {}
    for f in scanned_files(root):
        text = f.read_text()
        where = f.relative_to(root)
        for m in CITATION.finditer(text):
            name, anchor = m.group(1), m.group(2)
            line = text.count("\n", 0, m.start()) + 1
            candidates = [(f.parent / name).resolve(), (root / name).resolve()]
            target = next((c for c in candidates if c.is_file()), None)
            if target is None:
                bad.append(f"{where}:{line}: {name}#{anchor}: no such file")
                continue
            if target not in cache:
                cache[target] = anchors(target)
            if anchor not in cache[target]:
                bad.append(f"{where}:{line}: {name}#{anchor}: no such anchor in {target.relative_to(root)}")
        for m in QUOTED_SECTION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            bad.append(f"{where}:{line}: a section cited by its quoted title; cite <file>.md#<anchor> instead")
    return bad


def test_every_citation_names_an_anchor_that_exists():
    assert broken_citations() == []


def test_the_citation_check_sees_a_broken_one(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "fedrec").mkdir()
    (tmp_path / "docs/notes.md").write_text('<a id="kept"></a>\n## Where start-up goes\n## Where start-up goes\n')
    (tmp_path / "fedrec/a.py").write_text(
        "# docs/notes.md#kept docs/notes.md#where-start-up-goes docs/notes.md#where-start-up-goes-1\n"
        "# docs/notes.md#gone\n# (docs/notes.md, section\n# \"Where start-up goes\")\n"
    )
    assert broken_citations(tmp_path) == [
        "fedrec/a.py:2: docs/notes.md#gone: no such anchor in docs/notes.md",
        "fedrec/a.py:3: a section cited by its quoted title; cite <file>.md#<anchor> instead",
    ]


def test_slugs_follow_github():
    assert slug("What ε costs: synthetic default, user-level DP") == "what-ε-costs-synthetic-default-user-level-dp"
    assert slug("Why scratch first fell short, and the fix") == "why-scratch-first-fell-short-and-the-fix"


def test_the_readme_installs_and_tests_as_ci_does():
    """CI runs the README's own commands; a README that drifted from them would mislead a user."""
    readme = (ROOT / "README.md").read_text()
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith(".venv/bin/")]
    assert ci, ".ci/run has no commands"
    for command in ci:
        assert command.replace(" --quiet", "") in readme, f"README.md lacks .ci/run's command: {command}"
    assert ".venv/bin/python -m fedrec.simulate" in readme


def test_every_config_key_is_documented():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    text = (ROOT / "docs/configuration.md").read_text()
    assert [k for k in app if f"`{k}`" not in text] == []


def png_text(path: Path) -> dict[str, str]:
    """The PNG's tEXt chunks (stdlib only)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    out, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            out[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
        pos += 12 + length
    return out


def test_the_architecture_picture_matches_the_imports():
    spec = importlib.util.spec_from_file_location("architecture_diagram", ROOT / "docs/architecture_diagram.py")
    diagram = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagram)
    stored = png_text(ROOT / "docs/architecture.png").get(diagram.DIGEST_KEY)
    assert stored == diagram.digest(), (
        "docs/architecture.png no longer matches the imports (a module or an import between layers changed): "
        "run .venv/bin/python docs/architecture_diagram.py"
    )
