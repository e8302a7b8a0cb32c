"""SketchRetrievalVectorEnv: the same episodes as B single envs, in the form RLlib expects."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from sketch_env.env import EnvConfig, SketchRetrievalEnv
from sketch_env.render import N_LEVELS
from sketch_env.vector_env import SketchRetrievalVectorEnv, make_vector_env
from sketch_env.synthetic import DIM, G

B = 4


def batched_actions(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "location": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
        "query": np.clip(rng.normal(0, 0.4, (n, DIM)), -1, 1).astype(np.float32),
    }


def assert_same(a, b, where: str):
    """Exact equality of nested dicts / arrays / scalars (observations, infos, rewards)."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {a.shape} {a.dtype} != {b.shape} {b.dtype}"
        assert np.array_equal(a, b), f"{where}: {a} != {b}"


@pytest.mark.parametrize("reward", ["rank_gain", "best_rank", "threshold"])
def test_vector_env_equals_b_single_envs(episodes, reward):
    """Against gymnasium's SyncVectorEnv of single envs (NEXT_STEP, sub-env i seeded s + i): the same
    observations, rewards, terminations and infos, masks included, over 2.5 episodes with autoresets."""
    config = EnvConfig(n_glimpses=G, reward=reward)
    vector = SketchRetrievalVectorEnv(config, B, episodes)
    singles = SyncVectorEnv(
        [lambda: SketchRetrievalEnv(config, episodes) for _ in range(B)], autoreset_mode=AutoresetMode.NEXT_STEP
    )
    for env in (vector, singles):
        env.unwrapped.set_training_step(50) if env is vector else singles.call("set_training_step", 50)
    obs_v, info_v = vector.reset(seed=21)
    obs_s, info_s = singles.reset(seed=21)
    assert_same(obs_v, obs_s, "reset obs")
    assert_same(info_v, info_s, "reset info")
    rng = np.random.default_rng(0)
    n_terminated = 0
    for step in range(int(2.5 * N_LEVELS * G)):
        actions = batched_actions(rng, B)
        out_v = vector.step(actions)
        out_s = singles.step(actions)
        for name, a, b in zip(("obs", "reward", "terminated", "truncated", "info"), out_v, out_s):
            assert_same(a, b, f"step {step} {name}")
        n_terminated += int(out_v[2].sum())
    assert n_terminated == 2 * B


def test_autoreset_is_next_step_and_ignores_the_action(episodes):
    vector = SketchRetrievalVectorEnv(EnvConfig(n_glimpses=1), B, episodes)
    assert vector.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    vector.reset(seed=0)
    rng = np.random.default_rng(1)
    for _ in range(N_LEVELS - 1):
        *_, terminated, _, _ = vector.step(batched_actions(rng, B))
        assert not terminated.any()
    obs, reward, terminated, truncated, info = vector.step(batched_actions(rng, B))
    assert terminated.all() and not truncated.any() and info["_rank"].all()
    garbage = {"location": np.full((B, 2), np.nan), "query": np.full((B, DIM), 7.0)}  # ignored: no error
    obs, reward, terminated, truncated, info = vector.step(garbage)
    assert not terminated.any() and np.array_equal(reward, np.zeros(B))
    # as in SyncVectorEnv: no sub-env stepped, so there is no rank; the reset infos are there
    assert "rank" not in info and info["_sketch_id"].all() and np.array_equal(info["level"], np.zeros(B))
    assert np.array_equal(obs["level"], np.zeros(B)) and np.array_equal(obs["location"], np.zeros((B, 2)))
    with pytest.raises(ValueError, match=r"action\['location'\] must be finite.*\(2, 0\)"):
        bad = batched_actions(rng, B)
        bad["location"][2, 0] = np.nan
        vector.step(bad)


def test_spaces_and_fresh_arrays(episodes):
    vector = SketchRetrievalVectorEnv(EnvConfig(n_glimpses=G), B, episodes)
    assert vector.single_observation_space == SketchRetrievalEnv(EnvConfig(n_glimpses=G), episodes).observation_space
    assert vector.observation_space["glimpse"].shape == (B, 3, 8, 8)
    assert vector.action_space["query"].shape == (B, DIM) and vector.single_action_space["query"].shape == (DIM,)
    obs, info = vector.reset(seed=0)
    assert obs in vector.observation_space
    rng = np.random.default_rng(2)
    kept = []
    for _ in range(3 * G):
        obs, reward, terminated, truncated, info = vector.step(batched_actions(rng, B))
        assert obs in vector.observation_space
        kept.append((obs, reward, info, {k: v.copy() for k, v in obs.items()}, reward.copy(), info["rank"].copy()))
    # RLlib keeps views of what step() returned: later steps must not overwrite them
    for obs, reward, info, obs_copy, reward_copy, rank_copy in kept:
        assert all(np.array_equal(obs[k], obs_copy[k]) for k in obs)
        assert np.array_equal(reward, reward_copy) and np.array_equal(info["rank"], rank_copy)
    assert len({id(k[0]["glimpse"]) for k in kept}) == len(kept)


