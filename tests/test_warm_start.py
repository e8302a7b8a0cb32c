"""The supervised warm start (policies.darp.warm_start): its episodes are the env's, and it trains and keeps the best."""

import numpy as np
import pytest
import torch

from policies.darp.supervised import SupervisedObjective
from policies.darp.warm_start import FixedRuleEpisodes, WarmStartConfig, validation_auir, warm_start
from sketch_env.env import EnvConfig, action_space, observation_space
from sketch_env.locators import InkTable, fixed_locations
from sketch_env.render import N_LEVELS
from sketch_env.vector_env import SketchRetrievalVectorEnv


def _module(config: EnvConfig, dim: int, **model_config):
    from policies.darp.module import DARPModule

    return DARPModule(observation_space=observation_space(config, dim), action_space=action_space(dim),
                      model_config={"hidden": 32, "glimpse_hidden": 16, "n_heads": 2, "std": 0.1, **model_config})


@pytest.mark.parametrize("rule,snap", [("ink", False), ("newest-ink", False), ("random", True), ("centre", True)])
def test_episodes_are_what_the_env_shows_at_those_locations(episodes, rule, snap):
    """Stepping the real env with the same locations gives the same observation at every step."""
    G, B = 3, 4
    config = EnvConfig(n_glimpses=G, snap_to_ink=snap)
    fixed = FixedRuleEpisodes(episodes, config, rule, seed=3)
    rows = torch.tensor([0, 2, 5, 1])
    module = _module(config, episodes.dim)
    batch = fixed.batch(rows, module)
    # the locations before snapping (the same draws), which the env snaps itself
    chosen = FixedRuleEpisodes(episodes, EnvConfig(n_glimpses=G), rule, seed=3).locations(rows).reshape(B, -1, 2)
    env = SketchRetrievalVectorEnv(config, B, episodes)
    obs, _ = env.reset(options={"sketch_index": rows.numpy()})
    T = N_LEVELS * G
    for t in range(T):
        for key, value in obs.items():
            np.testing.assert_allclose(value, batch["obs"][key][:, t].numpy(), atol=1e-6, err_msg=f"{key} at step {t}")
        if t + 1 < T:
            action = {"location": chosen[:, t + 1].numpy(), "query": np.zeros((B, episodes.dim), np.float32)}
            obs, *_ = env.step(action)
    if rule in ("ink", "newest-ink") or snap:
        assert (batch["obs"]["glimpse"][:, 1:, 0].flatten(2).amax(-1) > 0).float().mean() > 0.95


def test_ink_table_draws_like_the_rules_on_each_sketch():
    maps = torch.full((2, 6, 6), 255, dtype=torch.uint8)
    maps[0, 1, 1], maps[0, 4, 2], maps[0, 2, 5] = 0, 3, 3  # sketch 0: one pixel at level 0, two at level 3
    maps[1, 5, 5] = 7
    table = InkTable(maps)
    gen = torch.Generator().manual_seed(0)
    sketch = torch.tensor([0] * 200 + [1] * 2)
    level = torch.tensor([9] * 200 + [6, 16])
    newest = table("newest-ink", sketch, level, gen)
    pixels = {tuple(p) for p in ((newest[:200] + 1) * 3 - 0.5).round().long().tolist()}
    assert pixels == {(2, 4), (5, 2)}  # (col, row) of the two level-3 pixels, both drawn
    torch.testing.assert_close(newest[200], torch.zeros(2))  # no ink yet at level 6: the centre
    torch.testing.assert_close(newest[201], torch.tensor([5.5, 5.5]) / 3 - 1)
    ink = table("ink", sketch[:200], torch.full((200,), 2), gen)
    torch.testing.assert_close(ink, torch.tensor([[1.5, 1.5]]).expand(200, 2) / 3 - 1)
    # fixed_locations (one map per row) is the same table
    torch.testing.assert_close(fixed_locations("newest-ink", maps[[1]], torch.tensor([16]), gen), newest[201:])


