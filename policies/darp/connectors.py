"""Batched env-to-module and module-to-env connectors for DARP's EnvRunners.

Why: RLlib's default connector pipelines work item by item (one tree.map_structure per sub-env and
column, every step); with a batched VectorEnv and a recurrent module they cost several times the
module's forward pass. These two pieces do the same work once for the whole batch:

- `BatchedEnvToModule` (replaces AddObservationsFromEpisodesToBatch, AddTimeDimToBatchAndZeroPad,
  AddStatesFromEpisodesToBatch, BatchIndividualItems, NumpyToTensor): stacks the sub-envs'
  observations into tensors (B, 1, ...) and builds STATE_IN (B, ...) from the previous step's
  STATE_OUT (kept batched in shared_data by `BatchedModuleToEnv`), the module's initial state for
  episodes that have not begun, and the episode's stored STATE_OUT in any other case.
- `BatchedModuleToEnv` (replaces GetActions, TensorToNumpy, UnBatchToIndividualItems,
  RemoveSingleTsTimeRankFromBatch, NormalizeAndClipActions, ListifyDataForVectorEnv): removes the
  time rank and turns the module's outputs to numpy once; ACTIONS stay batched for the env, every
  other column is a (B, ...) array the runner indexes per sub-env, STATE_OUT a list of per-env dicts.
  It expects the module to return ACTIONS itself (DARP's modules sample their own) and does not
  normalise or clip them (DARPConfig turns normalize_actions/clip_actions off).

Episodes end up with the same observations, actions, rewards, infos and extra model outputs as with
the default pipelines (tests/test_connectors.py compares them). `batched_connectors(config)` turns them on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import tree
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns

# shared_data keys: set by the default AddTimeDimToBatchAndZeroPad too, read by the module-to-env side.
TIME_RANK = "_added_single_ts_time_rank"
STATE_CACHE = "_darp_batched_state_out"


def to_numpy(value, squeeze: bool = False):
    """A module output leaf -> numpy as RLlib's TensorToNumpy makes it (floats to float32, ints to
    int32), without the time rank (axis 1) if `squeeze`."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if squeeze:
            value = value[:, 0]
        out = value.numpy() if value.dim() else value.item()
    else:
        out = np.asarray(value)
        if squeeze:
            out = out[:, 0]
    if isinstance(out, np.ndarray):
        if np.issubdtype(out.dtype, np.floating) and out.dtype != np.float32:
            out = out.astype(np.float32)
        elif np.issubdtype(out.dtype, np.integer) and out.dtype != np.int32:
            out = out.astype(np.int32)
    return out


