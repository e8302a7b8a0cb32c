"""`DARPEnvRunner`: a SingleAgentEnvRunner that samples complete episodes in bulk.

Why: with a batched VectorEnv, RLlib's SingleAgentEnvRunner still does per sub-env work every step
(unbatch observations and actions, add_env_step into each episode, callbacks), which costs more
than the module's forward pass. For `sample(num_episodes=n)` (how DARP samples) this runner keeps
every step batched (observations, actions, module outputs, rewards as (B, ...) arrays), steps the
env with the whole batch and cuts the finished episodes out of the stacked arrays at the end, as
numpy episodes with the same observations, actions, rewards, infos (as Python scalars, see `_native`)
and extra model outputs (STATE_OUT included) as the default loop produces (tests/test_connectors.py
compares them).

The bulk path needs what makes it equivalent: the batched connectors of policies.darp.connectors as the
only env-to-module / module-to-env pieces (it does their work inline), episodes_to_numpy, no
episode callbacks. Any other call (num_timesteps, random actions, other connectors) runs
RLlib's loop unchanged.

It also seeds the env once per env (RLlib passes the config's seed to every reset that follows a
sample(num_episodes=...) call, so every iteration would replay the same sketches in the same order).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import tree
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.core.columns import Columns
from ray.rllib.env.env_runner import ENV_STEP_FAILURE
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from policies.darp.connectors import BatchedEnvToModule, BatchedModuleToEnv, to_numpy as _numpy

_EPISODE_CALLBACKS = ("on_episode_created", "on_episode_start", "on_episode_step", "on_episode_end")


def _stack(items: list, axis: int = 1):
    """A list (over steps) of batched structs -> one struct of arrays (B, steps, ...) (axis=1)."""
    first = items[0]
    if isinstance(first, dict) and all(isinstance(v, np.ndarray) for v in first.values()):
        return {k: np.stack([x[k] for x in items], axis=axis) for k in first}
    return tree.map_structure(lambda *xs: np.stack(xs, axis=axis), *items)


def _native(info: dict) -> dict:
    """An info dict with numpy scalars turned into Python scalars (the same values).

    Why: RLlib ships episodes from remote EnvRunners by pickling them, and a numpy scalar pickles
    through its dtype's reduce; per-step infos of numpy scalars were about 90% of the time to
    serialise a batch of episodes, though under 6% of its bytes."""
    return {k: v.item() if isinstance(v, np.generic) else _native(v) if isinstance(v, dict) else v
            for k, v in info.items()}


class DARPEnvRunner(SingleAgentEnvRunner):
    """SingleAgentEnvRunner with a batched path for complete episodes (see the module docstring)."""

    def __init__(self, *, config, **kwargs):
        self._env_seeded = False
        super().__init__(config=config, **kwargs)
        self._bulk = None

    @override(SingleAgentEnvRunner)
    def make_env(self) -> None:
        self._env_seeded = False
        super().make_env()

    @override(SingleAgentEnvRunner)
    def _reset_envs(self, episodes, shared_data, explore):
        if self._env_seeded:
            self._needs_initial_reset = False  # seed=None: the env's RNGs go on
        self._env_seeded = True
        super()._reset_envs(episodes, shared_data, explore)

    def bulk_sampling(self) -> bool:
        """True when sample(num_episodes=...) takes the batched path."""
        if self._bulk is None:
            e2m = list(getattr(self._env_to_module, "connectors", []))
            m2e = list(getattr(self._module_to_env, "connectors", []))
            self._bulk = bool(
                self.module is not None
                and self.env is not None
                and self.episodes_to_numpy
                and len(e2m) == 1 and type(e2m[0]) is BatchedEnvToModule
                and len(m2e) == 1 and type(m2e[0]) is BatchedModuleToEnv
                and all(type(cb) is RLlibCallback for cb in self._callbacks)
                and not any(getattr(self.config, f"callbacks_{name}", None) for name in _EPISODE_CALLBACKS)
            )
        return self._bulk

    @override(SingleAgentEnvRunner)
    def _sample(self, *, num_timesteps=None, num_episodes=None, explore, random_actions=False, force_reset=False):
        if num_episodes is None or random_actions or not self.bulk_sampling():
            return super()._sample(num_timesteps=num_timesteps, num_episodes=num_episodes, explore=explore,
                                   random_actions=random_actions, force_reset=force_reset)
        episodes, ts = [], 0
        while len(episodes) < num_episodes:
            done, steps = self._sample_in_bulk(num_episodes - len(episodes), explore)
            episodes += done
            ts += steps
        self._needs_initial_reset = True
        self._done_episodes_for_metrics.extend(episodes)
        self._log_env_steps(metric=self._metrics_num_env_steps_sampled, num_steps=ts)
        self._increase_sampled_metrics(ts, len(episodes))
        return episodes

    def _sample_in_bulk(self, num_episodes: int, explore: bool) -> tuple[list[SingleAgentEpisode], int]:
        """Reset all sub-envs and step them until `num_episodes` episodes are done (fewer if an env
        step fails: the caller goes on). Returns (done episodes in RLlib's order, env steps taken)."""
        B, module = self.num_envs, self.module
        self._ongoing_episodes = [None] * B
        self._shared_data = {}
        self._cached_to_module = None
        self._ongoing_episodes_for_metrics.clear()
        seed = self._seed if (self._needs_initial_reset and not self._env_seeded) else None
        obs, infos = self._try_env_reset(seed=seed, options=None)
        self._env_seeded = True
        self._needs_initial_reset = False

        stateful = module.is_stateful()
        initial = tree.map_structure(lambda a: torch.as_tensor(np.asarray(a)), module.get_initial_state()) if stateful else None
        state = tree.map_structure(lambda t: t.unsqueeze(0).repeat(B, *([1] * t.dim())), initial) if stateful else None
        device = self._device if self._device is not None and torch.device(self._device).type != "cpu" else None
        forward = module.forward_exploration if explore else module.forward_inference
        runners = self.config.num_env_runners or 1

        now = time.perf_counter()
        obs_steps, info_steps = [obs], [infos]
        action_steps, extra_steps, state_steps, reward_steps, term_steps, trunc_steps = [], [], [], [], [], []
        start = np.zeros(B, np.int64)          # obs index where each sub-env's current episode began
        start_time = np.full(B, now)
        step_time = [now]
        resetting = np.zeros(B, bool)          # the sub-env's last step ended its episode: it resets now
        done: list[tuple[int, int, int]] = []  # (sub-env, first obs index, last obs index)
        ts = 0
        while len(done) < num_episodes:
            batch = {Columns.OBS: {k: torch.from_numpy(v) for k, v in obs.items()} if isinstance(obs, dict)
                     else tree.map_structure(torch.from_numpy, obs)}
            if stateful:
                batch[Columns.OBS] = tree.map_structure(lambda t: t.unsqueeze(1), batch[Columns.OBS])
                batch[Columns.STATE_IN] = state
            if device is not None:
                batch = tree.map_structure(lambda t: t.to(device), batch)
            if explore:
                t_global = (self.num_env_steps_sampled_lifetime // runners + ts) * runners
                out = forward(batch, t=t_global)
            else:
                out = forward(batch)
            if Columns.ACTIONS not in out:
                raise ValueError("DARPEnvRunner needs the module to return ACTIONS (see policies.darp.connectors)")
            actions = tree.map_structure(lambda t: _numpy(t, stateful), out[Columns.ACTIONS])
            extras = {k: tree.map_structure(lambda t: _numpy(t, stateful), v)
                      for k, v in out.items() if k not in (Columns.ACTIONS, Columns.STATE_OUT)}
            actions_for_env = extras.pop(Columns.ACTIONS_FOR_ENV, actions)
            results = self._try_env_step(actions_for_env)
            if isinstance(results, str) and results == ENV_STEP_FAILURE:
                break  # the caller resets and goes on, as RLlib's loop does
            obs, rewards, terminateds, truncateds, infos = results
            step_time.append(time.perf_counter())
            action_steps.append(actions)
            extra_steps.append(extras)
            reward_steps.append(np.asarray(rewards))
            term_steps.append(np.asarray(terminateds, bool))
            trunc_steps.append(np.asarray(truncateds, bool))
            obs_steps.append(obs)
            info_steps.append(infos)
            j = len(obs_steps) - 1
            stepped = ~resetting
            ts += int(stepped.sum())
            if stateful:
                state = out[Columns.STATE_OUT]
                state_steps.append(tree.map_structure(lambda t: _numpy(t, False), state))
            if resetting.any():  # NEXT_STEP autoreset: obs j begins a new episode there
                rows = np.flatnonzero(resetting)
                start[rows] = j
                start_time[rows] = step_time[-1]
                if stateful:
                    index = torch.from_numpy(rows)
                    state = tree.map_structure(
                        lambda s, t: s.clone().index_copy_(0, index, t.unsqueeze(0).expand(len(rows), *t.shape).to(s.dtype)),
                        state, initial)
            ended = stepped & (term_steps[-1] | trunc_steps[-1])
            for i in np.flatnonzero(ended):
                done.append((int(i), int(start[i]), j))
                if len(done) >= num_episodes:
                    break
            resetting = ended
        return self._episodes(done, obs_steps, info_steps, action_steps, extra_steps, state_steps, reward_steps,
                              term_steps, trunc_steps, start_time, step_time), ts

    def _episodes(self, done, obs_steps, info_steps, action_steps, extra_steps, state_steps, reward_steps,
                  term_steps, trunc_steps, start_time, step_time) -> list[SingleAgentEpisode]:
        """Cut the done episodes out of the per-step batches (stacked to (B, steps, ...) once)."""
        if not done:
            return []
        observations = _stack(obs_steps)
        actions = _stack(action_steps)
        extras = {k: _stack([e[k] for e in extra_steps]) for k in extra_steps[0]}
        if state_steps:
            extras[Columns.STATE_OUT] = _stack(state_steps)
        rewards = np.stack(reward_steps, axis=1)
        terminated = np.stack(term_steps, axis=1)
        truncated = np.stack(trunc_steps, axis=1)
        seq_no = self._weights_seq_no
        obs_space, act_space = self.env.single_observation_space, self.env.single_action_space
        episodes = []
        for i, s, e in done:  # observations s..e, actions/rewards/outputs of steps s..e-1 (index j -> j + 1)
            extra = {k: tree.map_structure(lambda a: a[i, s:e], v) for k, v in extras.items()}
            extra[WEIGHTS_SEQ_NO] = np.full(e - s, seq_no)
            episode = SingleAgentEpisode(
                observations=tree.map_structure(lambda a: a[i, s:e + 1], observations),
                infos=[_native(info_steps[j][i]) for j in range(s, e + 1)],
                actions=tree.map_structure(lambda a: a[i, s:e], actions),
                rewards=rewards[i, s:e],
                terminated=bool(terminated[i, e - 1]),
                truncated=bool(truncated[i, e - 1]),
                extra_model_outputs=extra,
                observation_space=obs_space,
                action_space=act_space,
                len_lookback_buffer=0,
            )
            episode._start_time = float(start_time[i])
            episode._last_step_time = step_time[e]
            episodes.append(episode)
        return episodes


__all__ = ["DARPEnvRunner"]
