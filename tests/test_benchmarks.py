"""Benchmarks still run against the code they measure: every name a benchmark imports from this project exists
(imports inside functions included), and bench_phase1 trains a recipe. Benchmarks run rarely, so a moved or renamed
function would otherwise be found only by the next person who runs one."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("sketch_env", "policies", "tune_runs")


def project_imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every `from PROJECT_MODULE import name` in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in PROJECT:
            out += [(node.module, alias.name, node.lineno) for alias in node.names]
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_every_project_name_a_benchmark_imports_exists(path):
    missing = []
    for module_name, name, line in project_imports(path):
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{path.name}:{line}: {module_name}.{name}")
    assert not missing, missing


def test_bench_phase1_trains_a_recipe_and_reports_its_row(synthetic):
    """bench_phase1's own training path (it reads the phase-1 engine's TrainingState) on the synthetic set."""
    from sketch_env.data import load_dataset

    spec = importlib.util.spec_from_file_location("bench_phase1", ROOT / "benchmarks" / "bench_phase1.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data, _ = synthetic
    row = bench.train_recipe(load_dataset(data), "default", bench.RECIPES["default"], 0,
                             {"epochs": 2, "val_every": 1, "num_threads": 1}, {})
    assert row["epochs"] == 2 and 1 <= row["best_epoch"] <= 2 and row["train_seconds"] > 0
    assert 0 <= row["auir"] <= 100 and len(row["curve"]) == 2