class BatchedEnvToModule(ConnectorV2):
    """Sub-env observations and recurrent state -> one batch of tensors for the module's forward pass."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, device=None, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.device = device
        self._initial = None

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kwargs) -> Any:
        observations = kwargs.get(Columns.OBS)
        if observations is None:  # not called by an EnvRunner with its step data: read the episodes
            observations = [episode.get_observations(-1) for episode in episodes]
        first = observations[0]
        if isinstance(first, dict):
            obs = {k: torch.from_numpy(np.stack([o[k] for o in observations])) for k in first}
        else:
            obs = tree.map_structure(lambda *xs: torch.from_numpy(np.stack(xs)), *observations)
        stateful = rl_module is not None and rl_module.is_stateful()
        if stateful:
            obs = tree.map_structure(lambda t: t.unsqueeze(1), obs)
        batch[Columns.OBS] = self._to_device(obs)
        if stateful:
            batch[Columns.STATE_IN] = self._state_in(rl_module, episodes, shared_data)
            if shared_data is not None:
                shared_data[TIME_RANK] = True
        return batch

    def _to_device(self, value):
        if self.device is None:
            return value
        return tree.map_structure(lambda t: t.to(self.device), value)

    def _initial_state(self, rl_module):
        if self._initial is None or self._initial[0] is not rl_module:
            state = tree.map_structure(lambda a: torch.as_tensor(np.asarray(a)), rl_module.get_initial_state())
            self._initial = (rl_module, state)
        return self._initial[1]

    def _state_in(self, rl_module, episodes, shared_data):
        """(B, ...) state: the last STATE_OUT of each episode, the initial state where none is stored."""
        cached = (shared_data or {}).get(STATE_CACHE)
        initial = self._initial_state(rl_module)
        rows_initial, rows_stored = [], []
        for i, episode in enumerate(episodes):
            if (episode.t_started == 0 and len(episode) == 0) or Columns.STATE_OUT not in episode.extra_model_outputs:
                rows_initial.append(i)
            elif cached is None or cached[1][i] != (episode.id_, episode.t - 1):
                rows_stored.append(i)
        B = len(episodes)
        if cached is None or len(rows_initial) == B or len(cached[1]) != B:
            # Nothing to reuse: start every row from the initial state, then fill the stored ones.
            state = tree.map_structure(lambda t: t.unsqueeze(0).repeat(B, *([1] * t.dim())), initial)
            initial_rows = set(rows_initial)
            rows_stored = [i for i in range(B) if i not in initial_rows]
        else:
            state = cached[0]
            if rows_initial or rows_stored:
                state = tree.map_structure(torch.clone, state)
            if rows_initial:
                index = torch.as_tensor(rows_initial)
                tree.map_structure(lambda s, t: s.index_copy_(0, index, t.unsqueeze(0).expand(len(index), *t.shape).to(s.dtype)),
                                   state, initial)
        for i in rows_stored:
            stored = episodes[i].get_extra_model_outputs(key=Columns.STATE_OUT, indices=-1)
            tree.map_structure(lambda s, v: s[i].copy_(torch.as_tensor(np.asarray(v))), state, stored)
        return self._to_device(state)


class BatchedModuleToEnv(ConnectorV2):
    """The module's batched outputs -> numpy, batched actions for the env, per-env rows for the episodes."""

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kwargs) -> Any:
        if Columns.ACTIONS not in batch:
            raise ValueError(
                "BatchedModuleToEnv needs the module to return ACTIONS (it samples no action distribution); "
                "use RLlib's default module-to-env pipeline for this module"
            )
        squeeze = bool(shared_data and shared_data.get(TIME_RANK))
        out = {}
        for column, value in batch.items():
            if column == Columns.STATE_OUT:
                if shared_data is not None:
                    keys = [(episode.id_, episode.t) for episode in episodes]
                    shared_data[STATE_CACHE] = (tree.map_structure(lambda t: t.detach(), value), keys)
                state = tree.map_structure(to_numpy, value)
                if isinstance(state, dict) and all(isinstance(v, np.ndarray) for v in state.values()):
                    out[column] = [{k: v[i] for k, v in state.items()} for i in range(len(episodes))]
                else:
                    out[column] = [tree.map_structure(lambda a, i=i: a[i], state) for i in range(len(episodes))]
            else:
                out[column] = tree.map_structure(lambda t: to_numpy(t, squeeze), value)
        return out


def batched_env_to_module(env=None, spaces=None, device=None) -> BatchedEnvToModule:
    """For config.env_runners(env_to_module_connector=...)."""
    return BatchedEnvToModule(device=device)


def batched_module_to_env(env=None, spaces=None) -> BatchedModuleToEnv:
    """For config.env_runners(module_to_env_connector=...)."""
    return BatchedModuleToEnv()


def batched_connectors(config, env_to_module: bool = True, episodes_to_numpy: bool | None = None):
    """Replace the default EnvRunner connector pipelines of `config` (an AlgorithmConfig) by the batched pieces."""
    config.env_runners(
        module_to_env_connector=batched_module_to_env,
        add_default_connectors_to_module_to_env_pipeline=False,
    )
    if env_to_module:
        config.env_runners(
            env_to_module_connector=batched_env_to_module,
            add_default_connectors_to_env_to_module_pipeline=False,
        )
    if episodes_to_numpy is not None:
        config.env_runners(episodes_to_numpy=episodes_to_numpy)
    return config


__all__ = [
    "BatchedEnvToModule",
    "BatchedModuleToEnv",
    "batched_connectors",
    "batched_env_to_module",
    "batched_module_to_env",
    "to_numpy",
]
