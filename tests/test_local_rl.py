"""DARP in local match (issue 23): the level returns, the warm start's episodes, the mode through run.json into
evaluate, play and the live server, and (slow) a tiny `darp report --match local` through Ray Tune."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from policies.darp.learner import level_returns
from sketch_env.env import EnvConfig, action_space, observation_space
from sketch_env.render import N_LEVELS
from sketch_env.vector_env import SketchRetrievalVectorEnv
from sketch_env.synthetic import with_local_grids


def test_level_returns_credit_a_location_with_the_rest_of_the_level_it_is_read_on():
    rewards = np.arange(1.0, 9.0)  # 4 levels of 2 glimpses
    # the location chosen at t is observed at t + 1: the rewards of t + 1 .. the end of that step's level
    assert level_returns(rewards, 2).tolist() == [2.0, 7.0, 4.0, 11.0, 6.0, 15.0, 8.0, 0.0]
    assert level_returns(rewards, 3).tolist() == [5.0, 3.0, 15.0, 11.0, 6.0, 15.0, 8.0, 0.0]
    # a piece that starts mid-episode counts its steps from the episode's start
    assert level_returns(rewards[3:], 3, t_started=3).tolist() == [11.0, 6.0, 15.0, 8.0, 0.0]


def test_distinct_cells_count_the_chosen_glimpse_centres_on_an_8_by_8_grid():
    from policies.darp.rollout import distinct_cells

    locations = np.zeros((3, N_LEVELS, 2, 2), np.float32)  # episode 0: every glimpse at the centre
    locations[1, :, 0] = (-0.99, -0.99)  # episode 1: two corners, alternating
    locations[1, :, 1] = (0.99, 0.99)
    locations[2] = np.random.default_rng(0).uniform(-1, 1, (N_LEVELS, 2, 2))
    locations[2, -1, -1] = (-0.99, 0.99)  # the last location is never read: not counted
    expected = len({(int((x + 1) * 4), int((y + 1) * 4)) for x, y in locations[2].reshape(-1, 2)[:-1]})
    assert distinct_cells(locations).tolist() == [1, 2, expected]
    assert distinct_cells(locations, grid=1).tolist() == [1, 1, 1]


@pytest.mark.parametrize("rule", ["ink", "random"])
def test_warm_start_episodes_are_what_the_env_shows_in_local_match(episodes, rule):
    from policies.darp.module import DARPModule
    from policies.darp.warm_start import FixedRuleEpisodes

    data = with_local_grids(episodes)
    G, B = 2, 3
    config = EnvConfig(n_glimpses=G, match="local")
    fixed = FixedRuleEpisodes(data, config, rule, seed=1)
    rows = torch.tensor([4, 0, 7])
    module = DARPModule(observation_space=observation_space(config, data.dim, data.local_shape),
                        action_space=action_space(data.dim), model_config={"hidden": 16, "glimpse_hidden": 8})
    batch = fixed.batch(rows, module)
    chosen = FixedRuleEpisodes(data, config, rule, seed=1).locations(rows).reshape(B, -1, 2)
    env = SketchRetrievalVectorEnv(config, B, data)
    obs, _ = env.reset(options={"sketch_index": rows.numpy()})
    for t in range(N_LEVELS * G):
        for key, value in obs.items():
            np.testing.assert_allclose(value, batch["obs"][key][:, t].numpy(), atol=1e-6, err_msg=f"{key} at step {t}")
        if t + 1 < N_LEVELS * G:
            obs, *_ = env.step({"location": chosen[:, t + 1].numpy(), "query": np.zeros((B, data.dim), np.float32)})
    out = module.forward_train(batch)  # the glimpse network reads the local observation
    assert out["query"].shape == (B, N_LEVELS * G, data.dim) and module.glimpse_net.local is not None


@pytest.fixture(scope="module")
def local_setup(tmp_path_factory):
    """A generated data set, a tiny real phase 1 with 8-d local descriptors (4 x 4 grids at 32 px) and an untrained
    DARP run in local match saved as `darp train` saves it."""
    from sketch_env.data.generate import generate_dataset
    from tests.rl_fixtures import make_phase1_run, save_untrained_run

    root = tmp_path_factory.mktemp("local")
    data = generate_dataset(root / "data", n_photos=10, sketches_per_photo=2, seed=0, test_fraction=0.2)
    phase1 = make_phase1_run(root, data, local_dim=8)
    run = save_untrained_run(root / "darp", data, phase1, match="local", n_glimpses=2, local_weight=0.5)
    return data, phase1, run


def test_the_match_mode_round_trips_through_run_json(local_setup):
    from policies.running.trained import env_options, read_run, run_spaces, train_config

    data, phase1, run_dir = local_setup
    run = read_run(run_dir)
    cfg = train_config(run, run_dir)
    assert (cfg.match, cfg.local_weight, cfg.locator_return) == ("local", 0.5, "level")
    options = env_options(run)
    assert (options["match"], options["local_weight"], options["n_glimpses"]) == ("local", 0.5, 2)
    obs_space, _ = run_spaces(run)
    assert obs_space["descriptor"].shape == (8,) and obs_space["cell_ink"].shape == (16,)


def test_evaluate_and_play_follow_the_run_and_dense_matching_costs_more(local_setup, tmp_path, capsys, monkeypatch):
    import io
    import sys

    from tune_runs.cli import main

    data, phase1, run_dir = local_setup

    def evaluate(name, *flags):
        assert main(["evaluate", "--data", str(data), "--run", str(run_dir), "--split", "test",
                     "--out", str(tmp_path / name), *flags]) == 0
        return json.loads((tmp_path / name / "metrics.json").read_text())

    own = evaluate("own")
    assert own["match"] == "local" and own["cost_per_photo"] == 16 + 2 * 9 * 8 and own["local_weight"] == 0.5
    dense = evaluate("dense", "--match", "dense")
    assert dense["match"] == "dense" and dense["cost_per_photo"] == 16 + 16 * 9 * 8
    noisy = evaluate("noisy", "--noise-strokes", "2", "--locator", "ink")
    assert noisy["noise_strokes"] == 2 and noisy["locator"] == "ink"
    capsys.readouterr()
    assert main(["evaluate", "--data", str(data), "--run", str(run_dir), "--out", str(tmp_path / "g"),
                 "--match", "global"]) == 1
    assert "evaluate it with --match local or dense" in capsys.readouterr().err
    # the triplet network with fixed-rule glimpses in local match
    assert main(["evaluate", "--data", str(data), "--run", str(phase1), "--split", "test", "--out", str(tmp_path / "t"),
                 "--match", "local", "--locator", "ink", "--n-glimpses", "2"]) == 0
    triplet = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert triplet["fovea_on_ink"] == 1.0 and triplet["match"] == "local" and triplet["n_glimpses"] == 2
    assert main(["evaluate", "--data", str(data), "--run", str(phase1), "--out", str(tmp_path / "t2"), "--match", "local"]) == 1
    assert "no locator of its own" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["play", "--data", str(data), "--embedding", str(phase1), "--policy", str(run_dir), "--split", "test",
                 "--max-steps", "3", "--out", str(tmp_path / "play")]) == 0
    assert "34 steps" in capsys.readouterr().out  # its env: 17 levels x 2 glimpses, from run.json


def test_live_retrieval_ranks_as_evaluate_in_local_match(local_setup):
    """The server's engine on the test sketches cut at the env's levels gives `darp evaluate`'s ranks."""
    from policies.darp.rollout import LiveRetrieval
    from sketch_env.data import load_dataset, select_split
    from sketch_env.render import level_cut_points
    from policies.running.trained import evaluate_policy_run, live_retrieval

    data, phase1, run_dir = local_setup
    split = select_split(load_dataset(data), "test")
    retrieval = live_retrieval(run_dir, split)
    assert isinstance(retrieval, LiveRetrieval) and retrieval.local_gallery is not None
    evaluated = evaluate_policy_run(run_dir, data, "test")
    for i in range(min(2, len(split.sketches))):
        points = split.sketches.sketch(i)
        levels = retrieval.policy.episode(points, level_cut_points(len(points)))
        target = retrieval.gallery.index_of([split.sketches.photo_id[i]]).repeat(N_LEVELS)
        ranks = retrieval.gallery.rank(torch.stack([lv.query for lv in levels]), target, retrieval.local_term(levels))
        assert ranks.tolist() == evaluated["ranks"][i].tolist(), f"sketch {i}"


