"""DARP throughput: env steps/s sampled under RLlib vs a plain PyTorch loop over the same env and module.

    python benchmarks/bench_darp_throughput.py [--data DIR --embedding RUN] [--envs 16 64] [--runners 0 1 2]
        [--compare-default] [--profile]

Without --data/--embedding it builds a small built-in data set with a synthetic phase-1 export.
The plain loop steps the same SketchRetrievalVectorEnv with the same DARPModule (forward_exploration
per step) and runs the same loss (policies.darp.learner.darp_loss) once per batch of episodes, so the
ratio (plain steps/s / RLlib steps/s, measured back to back in this process) shows what RLlib's
per-step machinery costs. RLlib runs DARPConfig as `darp train` builds it (the batched EnvRunner
and connectors of policies.darp.env_runner / policies.darp.connectors); --compare-default also runs RLlib's
default SingleAgentEnvRunner and connector pipelines. --profile prints where the RLlib sampler with
0 EnvRunners spends its time (cProfile, top functions by own time). The load average is printed:
the figures depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_loop(data: str, embedding: str, num_envs: int, n_glimpses: int, batches: int) -> tuple[float, float]:
    """(env steps/s sampling with the module, updates/s) of a plain PyTorch loop."""
    from ray.rllib.core.columns import Columns

    from policies.darp.learner import darp_loss
    from policies.darp.supervised import TARGET_EMBEDDING
    from policies.darp.module import BOOTSTRAP_MASK, LOCATION_SAMPLE, DARPModule
    from policies.darp.rollout import initial_state
    from sketch_env.vector_env import make_vector_env

    env = make_vector_env({"data": data, "embedding": embedding, "n_glimpses": n_glimpses, "num_envs": num_envs})
    module = DARPModule(observation_space=env.single_observation_space, action_space=env.single_action_space,
                        model_config={"std": 0.2})
    opt = torch.optim.Adam(module.parameters(), lr=3e-4)
    T = env.episode_length
    obs, _ = env.reset(seed=0)
    sample_time = update_time = 0.0
    for _ in range(batches):
        t0 = time.perf_counter()
        state = initial_state(module, num_envs)
        cols = {k: [] for k in ("obs", "loc", "mask", "reward", "target")}
        with torch.no_grad():
            for _ in range(T):
                step_obs = {k: torch.as_tensor(np.asarray(v)).unsqueeze(1) for k, v in obs.items()}  # (B, 1, ...)
                out = module.forward_exploration({Columns.OBS: step_obs, Columns.STATE_IN: state})
                state = out[Columns.STATE_OUT]
                action = {k: v[:, 0].numpy() for k, v in out[Columns.ACTIONS].items()}
                cols["obs"].append(obs)
                cols["loc"].append(out[LOCATION_SAMPLE][:, 0])
                cols["mask"].append(out[BOOTSTRAP_MASK][:, 0])
                obs, reward, term, _, info = env.step(action)
                cols["reward"].append(torch.as_tensor(reward, dtype=torch.float32))
                cols["target"].append(env.unwrapped.episodes.gallery.embeddings[info["target_index"]])
        obs, _ = env.step(action)[0], None  # the NEXT_STEP autoreset step starts new episodes
        t1 = time.perf_counter()
        rewards = torch.stack(cols["reward"], 1)
        returns = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])
        batch_obs = {k: torch.as_tensor(np.stack([o[k] for o in cols["obs"]], 1)) for k in cols["obs"][0]}
        fwd = module.forward_train({Columns.OBS: batch_obs, Columns.STATE_IN: initial_state(module, num_envs)})
        batch = {
            Columns.LOSS_MASK: torch.ones(num_envs, T, dtype=torch.bool),
            Columns.RETURNS_TO_GO: returns,
            TARGET_EMBEDDING: torch.stack(cols["target"], 1),
            LOCATION_SAMPLE: torch.stack(cols["loc"], 1),
            BOOTSTRAP_MASK: torch.stack(cols["mask"], 1),
        }
        loss, _ = darp_loss(fwd, batch, module.std, 0.01, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sample_time += t1 - t0
        update_time += time.perf_counter() - t1
    return batches * num_envs * T / sample_time, batches / update_time


def rllib_loop(data: str, embedding: str, num_envs: int, runners: int, n_glimpses: int, iterations: int,
               profile: bool, default_pipeline: bool = False) -> tuple[float, float]:
    """(env steps/s of RLlib sampling, learner updates/s) over `iterations` DARP training steps.

    default_pipeline: RLlib's SingleAgentEnvRunner with its default connector pipelines instead of
    DARPConfig's batched EnvRunner and connectors (the figure before issue 6).
    """
    from policies.running.registry import TrainConfig, build_algo_config

    cfg = TrainConfig(data=data, embedding=embedding, run_dir="unused", num_env_runners=runners,
                      num_envs_per_env_runner=num_envs, episodes_per_batch=num_envs * max(1, runners),
                      n_glimpses=n_glimpses, val_interval=0)
    config = build_algo_config(cfg)
    if default_pipeline:
        from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

        config.env_runners(env_runner_cls=SingleAgentEnvRunner)
        config._env_to_module_connector = config._module_to_env_connector = None
        config.add_default_connectors_to_env_to_module_pipeline = True
        config.add_default_connectors_to_module_to_env_pipeline = True
    algo = config.build_algo()
    algo.train()  # warm-up
    prof = cProfile.Profile() if profile and runners == 0 else None
    sample_s = update_s = 0.0
    steps = 0
    for _ in range(iterations):
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        episodes, _ = algo._sample_episodes()
        t1 = time.perf_counter()
        if prof:
            prof.disable()
        algo.learner_group.update(episodes=episodes, timesteps={"num_env_steps_sampled_lifetime": 0})
        t2 = time.perf_counter()
        steps += sum(len(e) for e in episodes)
        sample_s += t1 - t0
        update_s += t2 - t1
    algo.stop()
    if prof:
        print(f"--- profile: RLlib sampling, 0 EnvRunners, {num_envs} envs"
              f"{' (default pipeline)' if default_pipeline else ''}, {steps} env steps ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return steps / sample_s, iterations / update_s


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data")
    p.add_argument("--embedding")
    p.add_argument("--envs", type=int, nargs="+", default=[16, 64])
    p.add_argument("--runners", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-glimpses", type=int, default=12)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--compare-default", action="store_true", help="also run RLlib's default EnvRunner pipeline")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process (1: per-step batches)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from policies.running.ray_session import ray_session
    from sketch_env.synthetic import given_or_tiny_setup

    data, embedding, _ = given_or_tiny_setup(args.data, args.embedding, "bench_darp")
    with ray_session():
        compare(args, data, embedding)


def compare(args, data: str, embedding: str) -> None:
    print(f"start: {_load()}")
    print(f"{'what':<34}{'envs':>6}{'env steps/s':>14}{'updates/s':>11}{'plain/RLlib':>13}")
    for B in args.envs:
        sps, ups = plain_loop(data, embedding, B, args.n_glimpses, args.batches)
        print(f"{'plain PyTorch loop':<34}{B:>6}{sps:>14,.0f}{ups:>11.2f}", flush=True)
        variants = [(False, "RLlib")] + ([(True, "RLlib default pipeline")] if args.compare_default else [])
        for r in args.runners:
            for default, name in variants:
                sps_r, ups_r = rllib_loop(data, embedding, B, r, args.n_glimpses, args.batches, args.profile, default)
                print(f"{f'{name}, {r} EnvRunner(s)':<34}{B:>6}{sps_r:>14,.0f}{ups_r:>11.2f}{sps / sps_r:>12.2f}x",
                      flush=True)
    print(f"end: {_load()}")


if __name__ == "__main__":
    main()
