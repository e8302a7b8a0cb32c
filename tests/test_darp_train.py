"""End-to-end: DARP trains as a Tune trial on a local Ray instance (tiny configs): the run directory,
TensorBoard, the kept checkpoint, the supervised loss against an independent computation, resume
after SIGTERM and after the states a kill leaves, and no Ray process left behind."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from policies.running import runs
from policies.running.fit import train
from policies.running.registry import TrainConfig
from sketch_env.atomic import prepare_output_dir
from sketch_env.errors import ConfigError, DataError
from tests.processes import kill_session, session_processes

pytestmark = pytest.mark.slow

DARP_CLI = Path(sys.executable).parent / "darp"


def tiny_config(data, phase1, run_dir, **kw):
    base = dict(data=str(data), embedding=str(phase1), run_dir=str(run_dir), iterations=2,
                num_envs_per_env_runner=4, episodes_per_batch=8, n_glimpses=2, val_interval=2)
    return TrainConfig(**(base | kw))


def iterations_logged(run_dir) -> list[int]:
    return [r["training_iteration"] for r in runs.results(run_dir)]


def test_relative_paths_are_read_from_where_darp_train_was_started(ray_local, tiny, tmp_path, monkeypatch):
    """Tune runs the trial in a working directory of its own: `make demo` passes runs/demo/... paths."""
    import os

    data, phase1 = tiny
    monkeypatch.chdir(tmp_path)
    val = train(tiny_config(os.path.relpath(data), os.path.relpath(phase1), "relative/darp", iterations=1))
    assert val["auir"] > 0
    run = runs.read_run(tmp_path / "relative" / "darp")
    assert run["status"] == "finished" and Path(run["config"]["data"]) == Path(data).resolve()


def test_train_is_one_tune_trial_that_tensorboard_reads(ray_local, tiny, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, phase1 = tiny
    run_dir = tmp_path / "darp"
    val = train(tiny_config(data, phase1, run_dir, iterations=3))
    assert "iter    3" in capsys.readouterr().out
    run = runs.read_run(run_dir)
    assert run["kind"] == "darp" and run["status"] == "finished" and run["iterations"] == 3
    assert iterations_logged(run_dir) == [1, 2, 3]
    header = (runs.trial_dir(run_dir) / "progress.csv").read_text().splitlines()[0].split(",")
    assert "evaluation/auir" in header and "env_steps_per_s" in header

    # validated at iteration 2 (the interval) and 3 (the last); the kept checkpoint is the best of those
    auirs = {r["training_iteration"]: r["evaluation"]["auir"] for r in runs.results(run_dir)}
    assert math.isnan(auirs[1]) and not math.isnan(auirs[2]) and not math.isnan(auirs[3])
    best = runs.best_checkpoint(run_dir)
    assert best.auir == max(auirs[2], auirs[3]) and val["auir"] == pytest.approx(best.auir)
    assert run["val_metrics"]["auir"] == pytest.approx(best.auir) and (run_dir / run["best_checkpoint"]) == best.path
    assert runs.best_module_dir(run_dir) == best.path / runs.MODULE_PATH
    assert (best.module_dir / "module_state.pkl").is_file()

    (events,) = runs.trial_dir(run_dir).glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("env_runners/episode_return_mean", "learners/default_policy/supervised_loss",
                "learners/default_policy/policy_loss", "learners/default_policy/locator_std", "env_steps_per_s"):
        assert [e.step for e in acc.Scalars(f"ray/tune/{tag}")] == [1, 2, 3], tag
    assert [e.step for e in acc.Scalars("ray/tune/evaluation/auir")] == [2, 3], "TensorBoard skips the NaN of iteration 1"

    # a rerun of the finished run trains nothing; other options are refused, not silently ignored
    train(tiny_config(data, phase1, run_dir, iterations=3))
    assert iterations_logged(run_dir) == [1, 2, 3]
    with pytest.raises(ConfigError, match="other options.*iterations 3 -> 4"):
        train(tiny_config(data, phase1, run_dir, iterations=4))

    # --no-resume starts over: nothing of the old run is kept or reported as this run's best
    val = train(tiny_config(data, phase1, run_dir, iterations=1, resume=False, lr=1e-12, seed=1), quiet=True)
    assert iterations_logged(run_dir) == [1]
    (only,) = runs.checkpoints(run_dir)
    assert only.iteration == 1 and val["auir"] == pytest.approx(runs.results(run_dir)[0]["evaluation"]["auir"])


def test_std_schedule_reaches_the_module(ray_local, tiny, tmp_path):
    from policies.running.trained import load_module

    data, phase1 = tiny
    run_dir = tmp_path / "std"
    train(tiny_config(data, phase1, run_dir, iterations=1, val_interval=0, std_start=0.5, std_end=0.01,
                      std_shape="linear", std_horizon=100, keep_best=False))
    assert float(load_module(run_dir).std) == pytest.approx(0.01)


# --- the supervised loss the learner reports, against the same loss computed from the data set ---


def expected_first_loss(env_config: dict, sup_loss: str, sup_target: str, temperature: float = 0.2) -> float:
    """The supervised loss of the untrained residual query, normalize(e_level), over every training sketch.

    Computed from the episodes' tables with plain torch, not through the learner, its connector or the
    infos' row indices.
    """
    from sketch_env.episodes import load_episode_data

    ep = load_episode_data(env_config["data"], env_config["embedding"], "train")
    query = torch.nn.functional.normalize(ep.sketch_embedding.double(), dim=-1)  # (S, 17, D)
    photos = ep.gallery.embeddings.double()
    if sup_loss == "mse":
        target = ep.sketch_embedding[:, -1].double() if sup_target == "final_sketch" else photos[ep.target_index]
        return float(((query - target[:, None]) ** 2).sum(-1).mean())
    n = len(photos)
    tau = temperature * float((torch.cdist(photos, photos) ** 2).sum()) / (n * (n - 1))
    logits = -torch.cdist(query.reshape(-1, query.shape[-1]), photos) ** 2 / tau
    target = ep.target_index.repeat_interleave(query.shape[1])
    return float(torch.nn.functional.cross_entropy(logits, target))


@pytest.mark.parametrize("sup_loss, sup_target, num_learners", [
    ("mse", "final_sketch", 0), ("mse", "photo", 0), ("infonce", "photo", 2)])
def test_first_supervised_loss_is_the_one_computed_from_the_data(ray_local, tiny, sup_loss, sup_target, num_learners):
    """One update over every training sketch once (sequential order, one pass, one minibatch): the loss
    logged is the loss before that update, of the zero-initialised correction: normalize(e_level)."""
    from policies.running.registry import build_algo_config
    from sketch_env.episodes import load_episode_data

    data, phase1 = tiny
    n_train = len(load_episode_data(data, phase1, "train").sketch_id)
    cfg = tiny_config(data, phase1, "unused", episodes_per_batch=n_train, num_envs_per_env_runner=4, val_interval=0,
                      sup_loss=sup_loss, sup_target=sup_target, num_epochs=1, minibatch_episodes=n_train,
                      num_learners=num_learners, lr=3e-3, dropout=0.0)
    assert n_train % 4 == 0
    config = build_algo_config(cfg)
    config.environment(env_config=config.env_config | {"sketch_order": "sequential"})
    algo = config.build_algo()
    try:
        logged = algo.train()["learners"]["default_policy"]["supervised_loss"]
        second = algo.train()["learners"]["default_policy"]["supervised_loss"]
    finally:
        algo.stop()
    expected = expected_first_loss(config.env_config, sup_loss, sup_target)
    assert logged == pytest.approx(expected, rel=1e-4)
    assert second < logged, "one update on these very sketches lowers their loss"


def test_infonce_needs_the_photo_target(tiny, tmp_path):
    from policies.running.registry import build_algo_config

    data, phase1 = tiny
    config = build_algo_config(tiny_config(data, phase1, tmp_path, sup_loss="infonce", sup_target="final_sketch"))
    with pytest.raises(ValueError, match="sup_target='photo'"):
        config.validate()


# --- SIGTERM, the states a kill leaves, and resuming from them ---


def test_sigterm_leaves_no_process_and_a_resumable_run(tiny, tmp_path):
    data, phase1 = tiny
    run_dir = tmp_path / "killed"
    cmd = [str(DARP_CLI), "train", "--data", str(data), "--embedding", str(phase1), "--run-dir", str(run_dir),
           "--iterations", "5", "--val-interval", "1", "--num-envs-per-env-runner", "4", "--episodes-per-batch", "8",
           "--n-glimpses", "2"]
    first = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in first.stdout:
            lines.append(line)
            if line.startswith("iter    2"):
                break
        first.send_signal(signal.SIGTERM)
        output = "".join(lines) + first.communicate(timeout=120)[0]
        deadline = time.time() + 20
        while session_processes(first.pid) and time.time() < deadline:
            time.sleep(0.5)
        left = session_processes(first.pid)
    finally:
        kill_session(first.pid)
    assert first.returncode != 0 and "interrupted after iteration" in output, output[-3000:]
    assert not left, f"processes left after SIGTERM: {left}"

    done = iterations_logged(run_dir)
    assert done == list(range(1, len(done) + 1)) and 2 <= len(done) < 5, output[-2000:]
    # The states a kill leaves, added on top: a result logged whose checkpoint Tune never recorded, and a
    # checkpoint Tune was still copying (incomplete; its checkpoint.json claims the best AUIR).
    trial = runs.trial_dir(run_dir)
    with open(trial / "result.json", "a") as f:
        f.write(json.dumps(runs.results(run_dir)[-1] | {"training_iteration": len(done) + 1}) + "\n")
    latest = runs.checkpoints(run_dir)[-1]
    partial = trial / "checkpoint_000099"
    shutil.copytree(latest.path, partial)
    info = json.loads((partial / runs.CHECKPOINT_INFO).read_text())
    (partial / runs.CHECKPOINT_INFO).write_text(json.dumps(info | {"iteration": 99, "validation": {"auir": 100.0}}))
    module_state = partial / runs.MODULE_PATH / "module_state.pkl"
    module_state.write_bytes(module_state.read_bytes()[:10])
    assert runs.best_checkpoint(run_dir).path != partial, "an incomplete checkpoint is never chosen"
    time_before = runs.results(run_dir)[len(done) - 1]["time_total_s"]

    second = subprocess.run(cmd, start_new_session=True, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    restarted = int(second.stdout.split("resumed from ")[1].split(" at iteration ")[1].split()[0])
    assert 1 <= restarted <= len(done)
    results = runs.results(run_dir)
    assert [r["training_iteration"] for r in results] == [1, 2, 3, 4, 5], "no iteration listed twice, none missing"
    times = [r["time_total_s"] for r in results]
    assert all(b > a for a, b in zip(times, times[1:])) and times[restarted - 1] <= time_before + 1e-6
    run = runs.read_run(run_dir)
    best = runs.best_checkpoint(run_dir)
    assert run["status"] == "finished" and best.path != partial
    assert run["val_metrics"]["auir"] == pytest.approx(max(r["evaluation"]["auir"] for r in results))
    assert f"AUIR {run['val_metrics']['auir']:.2f}" in second.stdout, "the printed best is this run's"


def test_a_cut_short_experiment_state_is_refused_not_restarted(tiny, tmp_path):
    """Tune rewrites its experiment state in place: a kill mid-write leaves it cut short. Resuming then
    must not quietly start over from iteration 1."""
    data, phase1 = tiny
    run_dir = tmp_path / "state"
    prepare_output_dir(run_dir, runs.RL_RUN_KIND)
    (run_dir / "tune-0000abcd").mkdir(parents=True)
    (runs.experiment_dir(run_dir) / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [')
    runs.write_run(run_dir, {"kind": "darp", "status": "running", "config": {}})
    with pytest.raises(DataError, match="cut short"):
        train(tiny_config(data, phase1, run_dir))
    assert not (runs.trial_dir(run_dir) / "result.json").exists()
