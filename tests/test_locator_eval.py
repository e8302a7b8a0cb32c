"""End-to-end: `darp evaluate --locator` swaps a fixed rule in for a trained policy's locator."""

import json

import pytest

from tune_runs.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def darp_run(tiny, tmp_path_factory):
    data, phase1 = tiny
    run_dir = tmp_path_factory.mktemp("darp")
    assert main(["train", "--data", str(data), "--embedding", str(phase1), "--run-dir", str(run_dir), "--iterations", "1",
                 "--num-envs-per-env-runner", "4", "--episodes-per-batch", "8", "--n-glimpses", "2",
                 "--val-interval", "1"]) == 0
    return data, run_dir


def _evaluate(data, run_dir, out, *extra) -> dict:
    assert main(["evaluate", "--data", str(data), "--run", str(run_dir), "--split", "train", "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_every_locator_is_named_and_ink_rules_always_see_ink(darp_run, tmp_path):
    data, run_dir = darp_run
    own = _evaluate(data, run_dir, tmp_path / "policy")
    assert own["locator"] == "policy" and 0.0 <= own["fovea_on_ink"] <= 1.0
    for rule in ("centre", "random", "ink", "newest-ink"):
        metrics = _evaluate(data, run_dir, tmp_path / rule, "--locator", rule, "--seed", "1")
        assert metrics["locator"] == rule and metrics["locator_seed"] == 1
        assert 0 < metrics["auir"] <= 100
        if rule in ("ink", "newest-ink"):
            assert metrics["fovea_on_ink"] == 1.0
    again = _evaluate(data, run_dir, tmp_path / "random2", "--locator", "random", "--seed", "1")
    assert again == json.loads((tmp_path / "random" / "metrics.json").read_text())
