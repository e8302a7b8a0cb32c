"""`darp sweep`: the search space, option checks, and a tiny sweep killed and resumed end to end."""

import csv
import math
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.tune.search.sample import Categorical, Float, Integer

from tests.processes import kill_session
from sketch_env.errors import DataError
from sketch_env.synthetic import make_tiny_setup
from tune_runs.cli import build_config
from policies.running.sweep import SweepConfig, check_config, default_point, experiment_location, param_space
from policies.running.registry import TrainConfig

DARP_CLI = Path(sys.executable).parent / "darp"


TRAIN_FIELDS = set(TrainConfig.__dataclass_fields__)


def sweep_config(tmp_path, **kw):
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "phase1").mkdir(exist_ok=True)
    train = dict(data=str(tmp_path / "data"), embedding=str(tmp_path / "phase1"), run_dir=str(tmp_path / "sweep"))
    train |= {k: v for k, v in kw.items() if k in TRAIN_FIELDS}
    return SweepConfig(train=TrainConfig(**train), **{k: v for k, v in kw.items() if k not in TRAIN_FIELDS})


def test_param_space_searches_the_std_schedule(tmp_path):
    cfg = sweep_config(tmp_path, std_start_range=(0.2, 0.4), std_shapes=("linear", "cosine"), iterations=7)
    space = param_space(cfg)["train"]
    assert isinstance(space["std_start"], Float) and (space["std_start"].lower, space["std_start"].upper) == (0.2, 0.4)
    assert isinstance(space["std_end"], Float)
    assert isinstance(space["std_shape"], Categorical) and space["std_shape"].categories == ["linear", "cosine"]
    assert isinstance(space["std_horizon"], Integer)
    assert space["val_interval"] == 1, "ASHA needs validation AUIR in every result"
    assert space["iterations"] == 7 and space["algo"] == "darp"
    assert not isinstance(space["n_heads"], Categorical)
    assert default_point(cfg) == {"train": {"std_start": 0.3, "std_end": 0.05, "std_shape": "exponential",
                                            "std_horizon": 200_000}}

    cfg = sweep_config(tmp_path, search_exploration=True, n_heads_choices=(2, 4), std_start=0.4)
    space = param_space(cfg)["train"]
    assert space["n_heads"].categories == [2, 4]
    assert isinstance(space["bootstrap_p"], Float)
    assert default_point(cfg)["train"] == {"std_start": 0.4, "std_end": 0.05, "std_shape": "exponential",
                                                "std_horizon": 200_000, "bootstrap_p": 0.5, "n_heads": 6}


def test_sweep_takes_every_darp_train_option(capsys):
    """SweepConfig composes TrainConfig: darp train's options are sweep flags, and reach every trial."""
    from tune_runs.cli import main

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    for flag in ("--lr", "--sup-loss", "--num-learners", "--episodes-per-batch", "--iterations", "--samples"):
        assert flag in out
    assert "--algo" not in out and "--val-interval" not in out, "the sweep sets these itself"
    cfg = build_config(SweepConfig, {"data": "d", "embedding": "e", "run_dir": "r", "lr": 1e-3, "samples": 2})
    assert cfg.train.lr == 1e-3 and cfg.samples == 2


def test_experiment_location_local_or_shared_storage(tmp_path):
    assert experiment_location(sweep_config(tmp_path)) == (str((tmp_path / "sweep").resolve()), "tune")
    shared = sweep_config(tmp_path, storage="s3://bucket/sweeps/", run_dir=str(tmp_path / "chair_std"))
    assert experiment_location(shared) == ("s3://bucket/sweeps", "chair_std")


@pytest.mark.parametrize("bad, message", [
    (dict(std_end_range=(0.1, 0.01)), "std-end-range"),
    (dict(std_start_range=(0.1, 0.2, 0.3)), "std-start-range"),
    (dict(std_shapes=("linear", "square")), "std-shapes"),
    (dict(grace_period=5, iterations=3), "grace-period"),
    (dict(data="/nonexistent/data"), "--data"),
    (dict(num_envs_per_env_runner=4, episodes_per_batch=10), "multiple of"),
])
def test_check_config_rejects_bad_options(tmp_path, bad, message):
    with pytest.raises(DataError, match=message):  # ConfigError naming the option, DataError for a missing input
        check_config(sweep_config(tmp_path, **bad))


def finished_trials(experiment: Path) -> list[str]:
    """Trial ids that Tune's saved experiment state marks TERMINATED."""
    done = []
    for path in experiment.glob("experiment_state-*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        trials = [json.loads(t[0]) for t in state["trial_data"]]
        done += [t["trial_id"] for t in trials if t["status"] == "TERMINATED"]
    return done


def result_lines(experiment: Path) -> dict[str, int]:
    """Reported results per trial id, read from each trial's result.json."""
    out = {}
    for path in experiment.glob("*/result.json"):
        lines = path.read_text().splitlines()
        out[json.loads(lines[0])["trial_id"]] = len(lines)
    return out


@pytest.mark.slow
def test_sweep_killed_then_resumed_keeps_finished_trials(tmp_path):
    data, phase1 = make_tiny_setup(tmp_path)
    run_dir = tmp_path / "sweep"
    experiment = run_dir / "tune"
    cmd = [str(DARP_CLI), "sweep", "--data", str(data), "--embedding", str(phase1), "--run-dir", str(run_dir),
           "--samples", "2", "--iterations", "2", "--grace-period", "1",
           "--num-envs-per-env-runner", "4", "--episodes-per-batch", "8", "--n-glimpses", "2"]
    first = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 150
        while not finished_trials(experiment) and first.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        os.kill(first.pid, signal.SIGKILL)
        output = first.communicate()[0]
    finally:
        kill_session(first.pid)
    done = finished_trials(experiment)
    assert len(done) == 1, f"expected one finished trial at the kill, got {done}\n{output[-3000:]}"
    before = result_lines(experiment)
    assert before[done[0]] == 2

    second = subprocess.run(cmd, start_new_session=True, capture_output=True, text=True, timeout=150)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the sweep" in second.stdout
    assert f"{done[0]} iter" not in second.stdout, "the finished trial was run again"
    after = result_lines(experiment)
    assert after[done[0]] == before[done[0]] and len(after) == 2

    with open(run_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["trial"] for r in rows) == sorted(after)
    assert [r["default"] for r in rows].count("True") == 1
    assert all(0 < float(r["final_auir"]) <= 100 and int(r["iterations"]) >= 1 for r in rows)
    best = build_config(TrainConfig, {}, str(run_dir / "best_config.json"))
    assert best.std_start == pytest.approx(float(rows[0]["std_start"])) and best.std_shape == rows[0]["std_shape"]
    assert Path(best.data) == data.resolve() and best.iterations == 2 and best.val_interval == 1
    assert (run_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gain_is_compared_at_the_iterations_the_default_ran():
    from policies.running.sweep import with_auir_at_default_iterations

    rows = [
        {"default": False, "_auir_by_iteration": {1: 40.0, 2: 41.0, 3: 45.0}},
        {"default": True, "_auir_by_iteration": {1: 39.0, 2: 42.0}},  # stopped by ASHA at 2
        {"default": False, "_auir_by_iteration": {1: 30.0}},
    ]
    with_auir_at_default_iterations(rows)
    assert [r["auir_at_default_iters"] for r in rows[:2]] == [41.0, 42.0]
    assert math.isnan(rows[2]["auir_at_default_iters"])
