"""SketchRetrievalEnv on a small synthetic data set and embedding export (no pretraining needed)."""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import sketch_env  # noqa: F401  (registers SketchRetrieval-v0)
from sketch_env.data import DataError
from sketch_env.embedding_export import load_embedding_export, save_embedding_export
from sketch_env.env import EnvConfig, SketchRetrievalEnv
from sketch_env.episodes import load_episode_data
from sketch_env.glimpse import extract_glimpses
from sketch_env.render import N_LEVELS
from sketch_env.rewards import best_rank_reward, eta, rank_gain_reward, threshold_reward
from sketch_env.synthetic import DIM, G, SKETCHES_PER_PHOTO


def random_action(env, rng: np.random.Generator) -> dict[str, np.ndarray]:
    dim = env.action_space["query"].shape[0]
    return {
        "location": rng.uniform(-1, 1, 2).astype(np.float32),
        "query": np.clip(rng.normal(0, 0.4, dim), -1, 1).astype(np.float32),
    }


# ---- episode data ----------------------------------------------------------------------------


def test_episode_data_matches_the_split(episodes, synthetic):
    s = len(episodes)
    # select_split("train") holds out 20% of the photos (2 of 10) with their sketches
    assert len(episodes.gallery) == 8 and s == 8 * SKETCHES_PER_PHOTO
    assert episodes.images.shape == (s, N_LEVELS, 64, 64) and episodes.images.dtype == torch.uint8
    assert set(torch.unique(episodes.images).tolist()) == {0, 1}
    # partial sketches only gain ink, and the last level has some
    assert bool((episodes.images[:, 1:] >= episodes.images[:, :-1]).all()) and episodes.images[:, -1].sum() > 0
    assert episodes.sketch_embedding.shape == (s, N_LEVELS, DIM)
    assert list(episodes.gallery.photo_ids[episodes.target_index.numpy()]) == list(episodes.photo_id)
    assert episodes.thumbnails.shape == (8, 64, 64, 3) and episodes.thumbnails.dtype == np.uint8
    expected = episodes.gallery.rank(episodes.sketch_embedding[:, 5], episodes.target_index)
    assert torch.equal(episodes.phase1_rank[:, 5], expected)
    # the synthetic embeddings get closer to the photo as the sketch completes
    assert episodes.phase1_rank[:, -1].float().mean() < episodes.phase1_rank[:, 0].float().mean()


def test_missing_sketch_embedding_is_a_data_error(synthetic, tmp_path):
    data, run = synthetic
    export = load_embedding_export(run)
    save_embedding_export(tmp_path / "partial", export.subset_sketches(np.arange(len(export.sketch_id)) != 0))
    with pytest.raises(DataError, match="no sketch embedding for 1 sketch"):
        load_episode_data(data, tmp_path / "partial", split="all")


# ---- the gymnasium contract ------------------------------------------------------------------


def test_check_env_passes_without_warnings(synthetic):
    data, run = synthetic
    env = gymnasium.make("SketchRetrieval-v0", data=data, embedding=run, n_glimpses=G)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)


def test_spaces(episodes):
    env = SketchRetrievalEnv(EnvConfig(n_glimpses=5), episodes)
    obs_space = env.observation_space
    assert obs_space["glimpse"].shape == (3, 8, 8) and obs_space["glimpse"].dtype == np.float32
    assert obs_space["level"].n == N_LEVELS and obs_space["glimpse_index"].n == 5
    assert obs_space["sketch_embedding"].shape == (DIM,)
    assert env.action_space["location"].shape == (2,) and env.action_space["query"].shape == (DIM,)
    hidden = SketchRetrievalEnv(EnvConfig(observe_sketch_embedding=False), episodes)
    assert "sketch_embedding" not in hidden.observation_space.spaces
    assert "sketch_embedding" not in hidden.reset(seed=0)[0]