@pytest.mark.slow
def test_report_in_local_match_trains_darp_and_adds_the_fixed_rules_and_dense_rows(ray_local, local_setup, tmp_path):
    from policies.running.registry import TrainConfig
    from policies.running.report import ReportConfig, trial_dir
    from tune_runs.report import run

    data, phase1, _ = local_setup
    train = TrainConfig(data=str(data), embedding=str(phase1), run_dir=str(tmp_path / "report"), iterations=1,
                        episodes_per_batch=8, num_envs_per_env_runner=4, n_glimpses=2, match="local", val_interval=1)
    cfg = ReportConfig(train=train, seeds=1, models=("triplet", "triplet-local-ink", "triplet-dense", "ppo", "darp"),
                       split="test", n_traces=2, progress_interval_s=0.0, locators=("ink",), noise_strokes=(2,))
    assert run(cfg) == 0
    text = (tmp_path / "report" / "results.md").read_text()
    for name in ("Triplet network", "Triplet + local match, ink glimpses", "Triplet + dense matching", "DARP-SBIR"):
        assert f"| {name} |" in text
    assert "Triplet + PPO" not in text  # it reads the phase-1 features only
    assert "## Cost of a query" in text and "| DARP-SBIR | local | 160 |" in text
    locator = text.split("## Locator value")[1].split("##")[0]
    assert "dense (every cell)" in locator
    done = json.loads((trial_dir(tmp_path / "report", "darp", 0) / "done.json").read_text())
    assert done["match"] == "local" and "dense" in done and set(done["noise"]) == {"2"}
    run_json = json.loads((trial_dir(tmp_path / "report", "darp", 0) / "run" / "run.json").read_text())
    assert run_json["config"]["match"] == "local" and run_json["config"]["locator_return"] == "level"
