"""The layers and the import graph: sketch_env < policies < tune_runs, policies' subpackages in order, no cycle.

Every import counts, those inside functions too (a lazy import is still a dependency), read from the
source with `ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sketch_env", "policies", "tune_runs")
# policies' subpackages, lowest first: each may import only those before it
POLICIES_ORDER = ("phase1", "darp", "baselines", "running")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's __init__ only when imported by its own name)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
                edges.update(t if t in modules else node.module for t in targets)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_layers_import_downwards_only():
    allowed = {"sketch_env": {"sketch_env"}, "policies": {"sketch_env", "policies"}, "tune_runs": set(PACKAGES)}
    wrong = [f"{m} imports {t}" for m, targets in import_graph().items() for t in targets
             if t.split(".")[0] not in allowed[m.split(".")[0]]]
    assert not wrong


def test_policies_subpackages_import_lower_ones_only():
    assert sorted(p.name for p in (ROOT / "policies").iterdir() if (p / "__init__.py").is_file()) == sorted(POLICIES_ORDER)
    rank = {name: i for i, name in enumerate(POLICIES_ORDER)}
    wrong = []
    for m, targets in import_graph().items():
        parts = m.split(".")
        if parts[0] != "policies" or len(parts) < 3:
            continue
        for t in targets:
            t_parts = t.split(".")
            if t_parts[0] == "policies" and len(t_parts) >= 2 and rank.get(t_parts[1], -1) > rank[parts[1]]:
                wrong.append(f"{m} imports {t}")
    assert not wrong