def test_bad_batched_actions(episodes):
    vector = SketchRetrievalVectorEnv(EnvConfig(n_glimpses=G), B, episodes)
    vector.reset(seed=0)
    rng = np.random.default_rng(3)
    wrong = batched_actions(rng, B)
    wrong["query"] = wrong["query"][:, :-1]
    with pytest.raises(ValueError, match=rf"action\['query'\] must have shape \({B}, {DIM}\), got \({B}, {DIM - 1}\)"):
        vector.step(wrong)
    far = batched_actions(rng, B)
    far["query"][3, 5] = -2.0
    with pytest.raises(ValueError, match=r"action\['query'\] must lie in \[-1, 1\], got -2.0 at index \(sub-env, component\) \(3, 5\)"):
        vector.step(far)


def test_sequential_sub_envs_interleave(episodes):
    vector = SketchRetrievalVectorEnv(EnvConfig(n_glimpses=1, sketch_order="sequential"), B, episodes)
    _, info = vector.reset(seed=0)
    seen = list(info["sketch_id"])
    for _ in range(N_LEVELS):
        _, _, _, _, info = vector.step(batched_actions(np.random.default_rng(0), B))
    _, _, _, _, info = vector.step(batched_actions(np.random.default_rng(0), B))  # the autoreset step
    seen += list(info["sketch_id"])
    assert seen == list(episodes.sketch_id[: 2 * B])


def test_make_vector_env_and_make_vec(synthetic):
    data, run = synthetic
    single = make_vector_env({"data": data, "embedding": run, "n_glimpses": G})
    assert isinstance(single, SketchRetrievalEnv)
    vector = make_vector_env({"data": data, "embedding": run, "n_glimpses": G, "num_envs": 3})
    assert isinstance(vector, SketchRetrievalVectorEnv) and vector.num_envs == 3
    with pytest.raises(TypeError, match="unknown environment option"):
        make_vector_env({"data": data, "embedding": run, "num_env": 3})
    made = gymnasium.make_vec("SketchRetrieval-v0", num_envs=2, vectorization_mode="vector_entry_point", data=data, embedding=run)
    assert isinstance(made.unwrapped, SketchRetrievalVectorEnv) and made.num_envs == 2
    obs, _ = made.reset(seed=0)
    assert obs["glimpse"].shape == (2, 3, 8, 8)


@pytest.mark.slow
def test_rllib_env_runner_samples_whole_episodes(synthetic):
    """RLlib's own EnvRunner on the vector_entry_point path: episodes of exactly 17 x G steps, infos per step."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.connectors.env_to_module import FlattenObservations
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
    from ray.tune.registry import register_env

    data, run = synthetic
    register_env("sketch-retrieval-test", make_vector_env)
    config = (
        PPOConfig()
        .environment("sketch-retrieval-test", env_config={"data": data, "embedding": run, "n_glimpses": G})
        .env_runners(
            num_envs_per_env_runner=B,
            gym_env_vectorize_mode="vector_entry_point",
            env_to_module_connector=lambda env, spaces=None, device=None: FlattenObservations(),
        )
    )
    runner = SingleAgentEnvRunner(config=config)
    assert isinstance(runner.env.unwrapped, SketchRetrievalVectorEnv) and runner.num_envs == B
    episodes = runner.sample(num_episodes=2 * B)
    assert [len(e) for e in episodes] == [N_LEVELS * G] * (2 * B)
    infos = episodes[0].get_infos()
    assert "rank" not in infos[0] and all("rank" in info for info in infos[1:])
    assert all(info["sketch_index"] == infos[0]["sketch_index"] for info in infos)
    runner.stop()


def test_reset_on_chosen_sketches_matches_single_envs(episodes):
    chosen = np.array([5, 0, 5, 9])
    vector = SketchRetrievalVectorEnv(EnvConfig(n_glimpses=G), B, episodes)
    obs, info = vector.reset(seed=1, options={"sketch_index": chosen})
    assert list(info["sketch_id"]) == list(episodes.sketch_id[chosen])
    rng = np.random.default_rng(4)
    actions = [batched_actions(rng, B) for _ in range(N_LEVELS * G)]
    steps = [vector.step(a) for a in actions]
    for i in range(B):
        single = SketchRetrievalEnv(EnvConfig(n_glimpses=G), episodes)
        single_obs, _ = single.reset(seed=1 + i, options={"sketch_index": int(chosen[i])})
        assert np.array_equal(single_obs["glimpse"], obs["glimpse"][i])
        for a, (v_obs, v_reward, v_term, _, v_info) in zip(actions, steps):
            s_obs, s_reward, s_term, _, s_info = single.step({k: v[i] for k, v in a.items()})
            assert np.array_equal(s_obs["glimpse"], v_obs["glimpse"][i]) and s_reward == v_reward[i]
            assert s_term == v_term[i] and s_info["rank"] == v_info["rank"][i]
    assert steps[-1][2].all()
    with pytest.raises(ValueError, match=r"sketch_index must be 4 integers"):
        vector.reset(options={"sketch_index": [1, 2]})
    with pytest.raises(ValueError, match=r"sketch_index must be in \[0, 16\)"):
        vector.reset(options={"sketch_index": [0, 1, 2, 16]})
