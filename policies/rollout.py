"""Deterministic rollouts of a recurrent policy over the batched environment, in plain PyTorch.

One loop serves validation during training, `darp evaluate`, `darp play` with a trained run, the
live server and the plain-loop throughput benchmark: it steps a `SketchRetrievalVectorEnv` on a
chosen list of sketches and records, for every sketch and completion level, the rank of the true
photo after the level's last glimpse (the query the user would see when that level is complete).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from ray.rllib.core.columns import Columns

from sketch_env.locators import LOCATORS, fixed_locations
from sketch_env.metrics import retrieval_metrics
from sketch_env.render import N_LEVELS


def obs_to_batch(obs: dict) -> dict[str, torch.Tensor]:
    """Batched numpy observations (B, ...) -> tensors with a time axis (B, 1, ...)."""
    return {k: torch.as_tensor(np.asarray(v)).unsqueeze(1) for k, v in obs.items()}


def initial_state(module, batch_size: int) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v)).unsqueeze(0).repeat(batch_size, *([1] * np.ndim(v)))
            for k, v in module.get_initial_state().items()}


@dataclass
class Trace:
    """What one deterministic episode batch did: ranks per level and where the policy looked.

    ranks: (B, 17) rank after each level's last glimpse; locations: (B, 17, G, 2) glimpse centres;
    queries: (B, 17, D) the query after each level's last glimpse; on_ink: (B,) how many of the
    episode's chosen glimpses (all but the first, which is at the centre) had ink in their finest patch.
    """

    ranks: np.ndarray
    locations: np.ndarray
    queries: np.ndarray
    sketch_index: np.ndarray = field(default=None)
    on_ink: np.ndarray = field(default=None)


class FixedLocator:
    """A rule from `sketch_env.locators` that replaces the policy's locations (the rest of the policy
    acts as trained). Seeded: the same seed draws the same locations for the same episodes."""

    def __init__(self, rule: str, episodes, seed: int = 0):
        if rule not in LOCATORS:
            raise ValueError(f"unknown locator {rule!r}: choose from policy, {', '.join(LOCATORS)}")
        self.rule = rule
        # level maps from the nested partial renders: pixel p is inked at level L iff map[p] <= L
        self.level_maps = (N_LEVELS - episodes.images.sum(1, dtype=torch.int16)).to(torch.uint8)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, sketch_index: np.ndarray, level: np.ndarray) -> np.ndarray:
        maps = self.level_maps.index_select(0, torch.as_tensor(sketch_index, dtype=torch.long))
        return fixed_locations(self.rule, maps, torch.as_tensor(level), self.generator).numpy()


@torch.no_grad()
def run_episodes(module, env, sketch_index: np.ndarray, explore: bool = False,
                 locator: FixedLocator | None = None) -> Trace:
    """Step `env` (a SketchRetrievalVectorEnv) through one episode per sub-env on `sketch_index`.

    len(sketch_index) must equal env.num_envs. The policy acts deterministically unless `explore`.
    locator: a fixed rule that chooses every location instead of the policy.
    """
    B = env.num_envs
    if len(sketch_index) != B:
        raise ValueError(f"need one sketch per sub-env: got {len(sketch_index)} for {B} envs")
    G = env.config.n_glimpses
    T = N_LEVELS * G
    obs, info = env.reset(options={"sketch_index": np.asarray(sketch_index)})
    state = initial_state(module, B)
    ranks = np.zeros((B, N_LEVELS), np.int64)
    locations = np.zeros((B, N_LEVELS, G, 2), np.float32)
    on_ink = np.zeros(B, np.int64)
    queries = None
    forward = module.forward_exploration if explore else module.forward_inference
    for t in range(T):
        out = forward({Columns.OBS: obs_to_batch(obs), Columns.STATE_IN: state})
        state = out[Columns.STATE_OUT]
        action = {k: v[:, 0].numpy() for k, v in out[Columns.ACTIONS].items()}
        if locator is not None:  # the location chosen now is read at step t + 1, on that step's level
            action["location"] = locator(sketch_index, np.full(B, min((t + 1) // G, N_LEVELS - 1)))
        level, glimpse = np.asarray(obs["level"]), np.asarray(obs["glimpse_index"])
        obs, _, _, _, info = env.step(action)
        if t + 1 < T:
            on_ink += np.asarray(obs["glimpse"])[:, 0].reshape(B, -1).max(1) > 0
        locations[np.arange(B), level, glimpse] = action["location"]
        last = glimpse == G - 1
        ranks[last, level[last]] = np.asarray(info["rank"])[last]
        if queries is None:
            queries = np.zeros((B, N_LEVELS, action["query"].shape[-1]), np.float32)
        queries[last, level[last]] = action["query"][last]
    return Trace(ranks, locations, queries, np.asarray(sketch_index), on_ink)


def rollout_ranks(module, env, sketch_index: np.ndarray, locator: FixedLocator | None = None,
                  with_on_ink: bool = False):
    """Ranks (S, 17) for all sketches in `sketch_index`, in chunks of env.num_envs.

    with_on_ink: also return the share of chosen glimpses whose finest patch holds ink.
    """
    B = env.num_envs
    out, ink = [], []
    for start in range(0, len(sketch_index), B):
        chunk = np.asarray(sketch_index[start : start + B])
        padded = np.resize(chunk, B)  # repeat sketches to fill the last chunk
        trace = run_episodes(module, env, padded, locator=locator)
        out.append(trace.ranks[: len(chunk)])
        ink.append(trace.on_ink[: len(chunk)])
    ranks = np.concatenate(out) if out else np.zeros((0, N_LEVELS), np.int64)
    if not with_on_ink:
        return ranks
    chosen = (N_LEVELS * env.config.n_glimpses - 1) * len(ranks)
    return ranks, float(np.concatenate(ink).sum() / max(chosen, 1)) if ink else float("nan")


class PolicyValidator:
    """Evaluates module weights on a fixed split with a vector env built once."""

    def __init__(self, module, env, max_sketches: int = 0):
        self.module = module
        self.env = env
        n = len(env.episodes)
        self.sketch_index = np.arange(n if not max_sketches else min(n, max_sketches))

    @staticmethod
    def from_config(config) -> "PolicyValidator":
        """Build the val env and a local module from an (algorithm) config with env_config."""
        from sketch_env.vector_env import make_vector_env

        env_config = dict(config.env_config)
        env_config.update(split=config.val_split, sketch_order="sequential", num_envs=64)
        env = make_vector_env(env_config)
        spec = config.get_rl_module_spec()
        spec.observation_space = env.single_observation_space
        spec.action_space = env.single_action_space
        module = spec.build()
        module.eval()
        return PolicyValidator(module, env, config.val_max_sketches)

    def evaluate(self, module_state: dict) -> dict:
        self.module.set_state(module_state)
        ranks = rollout_ranks(self.module, self.env, self.sketch_index)
        metrics = retrieval_metrics(ranks, len(self.env.episodes.gallery))
        return {k: v for k, v in metrics.items() if k != "percentile_curve"} | {
            f"percentile_level_{i:02d}": v for i, v in enumerate(metrics["percentile_curve"])
        }
