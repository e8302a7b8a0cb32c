"""`SketchRetrievalVectorEnv`: B episodes of `SketchRetrieval-v0` stepped at once with tensor ops.

Each step makes one glimpse call and one gallery ranking call for the whole batch (the step rule
is `sketch_env.env.EpisodeBatch`, shared with the single env). It plugs into RLlib as a
`vector_entry_point` env (see `make_vector_env`), so it follows what RLlib relies on:
- autoreset NEXT_STEP: a sub-env whose last step terminated is reset on the next step (reward 0,
  not terminated) and its action is ignored;
- reset(seed=s) seeds sub-env i with s + i, the same RNG stream as SketchRetrievalEnv.reset(seed=s + i);
- infos in gymnasium's vector dict form ({"rank": (B,) array, "_rank": (B,) bool mask});
- fresh numpy arrays every step (RLlib keeps views of them);
- the episode length is enforced here (17 x n_glimpses steps): no TimeLimit wrapper is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector.utils import batch_space

from sketch_env.env import (
    EnvConfig,
    EpisodeBatch,
    SketchRetrievalEnv,
    StepsAnEpisodeBatch,
    action_space,
    check_action,
    episodes_for,
    next_sketch,
    observation_space,
)
from sketch_env.episodes import EpisodeData

class SketchRetrievalVectorEnv(StepsAnEpisodeBatch, gymnasium.vector.VectorEnv):
    """B sub-envs of SketchRetrievalEnv in one batch.

    SketchRetrievalVectorEnv(config, num_envs, episodes=None, **options): `options` replace fields
    of `config` (gymnasium.make_vec passes them this way); `episodes` is shared by all sub-envs.
    Each sub-env keeps its own RNG, sequential position and best-rank memory. In sequential order
    sub-env i shows sketches i, i + B, i + 2B, ... (mod S), so together they walk through the set.
    """

    metadata = {"autoreset_mode": gymnasium.vector.AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(
        self,
        config: EnvConfig | None = None,
        num_envs: int = 1,
        episodes: EpisodeData | None = None,
        **options,
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs must be at least 1, got {num_envs}")
        self.config = EnvConfig.from_options(config, options)
        self.episodes = episodes_for(self.config, episodes, thumbnails=False)
        self.num_envs = num_envs
        self.render_mode = None
        self.single_observation_space = observation_space(self.config, self.episodes.dim, self.episodes.local_shape)
        self.single_action_space = action_space(self.episodes.dim)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._batch = EpisodeBatch(self.config, self.episodes, num_envs)
        self._rngs: list[np.random.Generator] | None = None
        self._episodes_begun = np.zeros(num_envs, np.int64)
        self._autoreset = np.zeros(num_envs, bool)
        self._all = torch.arange(num_envs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset every sub-env; seed s seeds sub-env i with s + i and clears all memories.

        options={"sketch_index": (B,) ints} starts sub-env i on sketch sketch_index[i] (evaluation)
        instead of the next sketch of its order.
        """
        options = dict(options or {})
        chosen = options.pop("sketch_index", None)
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; the vector env knows 'sketch_index'")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
            self._rngs = [seeding.np_random(int(seed) + i)[0] for i in range(self.num_envs)]
            self._episodes_begun[:] = 0
            self._batch.forget()
        elif self._rngs is None:
            self._rngs = [seeding.np_random()[0] for _ in range(self.num_envs)]
        if chosen is None:
            self._begin(np.arange(self.num_envs))
        else:
            self._batch.begin(self._all, torch.from_numpy(self._checked_sketch_index(chosen)))
        self._autoreset = np.zeros(self.num_envs, bool)
        zero = torch.zeros(self.num_envs, dtype=torch.long)
        return self._batch.observation(), self._vector_infos(self._batch.infos(self._all, zero, zero), None)

    def _checked_sketch_index(self, chosen) -> np.ndarray:
        chosen = np.asarray(chosen)
        n = len(self.episodes)
        if chosen.shape != (self.num_envs,) or chosen.dtype.kind not in "iu":
            raise ValueError(f"sketch_index must be {self.num_envs} integers (one per sub-env), got {chosen.dtype} {chosen.shape}")
        if chosen.min() < 0 or chosen.max() >= n:
            raise ValueError(f"sketch_index must be in [0, {n}), got values in [{chosen.min()}, {chosen.max()}]")
        return chosen.astype(np.int64)

    def step(self, actions: Mapping[str, np.ndarray]):
        stepping = ~self._autoreset
        location, query = check_action(actions, self.episodes.dim, self.num_envs, stepping)
        rows = np.flatnonzero(stepping)
        rewards = np.zeros(self.num_envs, np.float64)
        terminated = np.zeros(self.num_envs, bool)
        level = torch.zeros(self.num_envs, dtype=torch.long)
        glimpse_index = torch.zeros(self.num_envs, dtype=torch.long)
        stepped = None
        if len(rows):
            index = torch.from_numpy(rows)
            result = self._batch.step(index, torch.from_numpy(location[rows]), torch.from_numpy(query[rows]))
            rewards[rows] = result.reward.numpy()
            terminated[rows] = result.terminated.numpy()
            level.index_copy_(0, index, result.level)
            glimpse_index.index_copy_(0, index, result.glimpse_index)
            stepped = (rows, result)
        resetting = np.flatnonzero(self._autoreset)
        if len(resetting):
            self._begin(resetting)
        infos = self._vector_infos(self._batch.infos(self._all, level, glimpse_index), stepped)
        self._autoreset = terminated.copy()
        return self._batch.observation(), rewards, terminated, np.zeros(self.num_envs, bool), infos

    def _begin(self, rows: np.ndarray) -> None:
        """Start new episodes in sub-envs `rows`, each on the next sketch of its own order."""
        sketches = []
        for i in rows:
            position = i + self._episodes_begun[i] * self.num_envs
            sketches.append(next_sketch(self.config.sketch_order, self._rngs[i], int(position), len(self.episodes)))
            self._episodes_begun[i] += 1
        self._batch.begin(torch.from_numpy(rows), torch.tensor(sketches, dtype=torch.long))

    def _vector_infos(self, infos: dict[str, np.ndarray], stepped) -> dict[str, np.ndarray]:
        """Gymnasium's vector info form: every key with a "_key" mask of the sub-envs that have it.

        stepped: (rows, StepResult) of the sub-envs that took a step this call (their rank and
        percentile are set; reset sub-envs get 0 there, masked out), or None when none did (after
        reset(), or when all were autoreset): then there is no "rank" key, as in SyncVectorEnv.
        """
        out: dict[str, Any] = {}
        for key, value in infos.items():
            out[key], out[f"_{key}"] = value, np.ones(self.num_envs, bool)
        if stepped is not None:
            rows, result = stepped
            mask = np.zeros(self.num_envs, bool)
            mask[rows] = True
            rank = np.zeros(self.num_envs, np.int64)
            percentile = np.zeros(self.num_envs, np.float64)
            rank[rows] = result.rank.numpy()
            percentile[rows] = result.percentile.numpy()
            out["rank"], out["_rank"] = rank, mask
            out["percentile"], out["_percentile"] = percentile, mask.copy()
        return out


def make_vector_env(config: Mapping[str, Any]) -> gymnasium.vector.VectorEnv | gymnasium.Env:
    """Env creator for `ray.tune.registry.register_env`: a plain dict of EnvConfig fields.

    With a "num_envs" key (RLlib's gym_env_vectorize_mode="vector_entry_point" adds it) returns a
    SketchRetrievalVectorEnv of that many sub-envs, otherwise one SketchRetrievalEnv.
    """
    options = dict(config)
    num_envs = options.pop("num_envs", None)
    if num_envs is None:
        return SketchRetrievalEnv(**options)
    return SketchRetrievalVectorEnv(num_envs=int(num_envs), **options)
