"""Evaluating and acting with trained RL runs (DARP and the RL baselines).

`darp evaluate`, `darp play --policy RUN`, `darp report` and `darp serve` load a run's RLModule from
its RLlib checkpoint here and step the batched environment with `policies.rollout`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sketch_env.data import DataError

MODULE_PATH = Path("learner_group") / "learner" / "rl_module" / "default_policy"


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: not a run directory (no run.json); train one with `darp train` or `darp pretrain`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def load_module(run_dir: str | Path):
    """The trained RLModule of an RL run, in eval mode: from run_dir/best_checkpoint (the best
    validation AUIR, see `darp train --keep-best`) if there is one, else run_dir/checkpoint."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    best = Path(run_dir) / "best_checkpoint"
    path = (best if best.is_dir() else Path(run_dir) / "checkpoint") / MODULE_PATH
    if not path.is_dir():
        raise DataError(f"{run_dir}: no RLModule checkpoint at {path}")
    module = RLModule.from_checkpoint(str(path.resolve()))
    module.eval()
    return module


def load_run_episodes(run: dict, data_dir: str | Path, split: str, noise_strokes: int = 0, noise_seed: int = 0):
    """The episodes of `split` for an RL run: phase-1 embeddings from the run's export, with the
    sketches and photos that changed since it was made re-embedded by its phase-1 network.

    noise_strokes: add this many noise strokes to every sketch (`sketch_env.strokes.add_noise_strokes`,
    seeded by noise_seed); their partial sketches are embedded by the phase-1 network.
    """
    from policies.embedding import embed_sketches, reembedders
    from sketch_env.data import load_dataset, select_split
    from sketch_env.embeddings import gallery_for, load_embedding_export
    from sketch_env.episodes import episode_data, load_episode_data

    if not noise_strokes:
        return load_episode_data(data_dir, run["embedding"], split, **reembedders(run["embedding"], log=print))
    noisy = with_noise_strokes(select_split(load_dataset(data_dir), split), noise_strokes, noise_seed)
    gallery = gallery_for(load_embedding_export(run["embedding"]), noisy.photos, run["embedding"], data_dir,
                          reembedders(run["embedding"], log=print)["embed_photos"])
    return episode_data(noisy, gallery, embed_sketches(run["embedding"], noisy.sketches))


def with_noise_strokes(split, n: int, seed: int):
    """The Dataset `split` with `n` noise strokes added to every sketch (deterministic for `seed`)."""
    import dataclasses

    from sketch_env.strokes import add_noise_strokes

    return dataclasses.replace(split, sketches=add_noise_strokes(split.sketches, n, seed))


def make_env(run: dict, data_dir: str | Path, split: str, num_envs: int, render_mode: str | None = None, episodes=None):
    """The batched env an RL run was trained with, on another data directory/split (on `episodes`
    when given, e.g. from `load_run_episodes`)."""
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
            "episodes": episodes,
        }
    )


def evaluate_policy_run(run_dir: Path, data_dir: Path, split: str, n_traces: int = 6,
                        locator: str = "policy", seed: int = 0, episodes=None) -> dict:
    """Ranks (S, 17) of the deterministic policy on every sketch of `split`, plus glimpse traces.

    locator: "policy" (its own) or a rule of `sketch_env.locators` that chooses every location in
    its place (seeded by `seed`). episodes: the EpisodeData to evaluate on (default:
    `load_run_episodes`, which re-embeds sketches changed since the run's phase-1 export).
    Returns {"ranks", "sketch_id", "n_photos", "fovea_on_ink" (share of chosen glimpses with ink in
    the finest patch; None for a policy that does not look), "extras": {"trace": Trace of the first
    n_traces, ...}}.
    """
    from policies.rollout import FixedLocator, rollout_ranks, run_episodes

    run = read_run(run_dir)
    module = load_module(run_dir)
    looks = bool(getattr(module, "attention", False))
    if locator != "policy" and not looks:
        raise DataError(f"{run_dir}: a {run.get('kind')} run does not choose where to look; --locator needs a policy that looks")
    episodes = episodes if episodes is not None else load_run_episodes(run, data_dir, split)
    env = make_env(run, data_dir, split, num_envs=64, episodes=episodes)
    n = len(env.episodes)
    fixed = FixedLocator(locator, env.episodes, seed) if locator != "policy" else None
    ranks, on_ink = rollout_ranks(module, env, np.arange(n), locator=fixed, with_on_ink=True)
    trace_env = make_env(run, data_dir, split, num_envs=min(n_traces, n), episodes=episodes)
    trace_locator = FixedLocator(locator, trace_env.episodes, seed) if locator != "policy" else None
    trace = run_episodes(module, trace_env, np.arange(min(n_traces, n)), locator=trace_locator)
    return {
        "ranks": ranks,
        "sketch_id": np.asarray(env.episodes.sketch_id),
        "n_photos": len(env.episodes.gallery),
        "fovea_on_ink": on_ink if looks else None,
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
