"""The import layout: the contracts CI's lint phase checks, run here too so the test command catches them."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_import_contracts_are_kept() -> None:
    proc = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: the graph is small but deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_level_import_cycle_either() -> None:
    """What ``acyclic_siblings`` cannot see: a module importing its own package's ``__init__`` back.

    (``from app.api import bp`` in a route module that ``app/api/__init__.py`` imports was one.)
    Lazy imports inside functions count: grimp reads every import statement.
    """
    graph = grimp.build_graph("app", cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _strongly_connected(edges) == []


def test_strongly_connected_finds_a_cycle_through_a_package_init() -> None:
    edges = {"app": {"app.f"}, "app.f": {"app.api"}, "app.api": {"app.api.o"}, "app.api.o": {"app"}, "app.x": set()}
    assert _strongly_connected(edges) == [["app", "app.api", "app.api.o", "app.f"]]


def test_the_legacy_contract_covers_every_other_top_level_module() -> None:
    """A new package is not silently outside the contract: every top-level module but the legacy one is a source."""
    legacy = _contracts()["legacy"]
    top_level = grimp.build_graph("app", cache_dir=None).find_children("app")
    assert set(legacy["source_modules"]) == top_level - set(legacy["forbidden_modules"])
