"""The defaults DARP's pieces and `darp train` share, written once.

`darp train` (policies.running.registry.TrainConfig) and a bare `DARPConfig()` build the same model: both
read their defaults from here, and the RLModules read their settings through `ModelConfig` instead of
repeating a default at every `model_config.get`. The values are those of `darp train` (what the README's
runs measured). A leaf module that imports no Ray or torch: `darp train --help` reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from policies.darp.schedules import DEFAULT_STD_SCHEDULE

ENV_NAME = "darp-sketch-retrieval"  # the name the env creator is registered under with Ray (register_darp_env)
DEFAULT_VAL_INTERVAL = 5  # validate every 5 iterations (DARPConfig's and SketchPPOConfig's evaluation_interval)
ENVS_PER_RUNNER = 32  # vectorised envs per EnvRunner
EPISODES_PER_BATCH = 64  # complete episodes per update


@dataclass(frozen=True)
class ModelConfig:
    """The RLModules' settings, RLlib's `model_config` dict read with its defaults (`ModelConfig.of`).

    hidden / glimpse_hidden: widths of the core state and of the glimpse network's output. n_heads,
    bootstrap_p: the K bootstrapped locator heads and each one's mask probability. grid: bdqn's locations
    per side. std: the locator's initial std (the learner overwrites it from the schedule). cell, h0_init,
    use_sketch_embedding: the core RNN, its initial state and whether each step reads the partial sketch's
    phase-1 embedding. eval_heads: deterministic location from the mean of the heads or head 0.
    residual_query: the query is the phase-1 embedding plus a learned correction. dropout: on the core
    state before the action network, in updates only. retina_encoder: linear (the paper's) or conv.
    locator_head: gaussian (the paper's K Gaussian heads over a point) or cells (K heads of logits over the
    unread inked cells of the local grid, policies.darp.cell_locator; local match only).
    """

    hidden: int = 256
    glimpse_hidden: int = 128
    n_heads: int = 6
    bootstrap_p: float = 0.5
    grid: int = 5
    std: float = DEFAULT_STD_SCHEDULE.start
    cell: Literal["gru", "lstm"] = "gru"
    h0_init: Literal["sketch", "zeros"] = "sketch"
    use_sketch_embedding: bool = True
    eval_heads: Literal["mean", "first"] = "mean"
    residual_query: bool = True
    dropout: float = 0.3
    retina_encoder: Literal["linear", "conv"] = "linear"
    locator_head: Literal["gaussian", "cells"] = "gaussian"

    @classmethod
    def of(cls, model_config: dict[str, Any] | None) -> ModelConfig:
        """The settings in an RLModule's model_config (keys RLlib adds itself, such as max_seq_len, are not ours)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (model_config or {}).items() if k in names})


MODEL_DEFAULTS = ModelConfig()


def use_sketch_env(config) -> None:
    """The env settings DARPConfig and SketchPPOConfig both start from: the vector env registered as ENV_NAME,
    sampled in the driver (no remote EnvRunners), actions passed through unchanged."""
    config.env = ENV_NAME
    config.num_env_runners = 0
    config.num_envs_per_env_runner = ENVS_PER_RUNNER
    config.gym_env_vectorize_mode = "vector_entry_point"
    config.normalize_actions = False
    config.clip_actions = False


__all__ = ["DEFAULT_VAL_INTERVAL", "ENVS_PER_RUNNER", "ENV_NAME", "EPISODES_PER_BATCH", "MODEL_DEFAULTS", "ModelConfig",
           "use_sketch_env"]
