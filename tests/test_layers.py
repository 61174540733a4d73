"""The layers point one way (STYLE.md 13), the pure layers do no I/O, and each module imports
alone. Checked from the source (every import, also inside functions) and by importing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "backer"

# Lowest first. A module may import from its own layer or lower ones.
LAYERS: list[tuple[str, ...]] = [
    ("backer", "backer.errors", "backer.ids", "backer.paths", "backer.addresses"),
    ("backer.events",),
    ("backer.keys", "backer.config"),
    ("backer.index",),
    ("backer.protocol",),
    ("backer.sync",),
    ("backer.mesh", "backer.discovery"),
    ("backer.watch", "backer.inotify"),
    ("backer.node",),
    ("backer.cli", "backer.web", "backer.__main__"),
]
# Layers that must stay sans-IO: no event loop, sockets, threads or database.
PURE = (
    "backer.errors",
    "backer.ids",
    "backer.paths",
    "backer.addresses",
    "backer.events",
    "backer.discovery.base",
    "backer.discovery.records",
    "backer.keys",
    "backer.index.entry",
    "backer.index.merkle",
    "backer.index.ignore",
    "backer.index.chunker",
    "backer.protocol",
    "backer.sync.merge",
    "backer.mesh.noise",
    "backer.mesh.channel",
)
IO_MODULES = {"asyncio", "socket", "sqlite3", "threading", "selectors", "subprocess"}
# Siblings that must not know each other.
APART = [("backer.mesh", "backer.discovery")]


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def _layer(module: str) -> int:
    best, rank = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def _imports(module: str) -> set[str]:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = _modules()


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module: str) -> None:
    mine = _layer(module)
    for imported in _imports(module):
        if imported == "backer" or not imported.startswith("backer."):
            continue
        # `from backer.index import merkle` names a module: judge the deepest real module.
        target = imported
        if target not in MODULES:
            target = target.rpartition(".")[0]
        assert _layer(target) <= mine, f"{module} (layer {mine}) imports upward: {imported}"
        for left, right in APART:
            for a, b in ((left, right), (right, left)):
                assert not (module.startswith(a) and target.startswith(b)), (
                    f"{module} must not import {target}"
                )


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith(PURE)])
def test_pure_layers_do_no_io(module: str) -> None:
    top_level = {name.split(".")[0] for name in _imports(module)}
    assert not top_level & IO_MODULES, f"{module} imports {top_level & IO_MODULES}"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "backer.__main__"])
def test_each_module_imports_alone(module: str) -> None:
    probe = (
        f"import sys, {module}\n"
        "bad = [m for m in sys.modules if m.startswith('backer.cli') and "
        f"not {module!r}.startswith('backer.cli')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
