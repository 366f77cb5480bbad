"""The layers, read from the source (no import is run): no upward import, no import cycle.

From the bottom: the scheduler core (no torch, engine, server, simulator or cluster), the
routing policies (``fairbatch.routing``: nothing of the simulator, the router or the
server), then the simulator (nothing of the cluster) and the hosts. ``fairbatch.wire``
(OpenAI's error bodies and SSE) imports nothing of fairbatch. A cycle is a module-level
import loop; imports inside functions and under ``TYPE_CHECKING`` do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

BANNED = {
    "fairbatch.scheduler": ("torch", "fairbatch.engine", "fairbatch.server", "fairbatch.sim", "fairbatch.cluster"),
    "fairbatch.routing": ("torch", "fairbatch.engine", "fairbatch.server", "fairbatch.sim", "fairbatch.cluster"),
    "fairbatch.sim": ("fairbatch.cluster", "fairbatch.server"),
    "fairbatch.wire": ("fairbatch.",),
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "fairbatch").rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        out[name] = f
    return out


def _imports(path: Path, *, module_level: bool) -> set[str]:
    """Modules ``path`` imports (for ``from M import N``: M and M.N); with ``module_level``,
    only those run when it is imported."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            elif module_level and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit([n for n in getattr(node, field, []) if isinstance(n, (ast.stmt, ast.excepthandler))])

    visit(ast.parse(path.read_text()).body)
    return found


@pytest.mark.parametrize("layer", sorted(BANNED))
def test_no_upward_import(layer: str) -> None:
    bad = []
    for name, path in _modules().items():
        if name == layer or name.startswith(layer + "."):
            for m in _imports(path, module_level=False):
                if any(m == b or m.startswith(b if b.endswith(".") else b + ".") for b in BANNED[layer]):
                    bad.append(f"{name} imports {m}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    mods = _modules()
    graph = {m: {i for i in _imports(p, module_level=True) if i in mods and i != m} for m, p in mods.items()}
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    cycles = []

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                walk(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    assert not cycles, "\n".join(cycles)
