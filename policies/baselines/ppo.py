"""`ppo`: Bhunia et al.'s final on-the-fly model, the sketch-feature policy trained with RLlib's PPO.

The paper's "Triplet + PPO" baseline: the policy sees the frozen phase-1 features of each partial
sketch (and its level) and predicts the final sketch embedding as a Gaussian action, over the whole
drawing episode (17 steps with one glimpse per level), rewarded from the rank of the true photo.

How it plugs into RLlib's PPO (new API stack):
- `PPOSketchModule` (TorchRLModule + ValueFunctionAPI) returns ACTION_DIST_INPUTS (mean, log-std)
  for `QueryGaussian`, a TorchDistribution over the env's Dict action whose log-prob, entropy and KL
  cover the query Gaussian only (the location is fixed at 0). It subclasses TorchDiagGaussian instead
  of going through TorchMultiDistribution, whose log-prob has the wrong shape at B = 1 and B = D
  (RLlib issue 53994), and its deterministic version is its own class (the stock one crashes a
  remote EnvRunner).
- The episode stores the raw Gaussian sample (PPO's ratio needs its log-prob); `UnitQueryForEnv`, a
  module-to-env connector piece, sends the env the L2-normalised sample (inside the [-1, 1] box; the
  gallery ranks by direction anyway).
- `SketchPPO` validates as DARP does (policies.darp.validation: the deterministic policy on the
  validation split every `evaluation_interval` iterations, under result["evaluation"]).
"""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.ppo import PPO, PPOConfig
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDiagGaussian
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override
from torch import nn

from policies.baselines.feature_policies import feature_network, features_of, fixed_location, query_sigma, with_state
from policies.darp.defaults import ModelConfig, use_sketch_env
from policies.darp.networks import ActionNetwork, ValueHead
from policies.darp.validation import Validated, ValidationConfig


class QueryGaussian(TorchDiagGaussian):
    """Diagonal Gaussian over the query (..., D) of the Dict action {"location", "query"}.

    Inputs (..., 2D): mean and log-std. sample() -> {"location": zeros (..., 2), "query": (..., D)};
    logp(action dict), entropy() and kl() -> (...,), the batch shape, at every batch size.
    """

    def _action(self, query: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"location": fixed_location(query), "query": query}

    @override(TorchDiagGaussian)
    def logp(self, value: dict) -> torch.Tensor:
        return super().logp(value["query"])

    @override(TorchDiagGaussian)
    def sample(self, *, sample_shape=None) -> dict[str, torch.Tensor]:
        return self._action(super().sample(sample_shape=sample_shape))

    @override(TorchDiagGaussian)
    def rsample(self, *, sample_shape=None) -> dict[str, torch.Tensor]:
        return self._action(super().rsample(sample_shape=sample_shape))

    @staticmethod
    @override(TorchDiagGaussian)
    def required_input_dim(space: gym.Space, **kwargs) -> int:
        return 2 * int(space["query"].shape[0])

    @override(TorchDiagGaussian)
    def to_deterministic(self) -> "QueryMean":
        return QueryMean(loc=self.loc, scale=self._dist.scale)


class QueryMean(QueryGaussian):
    """QueryGaussian acting deterministically: sample() is the mean (log-prob etc. unchanged)."""

    @override(QueryGaussian)
    def sample(self, *, sample_shape=None) -> dict[str, torch.Tensor]:
        return self._action(self.loc)

    @override(QueryGaussian)
    def rsample(self, *, sample_shape=None) -> dict[str, torch.Tensor]:
        return self._action(self.loc)


def unit_query(action: dict) -> dict:
    """One env's action with its query scaled to unit L2 norm."""
    query = np.asarray(action["query"], np.float32)
    return {"location": action["location"], "query": query / max(float(np.linalg.norm(query)), 1e-12)}


