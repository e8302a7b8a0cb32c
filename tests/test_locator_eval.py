"""End-to-end: `darp evaluate --locator` swaps a fixed rule in for a trained policy's locator."""

import json
from pathlib import Path

import pytest

from tune_runs.cli import main

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def darp_run(tiny, tmp_path_factory):
    """A DARP run on a real (tiny) phase-1 network: noise strokes need it to embed the noisy sketches."""
    data, _ = tiny
    phase1 = tmp_path_factory.mktemp("phase1")
    assert main(["pretrain", "--data", str(data), "--run-dir", str(phase1), "--epochs", "1", "--batch-size", "8",
                 "--image-size", "32", "--embedding-dim", "16", "--width", "8"]) == 0
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
        if rule == "centre":
            assert metrics["glimpse_cells"] == 1.0  # 8 x 8 cells: every chosen glimpse in the same one
        if rule == "random":
            assert metrics["glimpse_cells"] > 4.0  # 33 uniform choices per episode
    again = _evaluate(data, run_dir, tmp_path / "random2", "--locator", "random", "--seed", "1")
    assert again == json.loads((tmp_path / "random" / "metrics.json").read_text())


def test_noise_strokes_reach_an_rl_run_and_are_repeatable(darp_run, tmp_path):
    import pyarrow.parquet as pq

    data, run_dir = darp_run
    clean = _evaluate(data, run_dir, tmp_path / "clean")
    noisy = _evaluate(data, run_dir, tmp_path / "noisy", "--noise-strokes", "3", "--noise-seed", "2")
    again = _evaluate(data, run_dir, tmp_path / "again", "--noise-strokes", "3", "--noise-seed", "2")
    assert noisy == again and (noisy["noise_strokes"], noisy["noise_seed"]) == (3, 2)
    ranks = {name: pq.read_table(tmp_path / name / "ranks.parquet").to_pydict()["rank"] for name in ("clean", "noisy")}
    assert ranks["noisy"] != ranks["clean"]
    assert "noise_strokes" not in clean


def test_a_sharp_fovea_that_snaps_to_ink_trains_and_is_evaluated_as_it_trained(darp_run, tmp_path):
    """experiments/sharp_fovea.json (glimpse_image_size, glimpse_size, retina_encoder, snap_to_ink, advantage_norm:
    research switches, set only by --config) reaches the env and the module in training, flags override it,
    and evaluation rebuilds the same env from run.json."""
    data, first = darp_run
    phase1 = json.loads((first / "run.json").read_text())["embedding"]
    run_dir = tmp_path / "sharp"
    assert main(["train", "--data", str(data), "--embedding", phase1, "--run-dir", str(run_dir), "--iterations", "1",
                 "--num-envs-per-env-runner", "4", "--episodes-per-batch", "8", "--n-glimpses", "2",
                 "--val-interval", "1", "--config", str(ROOT / "experiments" / "sharp_fovea.json")]) == 0
    config = json.loads((run_dir / "run.json").read_text())["config"]
    assert (config["glimpse_image_size"], config["glimpse_size"], config["retina_encoder"], config["snap_to_ink"],
            config["n_glimpses"]) == (128, 16, "conv", True, 2)
    own = _evaluate(data, run_dir, tmp_path / "own")
    assert own["fovea_on_ink"] == 1.0  # every chosen glimpse lands on ink
    centre = _evaluate(data, run_dir, tmp_path / "centre", "--locator", "centre")
    assert centre["fovea_on_ink"] == 1.0 and 0 < centre["auir"] <= 100
