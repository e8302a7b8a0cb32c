"""End-to-end: DARP trains on a local Ray instance (tiny configs), checkpoints, resumes, evaluates."""

import json

import pytest

from tune_runs.train import TrainConfig, train

pytestmark = pytest.mark.slow


def tiny_config(data, phase1, run_dir, **kw):
    base = dict(data=str(data), embedding=str(phase1), run_dir=str(run_dir), iterations=2,
                num_envs_per_env_runner=4, episodes_per_batch=8, n_glimpses=2, val_interval=2)
    return TrainConfig(**(base | kw))


def test_train_checkpoints_validates_and_resumes(ray_local, tiny, tmp_path, capsys):
    data, phase1 = tiny
    run_dir = tmp_path / "darp"
    val = train(tiny_config(data, phase1, run_dir))
    assert (run_dir / "checkpoint").is_dir()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["kind"] == "darp" and run["val_metrics"]["n_sketches"] > 0
    assert 0 < val["auir"] <= 100 and 0 <= val["acc@5"] <= 100
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert "auir" in json.loads(lines[1])["validation"]
    capsys.readouterr()
    train(tiny_config(data, phase1, run_dir, iterations=3))
    assert "resumed from" in capsys.readouterr().out
    assert len((run_dir / "results.jsonl").read_text().splitlines()) == 3, "a resumed run must not redo iterations"


def test_std_schedule_reaches_the_module(ray_local, tiny, tmp_path):
    from tune_runs.rl_eval import load_module

    data, phase1 = tiny
    run_dir = tmp_path / "std"
    train(tiny_config(data, phase1, run_dir, iterations=1, val_interval=0, std_start=0.5, std_end=0.01,
                      std_shape="linear", std_horizon=100, keep_best=False))
    assert float(load_module(run_dir).std) == pytest.approx(0.01)


def test_two_learners_ddp_with_the_infonce_loss(ray_local, tiny, tmp_path):
    data, phase1 = tiny
    run_dir = tmp_path / "ddp"
    val = train(tiny_config(data, phase1, run_dir, iterations=1, num_learners=2, val_interval=0, sup_loss="infonce"))
    assert (run_dir / "checkpoint").is_dir() and val["n_sketches"] > 0
    learner = json.loads((run_dir / "results.jsonl").read_text().splitlines()[0])["learner"]
    assert learner["supervised_loss"] > 0.0, "a cross-entropy among several photos is positive"


def test_mse_onto_the_final_sketch_looks_its_targets_up_by_sketch_row(ray_local, tiny, tmp_path):
    data, phase1 = tiny
    run_dir = tmp_path / "final_sketch"
    train(tiny_config(data, phase1, run_dir, iterations=1, val_interval=0, sup_loss="mse", sup_target="final_sketch"))
    learner = json.loads((run_dir / "results.jsonl").read_text().splitlines()[0])["learner"]
    assert 0.0 < learner["supervised_loss"] < 4.0, "a squared distance between unit vectors, not all zero"


def test_infonce_needs_the_photo_target(tiny, tmp_path):
    from tune_runs.train import build_algo_config

    data, phase1 = tiny
    config = build_algo_config(tiny_config(data, phase1, tmp_path, sup_loss="infonce", sup_target="final_sketch"))
    with pytest.raises(ValueError, match="sup_target='photo'"):
        config.validate()


def test_best_checkpoint_is_kept_and_used(ray_local, tiny, tmp_path):
    data, phase1 = tiny
    run_dir = tmp_path / "best"
    val = train(tiny_config(data, phase1, run_dir, iterations=2, val_interval=1))
    best = json.loads((run_dir / "best.json").read_text())
    assert (run_dir / "best_checkpoint").is_dir()
    assert best["auir"] == pytest.approx(val["auir"])
    history = [json.loads(line)["validation"].get("auir", -1) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert best["auir"] >= max(history)
