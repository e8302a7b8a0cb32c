"""The batched EnvRunner path (policies.darp.env_runner, policies.darp.connectors) samples the same episodes as
RLlib's default SingleAgentEnvRunner and connector pipelines, for DARP and the baselines that share
its algorithm."""

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

from policies.darp.connectors import BatchedEnvToModule, BatchedModuleToEnv, batched_connectors
from policies.darp.env_runner import DARPEnvRunner, _native

pytestmark = pytest.mark.slow

ALGOS = ["darp", "bdqn", "darp-no-attention", "vanilla-pg"]


def _config(data, phase1, algo="darp", **kw):
    from policies.running.registry import TrainConfig, build_algo_config

    base = dict(data=str(data), embedding=str(phase1), run_dir="unused", algo=algo, num_envs_per_env_runner=4,
                episodes_per_batch=4, n_glimpses=2, val_interval=0, seed=3)
    return build_algo_config(TrainConfig(**(base | kw)))


def _default_pipeline(config):
    config.env_runners(env_runner_cls=SingleAgentEnvRunner)
    config._env_to_module_connector = config._module_to_env_connector = None
    config.add_default_connectors_to_env_to_module_pipeline = True
    config.add_default_connectors_to_module_to_env_pipeline = True
    return config


def _runner(config, like=None):
    runner = (config.env_runner_cls or SingleAgentEnvRunner)(config=config)
    if like is not None:
        runner.module.set_state(like.module.get_state())
    return runner


def _same(a, b, where):
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
    np.testing.assert_array_equal(a, b, err_msg=where)


def assert_same_episodes(got, expected):
    assert len(got) == len(expected)
    for n, (e, d) in enumerate(zip(got, expected)):
        where = f"episode {n}"
        assert len(e) == len(d) and e.t_started == d.t_started and e.t == d.t, where
        assert (e.is_terminated, e.is_truncated, e.is_numpy) == (d.is_terminated, d.is_truncated, d.is_numpy), where
        _same(e.get_observations(), d.get_observations(), f"{where} obs")
        _same(e.get_actions(), d.get_actions(), f"{where} actions")
        _same(e.get_rewards(), d.get_rewards(), f"{where} rewards")
        infos_e, infos_d = e.get_infos(), d.get_infos()
        assert len(infos_e) == len(infos_d) == len(e) + 1
        for t, (ie, id_) in enumerate(zip(infos_e, infos_d)):
            _same(_native(ie), _native(id_), f"{where} infos[{t}]")  # the bulk runner's are Python scalars
        assert sorted(e.extra_model_outputs) == sorted(d.extra_model_outputs), where
        for k in d.extra_model_outputs:
            _same(e.get_extra_model_outputs(k), d.get_extra_model_outputs(k), f"{where} {k}")


@pytest.mark.parametrize("algo", ALGOS)
def test_bulk_runner_samples_the_default_pipelines_episodes(ray_local, tiny, algo):
    data, phase1 = tiny
    default = _runner(_default_pipeline(_config(data, phase1, algo)))
    fast = _runner(_config(data, phase1, algo), like=default)
    assert type(fast) is DARPEnvRunner and fast.bulk_sampling()
    torch.manual_seed(0)
    expected = default.sample(num_episodes=4)
    torch.manual_seed(0)
    got = fast.sample(num_episodes=4)
    assert_same_episodes(got, expected)
    assert all(len(e) == 17 * 2 for e in got)
    assert fast.get_metrics()["num_env_steps_sampled"] == default.get_metrics()["num_env_steps_sampled"]
    if algo == "darp":
        columns = set(got[0].extra_model_outputs)
        assert {"head", "bootstrap_mask", "location_sample", Columns.ACTION_LOGP, Columns.STATE_OUT} <= columns


@pytest.mark.parametrize("algo", ["darp", "vanilla-pg"])
def test_batched_connectors_in_rllibs_loop_match_the_default_pipelines(ray_local, tiny, algo):
    """The per-step path (sample(num_timesteps=...), episodes cut between calls) with the batched connectors."""
    data, phase1 = tiny
    default = _runner(_default_pipeline(_config(data, phase1, algo)))
    config = batched_connectors(_default_pipeline(_config(data, phase1, algo)))
    fast = _runner(config, like=default)
    assert [type(c) for c in fast._env_to_module.connectors] == [BatchedEnvToModule]
    assert [type(c) for c in fast._module_to_env.connectors] == [BatchedModuleToEnv]
    for calls in ([dict(num_episodes=4)], [dict(num_timesteps=50), dict(num_timesteps=50), dict(num_timesteps=60)]):
        torch.manual_seed(1)
        expected = [e for kw in calls for e in default.sample(**kw)]
        torch.manual_seed(1)
        got = [e for kw in calls for e in fast.sample(**kw)]
        assert_same_episodes(got, expected)


def test_each_sample_call_draws_new_sketches(ray_local, tiny):
    """RLlib re-seeds the env at every sample(num_episodes=...) call; DARPEnvRunner seeds it once."""
    data, phase1 = tiny
    runner = _runner(_config(data, phase1))
    first = [e.get_infos(0)["sketch_id"] for e in runner.sample(num_episodes=4)]
    later = [[e.get_infos(0)["sketch_id"] for e in runner.sample(num_episodes=4)] for _ in range(3)]
    assert any(ids != first for ids in later)


def test_train_with_two_remote_env_runners(ray_local, tiny, tmp_path):
    from policies.running.fit import train
    from policies.running.registry import TrainConfig

    data, phase1 = tiny
    cfg = TrainConfig(data=str(data), embedding=str(phase1), run_dir=str(tmp_path / "r2"), iterations=1,
                      num_env_runners=2, num_envs_per_env_runner=2, episodes_per_batch=4, n_glimpses=2,
                      val_interval=0, keep_best=False)
    val = train(cfg)
    assert val["n_sketches"] > 0