class UnitQueryForEnv(ConnectorV2):
    """Module-to-env piece: the env gets the L2-normalised query, the episode keeps the raw sample."""

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kwargs):
        batch[Columns.ACTIONS_FOR_ENV] = copy.deepcopy(batch[Columns.ACTIONS])
        self.foreach_batch_item_change_in_place(batch, Columns.ACTIONS_FOR_ENV, lambda action, *_: unit_query(action))
        return batch


def unit_query_connector(env=None, spaces=None) -> UnitQueryForEnv:
    """For config.env_runners(module_to_env_connector=...)."""
    return UnitQueryForEnv()


class PPOSketchModule(TorchRLModule, ValueFunctionAPI):
    """Policy and value function on the partial sketch's phase-1 features and level (not recurrent).

    Policy: mean = normalize(e_t + ACTN(features)) as in SketchPolicyModule (starting at the
    phase-1 query e_t of the partial sketch), a learned state-independent
    log-std starting at query_sigma(std) (`std`: the expected norm of the query noise). Value: the
    same kind of feature network, separate weights, and a linear layer. Inference acts with the
    mean. Inputs may be (B, ...) (RLlib) or (B, 1, ...) (policies.darp.rollout).
    model_config (policies.darp.defaults.ModelConfig): hidden, std.
    """

    @override(TorchRLModule)
    def setup(self):
        cfg = ModelConfig.of(self.model_config)
        hidden = int(cfg.hidden)
        dim = self.observation_space["sketch_embedding"].shape[0]
        self.features = feature_network(self, hidden)
        self.policy = ActionNetwork(hidden, dim, zero_init=True)
        self.value_features = feature_network(self, hidden)
        self.value = ValueHead(hidden)
        self.log_std = nn.Parameter(torch.full((dim,), math.log(query_sigma(float(cfg.std), dim))))

    def _mean(self, batch) -> torch.Tensor:
        obs = batch[Columns.OBS]
        return self.policy(features_of(self.features, obs), base=obs["sketch_embedding"])

    @override(TorchRLModule)
    def _forward(self, batch, **kwargs):
        mean = self._mean(batch)
        return {Columns.ACTION_DIST_INPUTS: torch.cat([mean, self.log_std.expand_as(mean)], dim=-1)}

    @override(TorchRLModule)
    def _forward_inference(self, batch, **kwargs):
        mean = self._mean(batch)
        return with_state(batch, {Columns.ACTIONS: {"location": fixed_location(mean), "query": mean}})

    @override(ValueFunctionAPI)
    def compute_values(self, batch, embeddings=None) -> torch.Tensor:
        return self.value(features_of(self.value_features, batch[Columns.OBS]))

    @override(TorchRLModule)
    def get_exploration_action_dist_cls(self):
        return QueryGaussian

    @override(TorchRLModule)
    def get_inference_action_dist_cls(self):
        return QueryGaussian

    @override(TorchRLModule)
    def get_train_action_dist_cls(self):
        return QueryGaussian


class SketchPPOConfig(ValidationConfig, PPOConfig):
    """PPOConfig on the sketch-retrieval env with PPOSketchModule, validated as DARP is."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or SketchPPO)
        self._init_validation()
        use_sketch_env(self)
        self._module_to_env_connector = unit_query_connector
        self.num_epochs = 10
        self.minibatch_size = 128

    @override(PPOConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=PPOSketchModule)

    def episode_length(self) -> int:
        from sketch_env.render import N_LEVELS

        return N_LEVELS * int(self.env_config.get("n_glimpses", 1))


class SketchPPO(Validated, PPO):
    """RLlib's PPO, validated as DARP is (policies.darp.validation)."""

    @classmethod
    @override(PPO)
    def get_default_config(cls) -> AlgorithmConfig:
        return SketchPPOConfig()


__all__ = ["PPOSketchModule", "QueryGaussian", "QueryMean", "SketchPPO", "SketchPPOConfig", "UnitQueryForEnv"]
