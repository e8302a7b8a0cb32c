"""Baselines that train with DARP's algorithm (policies.darp.algorithm.DARP) but without its locator.

- `darp-no-attention` (the paper's "without attention" ablation): `NoAttentionModule`, DARP's core
  RNN and action network over the partial sketch's phase-1 features and level (no glimpse, no
  locator; the location action is constant 0), trained by the supervised loss alone
  (`SupervisedLearner`).
- `vanilla-pg` (Bhunia et al.'s basic version, "Triplet + vanilla RL"): `SketchPolicyModule`, a
  policy on the frozen phase-1 features of each partial sketch that predicts the final sketch
  embedding as a Gaussian action, trained by REINFORCE with the ranking reward, returns-to-go and a
  learned baseline (`ReinforceLearner`), no supervised loss.

Both reuse DARP's networks (policies.darp.networks) and the environment; `darp train --algo NAME`
picks them (policies.running.registry.build_algo_config).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override

from policies.darp.defaults import ModelConfig
from policies.darp.learner import DARPLearner
from policies.darp.module import DARPModule
from policies.darp.networks import ActionNetwork, GlimpseNetwork, ValueHead
from policies.darp.supervised import build_supervised_term

QUERY_SAMPLE = "query_sample"


def query_sigma(std: torch.Tensor | float, dim: int) -> torch.Tensor | float:
    """Per-component std of the query noise: `std` is the expected norm of the noise (D components
    of std / sqrt(D)) relative to the unit-norm mean, so one setting means the same for any D."""
    return std / math.sqrt(dim)


def with_state(batch: dict, out: dict) -> dict:
    """A stateless module passes its (empty) state through, so the rollout loop of policies.darp.rollout,
    written for recurrent policies, treats it like any other."""
    if Columns.STATE_IN in batch:
        out[Columns.STATE_OUT] = batch[Columns.STATE_IN]
    return out


def feature_network(module: TorchRLModule, hidden: int) -> GlimpseNetwork:
    """DARP's glimpse network without attention: the partial sketch's embedding and level -> (N, hidden)."""
    obs_space = module.observation_space
    return GlimpseNetwork(obs_space["glimpse"].shape, obs_space["sketch_embedding"].shape[0], hidden, True,
                          attention=False)


def features_of(net: GlimpseNetwork, obs: dict) -> torch.Tensor:
    return net(obs["glimpse"], obs["location"], obs["level"], obs["sketch_embedding"])


def fixed_location(query: torch.Tensor) -> torch.Tensor:
    """The location action of a policy without attention: the centre, zeros (N..., 2)."""
    return torch.zeros(*query.shape[:-1], 2, dtype=query.dtype, device=query.device)


class NoAttentionModule(DARPModule):
    """DARP without attention: core RNN over the partial sketch's phase-1 features + action network.

    model_config as DARPModule's (hidden, glimpse_hidden, cell, h0_init); locator keys are unused.
    """

    attention = False

    @override(DARPModule)
    def setup_locator(self, cfg: ModelConfig, hidden: int) -> None:
        """No locator: the module never chooses where to look."""

    @override(DARPModule)
    def get_initial_state(self) -> dict[str, Any]:
        return {k: v.numpy() for k, v in self.core.initial_state().items()}

    @override(DARPModule)
    def _act(self, batch, explore: bool) -> dict[str, Any]:
        h, state_out, _ = self._core(batch)
        query = self.predict_query(h, batch)
        return {Columns.ACTIONS: {"location": fixed_location(query), "query": query}, Columns.STATE_OUT: state_out}

    @override(DARPModule)
    def _forward_train(self, batch, **kwargs):
        h, _, _ = self._core(batch)
        return {"query": self.predict_query(h, batch, train=True)}


class SupervisedLearner(TorchLearner):
    """sup_lambda x the supervised term (policies.darp.supervised) over whole episodes (the no-attention ablation)."""

    @override(TorchLearner)
    def build(self) -> None:
        super().build()
        self.supervised_objective = build_supervised_term(self)

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: dict[str, Any], fwd_out):
        loss = self.supervised_objective(fwd_out["query"], batch, batch.get(Columns.LOSS_MASK))
        self.metrics.log_value((module_id, "supervised_loss"), loss.item(), window=1)
        return config.sup_lambda * loss


class SketchPolicyModule(TorchRLModule):
    """Bhunia et al.'s basic policy: phase-1 features of the partial sketch -> Gaussian over the final embedding.

    Not recurrent: each step sees the current partial sketch's embedding e_t (D,) and level. The mean
    is normalize(e_t + ACTN(features)) with DARP's action network, whose last layer starts at zero:
    the untrained policy is the triplet network's query, which RL refines. Exploring, the query sample is
    mean + query_sigma(std) * noise: the env gets it L2-normalised (inside the [-1, 1] box, and the
    gallery ranks by direction anyway), the learner the raw sample (column QUERY_SAMPLE). Inference
    acts with the mean. The location is constant 0. Inputs may be (B, ...) (RLlib) or (B, 1, ...)
    (policies.darp.rollout); outputs follow.

    model_config (policies.darp.defaults.ModelConfig): hidden, std (initial noise norm; the learner overwrites it from
    the schedule).
    """

    @override(TorchRLModule)
    def setup(self):
        cfg = ModelConfig.of(self.model_config)
        hidden = int(cfg.hidden)
        self.dim = self.observation_space["sketch_embedding"].shape[0]
        self.features = feature_network(self, hidden)
        self.policy = ActionNetwork(hidden, self.dim, zero_init=True)
        self.baseline = ValueHead(hidden)
        self.register_buffer("std", torch.tensor(float(cfg.std)))

    def _mean(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean query (N..., D), features (N..., hidden))."""
        obs = batch[Columns.OBS]
        f = features_of(self.features, obs)
        return self.policy(f, base=obs["sketch_embedding"]), f

    @override(TorchRLModule)
    def _forward_exploration(self, batch, **kwargs):
        mean, _ = self._mean(batch)
        sigma = query_sigma(self.std, self.dim)
        sample = mean + sigma * torch.randn_like(mean)
        return with_state(batch, {
            Columns.ACTIONS: {"location": fixed_location(mean), "query": F.normalize(sample, dim=-1)},
            Columns.ACTION_LOGP: torch.distributions.Normal(mean, sigma).log_prob(sample).sum(-1),
            QUERY_SAMPLE: sample,
        })

    @override(TorchRLModule)
    def _forward_inference(self, batch, **kwargs):
        mean, _ = self._mean(batch)
        return with_state(batch, {Columns.ACTIONS: {"location": fixed_location(mean), "query": mean}})

    @override(TorchRLModule)
    def _forward(self, batch, **kwargs):
        return self._forward_inference(batch)

    @override(TorchRLModule)
    def _forward_train(self, batch, **kwargs):
        """query_mean (N, D), baseline (N,) (reads the features detached: only its layer learns from it)."""
        mean, f = self._mean(batch)
        return {"query_mean": mean, "baseline": self.baseline(f.detach())}

    def set_std(self, value: float) -> None:
        self.std.fill_(float(value))