def test_an_episode_walks_17_levels_of_g_glimpses(episodes):
    env = SketchRetrievalEnv(EnvConfig(n_glimpses=G), episodes)
    rng = np.random.default_rng(0)
    obs, info = env.reset(seed=3)
    s = int(np.flatnonzero(episodes.sketch_id == info["sketch_id"])[0])
    assert (obs["level"], obs["glimpse_index"]) == (0, 0) and np.array_equal(obs["location"], [0, 0])
    assert np.allclose(obs["sketch_embedding"], episodes.sketch_embedding[s, 0].numpy())
    assert info["photo_id"] == episodes.photo_id[s]
    assert (info["sketch_index"], info["target_index"]) == (s, int(episodes.target_index[s]))
    for t in range(N_LEVELS * G):
        assert obs in env.observation_space
        action = random_action(env, rng)
        obs, reward, terminated, truncated, info = env.step(action)
        assert (info["level"], info["glimpse_index"]) == divmod(t, G)
        assert info["rank"] == int(episodes.gallery.rank(action["query"][None], episodes.target_index[s : s + 1])[0])
        assert info["percentile"] == pytest.approx((8 - info["rank"]) / 7)
        assert "target_index" not in obs and not truncated
        assert terminated == (t == N_LEVELS * G - 1)
        # the next glimpse is read at the chosen location on the next step's level
        nxt = min(t + 1, N_LEVELS * G - 1)
        assert (obs["level"], obs["glimpse_index"]) == divmod(nxt, G)
        image = episodes.images[s, nxt // G][None].float()
        expected = extract_glimpses(image, torch.from_numpy(action["location"])[None])[0].numpy()
        assert np.array_equal(obs["glimpse"], expected.clip(0, 1))  # the env clamps float error off [0, 1]
        assert np.array_equal(obs["location"], action["location"])
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(random_action(env, rng))


def test_reset_seed_repeats_runs_exactly(episodes):
    def run(env):
        rng = np.random.default_rng(7)
        out = []
        for episode in range(3):
            obs, info = env.reset(seed=11) if episode == 0 else env.reset()
            out.append((info["sketch_id"], obs["glimpse"].copy()))
            for _ in range(10):
                obs, reward, *_ , info = env.step(random_action(env, rng))
                out.append((reward, info["rank"], obs["glimpse"].copy()))
        return out

    env = SketchRetrievalEnv(EnvConfig(n_glimpses=G, reward="best_rank"), episodes)
    first, second = run(env), run(env)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    sketches = {run_item[0] for run_item in first if isinstance(run_item[0], str)}
    assert len(sketches) > 1  # unseeded resets draw further sketches from the seeded RNG


def test_sequential_order_and_chosen_sketch(episodes):
    env = SketchRetrievalEnv(EnvConfig(sketch_order="sequential"), episodes)
    ids = [env.reset(seed=0 if i == 0 else None)[1]["sketch_id"] for i in range(len(episodes) + 2)]
    assert ids == list(episodes.sketch_id) + list(episodes.sketch_id[:2])
    assert env.reset(options={"sketch_index": 5})[1]["sketch_id"] == episodes.sketch_id[5]
    with pytest.raises(ValueError, match="sketch_index"):
        env.reset(options={"sketch_index": len(episodes)})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"sketch": 1})


# ---- bad actions -----------------------------------------------------------------------------


def _good(dim=DIM):
    return {"location": np.zeros(2, np.float32), "query": np.zeros(dim, np.float32)}


@pytest.mark.parametrize(
    "action, message",
    [
        ({**_good(), "location": np.array([np.nan, 0.0])}, r"action\['location'\] must be finite, got nan"),
        ({**_good(), "query": np.full(DIM, np.inf)}, r"action\['query'\] must be finite"),
        ({**_good(), "location": np.zeros(3)}, r"action\['location'\] must have shape \(2,\), got \(3,\)"),
        ({**_good(), "query": np.zeros((1, DIM))}, r"action\['query'\] must have shape \(8,\), got \(1, 8\)"),
        ({**_good(), "location": np.array([0.0, 1.5])}, r"action\['location'\] must lie in \[-1, 1\], got 1.5 at index \(1,\)"),
        ({**_good(), "query": np.full(DIM, -1.001)}, r"action\['query'\] must lie in \[-1, 1\].*8 value\(s\)"),
        ({"location": np.zeros(2)}, r"exactly the keys \['location', 'query'\], got \['location'\]"),
        ({**_good(), "extra": 1}, r"exactly the keys"),
        ({**_good(), "query": np.array(["a"] * DIM)}, r"action\['query'\] must be numbers"),
        (np.zeros(2 + DIM), r"action must be a dict"),
    ],
)
def test_bad_actions_get_clear_errors(episodes, action, message):
    env = SketchRetrievalEnv(EnvConfig(n_glimpses=G), episodes)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(action)