def test_warm_start_learns_and_keeps_the_best_validation(episodes):
    config = EnvConfig(n_glimpses=2)
    torch.manual_seed(0)
    module = _module(config, episodes.dim, dropout=0.0)
    objective = SupervisedObjective("infonce", episodes.gallery.embeddings.float(), 0.2)
    train = FixedRuleEpisodes(episodes, config, "ink", seed=0)
    val = FixedRuleEpisodes(episodes, config, "ink", seed=1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    history = warm_start(module, train, val, objective, WarmStartConfig(updates=60, eval_every=20, lr=3e-3))
    assert [u for u, _ in history] == [0, 20, 40, 60]
    best = max(a for _, a in history)
    assert best > history[0][1]  # learns (validated on the training sketches here)
    assert validation_auir(module, val) == pytest.approx(best)  # the best is what is kept
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_several_validation_sets_are_averaged(episodes):
    """With clean and noisy validation sets the kept weights are those of the best mean AUIR."""
    config = EnvConfig(n_glimpses=1)
    objective = SupervisedObjective("infonce", episodes.gallery.embeddings.float(), 0.2)
    train = FixedRuleEpisodes(episodes, config, "ink", seed=0)
    first, second = FixedRuleEpisodes(episodes, config, "ink", seed=1), FixedRuleEpisodes(episodes, config, "centre", seed=1)
    torch.manual_seed(0)
    module = _module(config, episodes.dim, dropout=0.0)
    history = warm_start(module, train, [first, second], objective, WarmStartConfig(updates=30, eval_every=10, lr=3e-3))
    best = max(a for _, a in history)
    assert (validation_auir(module, first) + validation_auir(module, second)) / 2 == pytest.approx(best)


def test_warm_start_config_is_checked():
    with pytest.raises(ValueError, match="locator"):
        WarmStartConfig(locator="corner")
    with pytest.raises(ValueError, match="updates"):
        WarmStartConfig(updates=-1)


@pytest.mark.slow
def test_darp_train_warm_starts_then_learns_by_rl(tiny, tmp_path):
    """--warm-start-updates runs before the first RL iteration of a fresh run, in every learner, and
    its figures and time are in that iteration's result."""
    import json

    from policies.running import runs
    from tune_runs.cli import main

    data, embedding = tiny
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(data), "--embedding", str(embedding), "--run-dir", str(run_dir),
                 "--iterations", "2", "--num-envs-per-env-runner", "4", "--episodes-per-batch", "8",
                 "--n-glimpses", "2", "--warm-start-updates", "5", "--warm-start-locator", "newest-ink"]) == 0
    results = [json.loads(line) for line in (runs.trial_dir(run_dir) / "result.json").read_text().splitlines()]
    first, second = results
    assert first["warm_start_update"] in range(6) and 0 < first["warm_start_auir"] <= 100
    assert first["time_this_iter_s"] >= first["warm_start_s"] > 0
    assert "warm_start_s" not in second
    assert runs.read_run(run_dir)["config"]["warm_start_locator"] == "newest-ink"


def test_warm_start_is_refused_for_models_without_darp_networks():
    from policies.running.registry import TrainConfig, with_algo_defaults

    with pytest.raises(ValueError, match="warm-start"):
        with_algo_defaults(TrainConfig(data="d", embedding="e", run_dir="r", algo="ppo", warm_start_updates=10))


@pytest.mark.slow
def test_noisy_copies_are_the_evaluated_noise_re_embedded(tiny, tmp_path):
    """with_noisy_copies adds copies with more ink, embedded by the phase-1 network; noisy_episode_data with
    a seed gives what `darp evaluate --noise-strokes N --noise-seed S` ranks (policies.running.trained.load_run_episodes)."""
    from policies.phase1.embedding import noisy_episode_data
    from policies.darp.warm_start import with_noisy_copies
    from sketch_env.data import load_dataset, select_split
    from sketch_env.episodes import load_episode_data
    from tests.rl_fixtures import make_phase1_run
    from policies.running.trained import load_run_episodes

    data, _ = tiny
    phase1 = make_phase1_run(tmp_path, data)
    clean = load_episode_data(data, phase1, "train", 32)
    joined = with_noisy_copies(clean, data, "train", phase1, copies=2, strokes=4, seed=0, image_size=32)
    S = len(clean)
    assert len(joined) == 3 * S and joined.gallery is clean.gallery
    assert torch.equal(joined.target_index, clean.target_index.repeat(3))
    ink = joined.images[:, -1].flatten(1).sum(1).reshape(3, S).float()
    assert (ink[1] >= ink[0]).all() and ink[2].mean() > ink[1].mean() > ink[0].mean()
    torch.testing.assert_close(joined.sketch_embedding[:S], clean.sketch_embedding)
    assert not torch.allclose(joined.sketch_embedding[S:2 * S], clean.sketch_embedding)
    run = {"kind": "darp", "embedding": str(phase1),
           "config": {"data": str(data), "embedding": str(phase1), "run_dir": "unused", "glimpse_image_size": 32}}
    evaluated = load_run_episodes(run, data, "val", noise_strokes=3, noise_seed=5)
    val = load_episode_data(data, phase1, "val", 32)
    ours = noisy_episode_data(select_split(load_dataset(data), "val"), val.gallery, phase1, 3, 5, 32)
    assert torch.equal(ours.images, evaluated.images)
    torch.testing.assert_close(ours.sketch_embedding, evaluated.sketch_embedding)
