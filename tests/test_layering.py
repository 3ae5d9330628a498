"""The package's stages import only earlier stages and the shared leaves: no cycles.

Order: leaves (``arches``, ``nics``, ``flowtable``, ``processes``, ``errors``, ``progress``)
-> ``prepare`` -> ``run`` -> ``guest`` -> ``lifecycle`` -> ``face``. A stage that needs
something from a later one means that piece belongs in an earlier stage or a leaf. Only
``face`` knows pytest: the lifecycle serves the CLI as it serves the plugin.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kmodtest

PACKAGE = Path(kmodtest.__file__).parent
STAGES = ("prepare", "run", "guest", "lifecycle", "face")
LEAVES = ("arches", "nics", "flowtable", "processes", "errors", "progress")


def _imported_parts(path: Path) -> set[str]:
    """The first component under ``kmodtest.`` of every kmodtest import in ``path``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            if node.module == "kmodtest":
                names = [f"kmodtest.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "kmodtest" and len(parts) > 1:
                out.add(parts[1])
    return out


def _rank(part: str) -> int:
    return -1 if part in LEAVES else STAGES.index(part) if part in STAGES else -2


def test_stages_import_only_earlier_stages_and_leaves():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for part in _imported_parts(path):
            if part == own or _rank(part) == -2:
                continue
            if _rank(part) > _rank(own) or (own in LEAVES and part not in LEAVES):
                bad.append(f"{rel} imports kmodtest.{part}")
    assert bad == [], "\n".join(bad)


def test_leaves_are_known_modules():
    for leaf in LEAVES:
        assert (PACKAGE / f"{leaf}.py").is_file(), leaf
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage


def test_only_the_face_imports_pytest():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "face":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in ("pytest", "_pytest") for n in names):
                bad.append(str(rel))
    assert bad == [], f"pytest imported outside kmodtest/face: {bad}"