def test_actions_within_tolerance_are_clipped(episodes):
    env = SketchRetrievalEnv(EnvConfig(n_glimpses=G), episodes)
    env.reset(seed=0)
    obs, *_ = env.step({"location": np.array([1 + 5e-7, -1 - 5e-7]), "query": np.zeros(DIM)})
    assert np.array_equal(obs["location"], np.array([1.0, -1.0], np.float32))


# ---- rewards ---------------------------------------------------------------------------------


def test_eta_schedule_matches_the_paper():
    assert eta(0) == pytest.approx(1 / (1 + np.exp(-2.0)))  # 0.881
    assert eta(100) == pytest.approx(1 / (1 + np.exp(-0.02 * 100 - 2)))
    assert eta(0, alpha=0.1, beta=3.0) == pytest.approx(1 / (1 + np.exp(3.0)))
    assert eta(50) < eta(100) < 1.0


def test_threshold_reward():
    rank = torch.tensor([1, 2, 4, 5])
    assert threshold_reward(rank, 0.25).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert threshold_reward(rank, eta(0)).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_best_rank_reward_counts_ties_and_keeps_the_minimum():
    reward, best = best_rank_reward(torch.tensor([3, 3, 5, 1]), torch.tensor([11, 3, 4, 2], dtype=torch.int32))
    assert reward.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert best.tolist() == [3, 3, 4, 1] and best.dtype == torch.int32


def test_rank_gain_reward():
    got = rank_gain_reward(torch.tensor([0.5, 0.25, 1.0]), torch.tensor([0.25, 0.5, 1.0]))
    assert got.tolist() == [0.25, -0.25, 0.0] and got.dtype == torch.float64


def test_rank_gain_return_telescopes_to_last_minus_phase1(episodes):
    env = SketchRetrievalEnv(EnvConfig(n_glimpses=G, reward="rank_gain"), episodes)
    rng = np.random.default_rng(1)
    _, info = env.reset(seed=5)
    s = int(np.flatnonzero(episodes.sketch_id == info["sketch_id"])[0])
    start = float(episodes.gallery.percentile(episodes.phase1_rank[s, 0]))
    total, terminated = 0.0, False
    while not terminated:
        _, reward, terminated, _, info = env.step(random_action(env, rng))
        total += reward
    assert total == pytest.approx(info["percentile"] - start, abs=1e-6)


def test_threshold_env_follows_the_training_step(episodes):
    env = SketchRetrievalEnv(EnvConfig(n_glimpses=G, reward="threshold", eta_alpha=0.5, eta_beta=5.0), episodes)
    env.reset(seed=0, options={"sketch_index": 0})
    # eta_0 = 1 / (1 + exp(5)) = 0.0067: early on any rank up to 148 pays
    worst = -episodes.gallery.embeddings[episodes.target_index[0]].numpy()
    env.set_training_step(0)
    _, reward, *_ , info = env.step({"location": np.zeros(2), "query": worst})
    assert info["rank"] > 1 and reward == 1.0
    env.set_training_step(100)  # eta ~ 1: only rank 1 pays
    _, reward, *_ = env.step({"location": np.zeros(2), "query": worst})
    assert reward == 0.0


