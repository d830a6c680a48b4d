"""The import graph of the ``eep`` namespace, read from the source (no imports run): no cycle,
and imports flow one way.

Layers, top to bottom:
- ``eep.tools``: the command line, benches and fault tooling; may import anything below;
- the runtime, the rest of ``eep.*`` (rank, frontend, engine, fabrics, model, ...);
- ``eep.transfer``, which keeps its manifests in etcd and so may use ``eep.membership``;
- ``eep.membership`` and ``eep.kernels``, which import nothing of the project but themselves;
- leaf modules every layer may use (``LEAVES``): ``eep.cuda_driver``, the CUDA driver binding
  under both the kernels' IPC buffer and the transfer service; it imports no project module.

Lazy (function-level) imports count: a cycle through one is still a cycle.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "eep": "eep",
    "eep.membership": "membership",
    "eep.transfer": "transfer",
    "eep.kernels": "kernels",
    "eep.tools": "tools",
}
LEAVES = {"eep", "eep.cuda_driver"}
BOTTOM = ("eep.membership", "eep.kernels")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "eep" and parts and f"eep.{parts[0]}" in PACKAGES:
                continue  # links into the other top-level folders, if any
            mods[".".join([pkg, *parts])] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    mods = _modules()
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" for a in node.names]
            for target in targets:
                found = _resolve(target, mods)
                if found is not None and found != mod:
                    edges[mod].add(found)
    return mods, edges


def _layer(mod: str) -> int:
    if mod in LEAVES:
        return 0
    if mod.startswith(BOTTOM):
        return 1
    if mod.startswith("eep.transfer"):
        return 2
    if mod.startswith("eep.tools"):
        return 4
    return 3


def _package(mod: str) -> str:
    return next((p for p in (*BOTTOM, "eep.transfer", "eep.tools") if mod.startswith(p)), "eep")


def test_there_is_no_import_cycle():
    mods, edges = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for mod in sorted(mods):
        if mod not in index:
            visit(mod)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_flow_one_way():
    mods, edges = _graph()
    upward = [
        f"{mod} -> {target}"
        for mod in sorted(edges)
        for target in sorted(edges[mod])
        if _layer(target) > _layer(mod)
        or (_layer(target) == _layer(mod) == 1 and _package(target) != _package(mod))
        or (mod in LEAVES and mod != "eep" and target != "eep")
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_fabrics_do_not_import_the_engine_that_drives_them():
    mods, edges = _graph()
    wrong = [
        f"{mod} -> {t}"
        for mod in sorted(edges)
        if mod.startswith("eep.fabrics")
        for t in edges[mod]
        if t.startswith("eep.engine")
    ]
    assert not wrong, wrong


@pytest.mark.parametrize("limit", [400])
def test_no_module_is_over_the_limit_without_a_reason(limit):
    """A module over ``limit`` lines says why at its top (``Longer than 400 lines:``)."""
    mods, _ = _graph()
    long = [
        f"{path.relative_to(ROOT)} ({n} lines)"
        for path in mods.values()
        if (n := len(path.read_text().splitlines())) > limit
        and "Longer than 400 lines:" not in "\n".join(path.read_text().splitlines()[:30])
    ]
    assert not long, f"over {limit} lines without a reason at the top: {long}"


def test_every_package_is_installed():
    """pyproject lists each package (a non-editable install copies only those)."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {mod for mod, path in _modules().items() if path.name == "__init__.py"}
    assert found == listed, (
        f"packages not listed: {found - listed}; listed, absent: {listed - found}"
    )
