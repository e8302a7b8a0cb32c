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


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_phase1_trains_a_recipe_and_reports_its_row(synthetic):
    """bench_phase1's own training path (it reads the phase-1 engine's TrainingState) on the synthetic set."""
    from sketch_env.data import load_dataset

    bench = load_benchmark("bench_phase1")
    data, _ = synthetic
    row = bench.train_recipe(load_dataset(data), "default", bench.RECIPES["default"], 0,
                             {"epochs": 2, "val_every": 1, "num_threads": 1}, {})
    assert row["epochs"] == 2 and 1 <= row["best_epoch"] <= 2 and row["train_seconds"] > 0
    assert 0 <= row["auir"] <= 100 and len(row["curve"]) == 2


def test_bench_local_attention_ranks_in_closed_form_as_the_env_does(episodes):
    """Its headroom table computes ranks without the env: the global row must be phase 1's ranks and the
    dense-ink row the env's in --match dense-ink; the label oracle's one cell is at least as good as a drawn one."""
    import numpy as np

    from policies.darp.rollout import rollout_ranks
    from policies.running.trained import Phase1Query
    from sketch_env.metrics import retrieval_metrics
    from sketch_env.synthetic import with_local_grids
    from sketch_env.vector_env import make_vector_env

    bench = load_benchmark("bench_local_attention")
    ep = with_local_grids(episodes)
    rows = dict(bench.headroom_rows(ep, ks=(1, 2)))
    n = len(ep.gallery)
    assert rows["no cell (global ranking)"] == retrieval_metrics(ep.phase1_rank.numpy(), n)
    env = make_vector_env({"match": "dense-ink", "n_glimpses": 1, "sketch_order": "sequential", "num_envs": 8, "episodes": ep})
    dense_ink = rollout_ranks(Phase1Query(), env, np.arange(len(ep.sketch_id))).ranks
    assert rows["every inked cell (dense-ink)"] == retrieval_metrics(dense_ink, n)
    assert rows["oracle: 1 inked cell chosen knowing the photo"]["auir"] >= rows["1 inked cell drawn uniformly"]["auir"]
    assert rows["oracle: 2 inked cells chosen knowing the photo"]["auir"] > rows["2 inked cells drawn uniformly"]["auir"]
