"""Evaluating and acting with trained RL runs (DARP and the RL baselines).

`darp evaluate`, `darp play --policy RUN`, `darp report` and `darp serve` load a run's RLModule from
its RLlib checkpoint here and step the batched environment with `policies.rollout`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from policies.runs import best_module_dir, read_run

__all__ = ["evaluate_policy_run", "load_module", "load_policy", "make_env", "read_run"]


def load_module(run_dir: str | Path):
    """The trained RLModule of an RL run, in eval mode: the checkpoint with the best validation AUIR
    (else the latest; policies.runs.best_module_dir)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    module = RLModule.from_checkpoint(str(best_module_dir(run_dir).resolve()))
    module.eval()
    return module


def make_env(run: dict, data_dir: str | Path, split: str, num_envs: int, render_mode: str | None = None):
    """The batched env an RL run was trained with, on another data directory/split."""
    from sketch_env.vector_env import make_vector_env

    cfg = run["config"]
    return make_vector_env(
        {
            "data": str(Path(data_dir).resolve()),
            "embedding": run["embedding"],
            "split": split,
            "n_glimpses": cfg["n_glimpses"],
            "reward": cfg["reward"],
            "sketch_order": "sequential",
            "num_envs": num_envs,
        }
    )


def evaluate_policy_run(run_dir: Path, data_dir: Path, split: str, n_traces: int = 6) -> dict:
    """Ranks (S, 17) of the deterministic policy on every sketch of `split`, plus glimpse traces.

    Returns {"ranks", "sketch_id", "n_photos", "extras": {"traces": Trace of the first n_traces}}.
    """
    from policies.rollout import rollout_ranks, run_episodes

    run = read_run(run_dir)
    module = load_module(run_dir)
    env = make_env(run, data_dir, split, num_envs=64)
    n = len(env.episodes)
    ranks = rollout_ranks(module, env, np.arange(n))
    trace_env = make_env(run, data_dir, split, num_envs=min(n_traces, n))
    trace = run_episodes(module, trace_env, np.arange(min(n_traces, n)))
    return {
        "ranks": ranks,
        "sketch_id": np.asarray(env.episodes.sketch_id),
        "n_photos": len(env.episodes.gallery),
        "extras": {"trace": trace, "episodes": trace_env.episodes, "env_config": trace_env.config},
    }


class TrainedPolicy:
    """A trained run acting in a single env (for `darp play`): act(obs, state) -> (action, state)."""

    def __init__(self, run_dir: str | Path):
        self.module = load_module(run_dir)

    def initial_state(self):
        from policies.rollout import initial_state

        return initial_state(self.module, 1)

    def act(self, obs: dict, state):
        import torch
        from ray.rllib.core.columns import Columns

        from policies.rollout import obs_to_batch

        batch = obs_to_batch({k: np.asarray(v)[None] for k, v in obs.items()})
        with torch.no_grad():
            out = self.module.forward_inference({Columns.OBS: batch, Columns.STATE_IN: state})
        action = {k: v[0, 0].numpy() for k, v in out[Columns.ACTIONS].items()}
        return action, out[Columns.STATE_OUT]


def load_policy(run_dir: str | Path) -> TrainedPolicy:
    return TrainedPolicy(run_dir)