def reinforce_loss(fwd_out: dict, batch: dict, sigma) -> tuple[torch.Tensor, dict]:
    """REINFORCE with a learned baseline over N steps: -mean log pi(q_t) (G_t - b_t) + mean (b_t - G_t)^2."""
    returns = batch[Columns.RETURNS_TO_GO].float()
    mask = batch.get(Columns.LOSS_MASK)
    mask = torch.ones_like(returns) if mask is None else mask.float()
    n = mask.sum().clamp(min=1.0)
    baseline = fwd_out["baseline"]
    advantage = (returns - baseline).detach()
    logp = torch.distributions.Normal(fwd_out["query_mean"], sigma).log_prob(batch[QUERY_SAMPLE]).sum(-1)
    policy = -(logp * advantage * mask).sum() / n
    baseline_loss = (((baseline - returns) ** 2) * mask).sum() / n
    stats = {
        "policy_loss": policy.detach(),
        "baseline_loss": baseline_loss.detach(),
        "mean_return": ((returns * mask).sum() / n).detach(),
    }
    return policy + baseline_loss, stats


class ReinforceLearner(DARPLearner):
    """DARPLearner's connectors (returns-to-go) and std schedule with the vanilla-RL loss."""

    @override(DARPLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: dict[str, Any], fwd_out):
        module = self.module[module_id].unwrapped()
        loss, stats = reinforce_loss(fwd_out, batch, query_sigma(module.std, module.dim))
        for key, value in stats.items():
            self.metrics.log_value((module_id, key), value.item(), window=1)
        return loss


__all__ = [
    "NoAttentionModule",
    "QUERY_SAMPLE",
    "ReinforceLearner",
    "SketchPolicyModule",
    "SupervisedLearner",
    "query_sigma",
    "reinforce_loss",
]