def test_best_rank_memory_persists_across_episodes_until_a_seeded_reset(episodes):
    env = SketchRetrievalEnv(EnvConfig(n_glimpses=1, reward="best_rank"), episodes)
    target = episodes.gallery.embeddings[episodes.target_index[3]].numpy()
    good = {"location": np.zeros(2), "query": target}
    bad = {"location": np.zeros(2), "query": -target}
    env.reset(seed=0, options={"sketch_index": 3})
    assert env.step(bad)[1] == 1.0  # first visit of (sketch 3, level 0)
    assert env.step(good)[1] == 1.0  # level 1: first visit
    env.reset(options={"sketch_index": 3})
    assert env.step(good)[1] == 1.0  # rank 1 ties nothing worse
    assert env.step(bad)[1] == 0.0  # level 1 has seen rank 1
    env.reset(seed=0, options={"sketch_index": 3})
    env.step(good)
    assert env.step(bad)[1] == 1.0  # the seeded reset cleared the memory


# ---- rendering -------------------------------------------------------------------------------


def test_render_shows_sketch_glimpse_squares_and_photos(episodes):
    env = SketchRetrievalEnv(EnvConfig(n_glimpses=G), episodes, render_mode="rgb_array")
    env.reset(seed=0, options={"sketch_index": 2})
    for _ in range(2 * G + 1):
        env.step({"location": np.array([-0.5, 0.5]), "query": episodes.sketch_embedding[2, -1].numpy()})
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    # ink of the partial sketch (black) and the first glimpse square (red) in the sketch panel
    panel = frame[28:284, 8:264]
    assert (panel.sum(-1) == 0).any()
    assert (np.abs(panel.astype(int) - [230, 40, 40]).sum(-1) == 0).any()
    # the target photo's thumbnail is pasted as is
    target = episodes.thumbnails[int(episodes.target_index[2])]
    assert any(np.array_equal(frame[148:212, x : x + 64], target) for x in range(frame.shape[1] - 64))


def test_render_mode_needs_thumbnails(synthetic):
    data, run = synthetic
    bare = load_episode_data(data, run)
    with pytest.raises(ValueError, match="thumbnails"):
        SketchRetrievalEnv(EnvConfig(), bare, render_mode="rgb_array")


def test_unknown_option_is_a_clear_error(synthetic):
    data, run = synthetic
    with pytest.raises(TypeError, match=r"unknown environment option\(s\) \['glimpses'\]"):
        gymnasium.make("SketchRetrieval-v0", data=data, embedding=run, glimpses=3)


# ---- the README snippet ----------------------------------------------------------------------

README_SNIPPET = '''
import gymnasium as gym
import sketch_env  # registers SketchRetrieval-v0

env = gym.make("SketchRetrieval-v0", data="runs/demo/data", embedding="runs/demo/phase1", split="val")
obs, info = env.reset(seed=0)
for t in range(env.unwrapped.episode_length):                    # 17 levels x 12 glimpses
    where = env.action_space["location"].sample()                # your locator goes here
    action = {"location": where, "query": obs["sketch_embedding"]}  # and your query here
    obs, reward, terminated, truncated, info = env.step(action)
    print(f"level {info['level']} glimpse {info['glimpse_index']} rank {info['rank']} reward {reward:+.3f}")
'''


def test_readme_snippet_runs(synthetic, capsys):
    data, run = synthetic
    code = README_SNIPPET.replace("runs/demo/data", data).replace("runs/demo/phase1", run).replace('"val"', '"all"')
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == N_LEVELS * 12
    assert lines[0].startswith("level 0 glimpse 0 rank ") and lines[-1].startswith("level 16 glimpse 11 rank ")


def test_snap_to_ink_puts_every_chosen_glimpse_on_the_sketch(episodes):
    from sketch_env.locators import nearest_ink

    env = SketchRetrievalEnv(EnvConfig(n_glimpses=G, snap_to_ink=True), episodes)
    rng = np.random.default_rng(1)
    obs, info = env.reset(seed=5)
    s = int(np.flatnonzero(episodes.sketch_id == info["sketch_id"])[0])
    for t in range(N_LEVELS * G - 1):
        action = random_action(env, rng)
        obs, *_ = env.step(action)
        image = episodes.images[s, (t + 1) // G]
        snapped = nearest_ink(image[None], torch.from_numpy(action["location"])[None])[0].numpy()
        assert np.allclose(obs["location"], snapped)
        assert obs["glimpse"][0].max() > 0  # the finest patch holds ink
