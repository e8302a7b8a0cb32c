"""DARP's learner: bootstrapped REINFORCE on the locator + lambda x the supervised regression loss.

Loss per module (method.md, "Hybrid loss"), with m the loss mask over (B, T) and K heads:
- supervised: mean_t ||a_t - e_target||^2 (or the infonce ranking loss, policies.darp.supervised), trains
  glimpse network, core RNN and action network;
- policy gradient: -sum_{t,k} w_{t,k} log N(v_t | mu_k(h_t), std) (G_t - b_t) / sum w, where w is
  the bootstrap mask drawn with each experience: head k learns only from experiences with w_k = 1 (with
  the cell locator, policies.darp.cell_locator, log pi_k(c_t | h_t) of the chosen cell in place of log N);
- baseline: mean_t (b_t - G_t)^2 (b_t reads h_t detached, so only the baseline layer learns from it);
- total = rl_weight x (policy gradient + baseline) + sup_lambda x supervised.
The locator and baseline read h detached, so the RL term never reaches the core (as in the recurrent
attention model) and the supervised term never reaches the locator.

G_t is the discounted return to the episode's end (`locator_return="episode"`), or, in local match,
the rewards until the end of the level whose evidence the location's glimpse joins
(`locator_return="level"`, `ComputeLevelReturns`): there a location changes the ranks of that level
only, and the rest of the episode is noise in its credit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner import ComputeReturnsToGo
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.annotations import override

from policies.darp.cell_locator import CHOSEN_CELL
from policies.darp.module import BOOTSTRAP_MASK, LOCATION_SAMPLE
from policies.darp.schedules import StdSchedule
from policies.darp.supervised import SupervisedObjective, build_supervised_term
from sketch_env.render import N_GLIMPSES

def darp_loss(
    fwd_out: dict,
    batch: dict,
    std: torch.Tensor,
    rl_weight: float,
    sup_lambda: float,
    supervised_objective: SupervisedObjective | None = None,
    advantage_norm: bool = False,
) -> tuple[torch.Tensor, dict]:
    """The hybrid loss over a (B, T) batch of whole episodes; returns (loss, stats).

    supervised_objective: the supervised term (policies.darp.supervised); None is the paper's squared error.
    advantage_norm: advantages scaled to zero mean and unit std over the batch's valid steps.
    """
    mask = batch[Columns.LOSS_MASK].float()
    n = mask.sum().clamp(min=1.0)
    supervised = (supervised_objective or SupervisedObjective())(fwd_out["query"], batch, mask)

    returns = batch[Columns.RETURNS_TO_GO].float()
    baseline = fwd_out["baseline"]
    advantage = (returns - baseline).detach()
    if advantage_norm:
        mean = (advantage * mask).sum() / n
        spread = ((((advantage - mean) ** 2) * mask).sum() / n).sqrt()
        advantage = (advantage - mean) / (spread + 1e-6)
    if "locator_logits" in fwd_out:  # the cell locator (policies.darp.cell_locator): masked softmax per head
        logits = fwd_out["locator_logits"]  # (B, T, K, C)
        chosen = batch[CHOSEN_CELL].long()[..., None, None].expand(*logits.shape[:3], 1)
        logp = torch.log_softmax(logits, -1).gather(-1, chosen).squeeze(-1)  # (B, T, K)
    else:
        means = fwd_out["locator_means"]  # (B, T, K, 2)
        sample = batch[LOCATION_SAMPLE].unsqueeze(-2)  # (B, T, 1, 2)
        logp = torch.distributions.Normal(means, std).log_prob(sample).sum(-1)  # (B, T, K)
    weights = batch[BOOTSTRAP_MASK].float() * mask.unsqueeze(-1)
    policy = -(logp * advantage.unsqueeze(-1) * weights).sum() / weights.sum().clamp(min=1.0)
    baseline_loss = (((baseline - returns) ** 2) * mask).sum() / n

    loss = rl_weight * (policy + baseline_loss) + sup_lambda * supervised
    stats = {
        "supervised_loss": supervised.detach(),
        "policy_loss": policy.detach(),
        "baseline_loss": baseline_loss.detach(),
        "mean_return": ((returns * mask).sum() / n).detach(),
    }
    return loss, stats


def level_returns(rewards: np.ndarray, n_glimpses: int, t_started: int = 0) -> np.ndarray:
    """(T,) the credit of the location chosen at each step: sum of rewards r_{t+1} .. r_e, with e the last
    step of the level that step t + 1 belongs to (the location chosen at t is observed at t + 1 and its
    cell joins that level's evidence; the env resets the evidence every n_glimpses steps). Steps are
    counted from the episode's start (`t_started` of this piece)."""
    rewards = np.asarray(rewards, np.float64)
    steps = t_started + np.arange(len(rewards))
    level = steps // n_glimpses
    out = np.zeros(len(rewards) + 1)
    for i in range(len(rewards) - 1, -1, -1):  # within-level sums from the end: S(i) = r_i + S(i + 1) in one level
        same = i + 1 < len(rewards) and level[i + 1] == level[i]
        out[i] = rewards[i] + (out[i + 1] if same else 0.0)
    return out[1:]  # out[T] = 0: the last location is never read


class ComputeLevelReturns(ConnectorV2):
    """Learner connector: RETURNS_TO_GO = `level_returns` of each (complete) episode, for locator_return="level"."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, n_glimpses: int):
        super().__init__(input_observation_space, input_action_space)
        self.n_glimpses = n_glimpses

    def __call__(self, *, rl_module, episodes, batch, **kwargs):
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            self.add_n_batch_items(batch=batch, column=Columns.RETURNS_TO_GO,
                                   items_to_add=level_returns(episode.get_rewards(), self.n_glimpses, episode.t_started),
                                   num_items=len(episode), single_agent_episode=episode)
        return batch


class DARPLearner(TorchLearner):
    """TorchLearner with DARP's hybrid loss and the std schedule."""

    @override(TorchLearner)
    def build(self) -> None:
        super().build()
        self.supervised_objective = build_supervised_term(self)
        if self.config.add_default_connectors_to_learner_pipeline:
            if self.config.locator_return == "level":
                n_glimpses = int(self.config.env_config.get("n_glimpses", N_GLIMPSES))
                self._learner_connector.prepend(ComputeLevelReturns(n_glimpses=n_glimpses))
            else:
                self._learner_connector.prepend(ComputeReturnsToGo(gamma=self.config.gamma))
        self.std_schedule = StdSchedule(**self.config.std_schedule)

    @override(TorchLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: dict[str, Any], fwd_out):
        module = self.module[module_id].unwrapped()
        loss, stats = darp_loss(
            fwd_out, batch, module.std, config.rl_weight, config.sup_lambda, self.supervised_objective,
            config.advantage_norm,
        )
        for key, value in stats.items():
            self.metrics.log_value((module_id, key), value.item(), window=1)
        return loss

    @override(Learner)
    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

        std = self.std_schedule(timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0) or 0)
        for module_id in self.module.keys():
            self.module[module_id].unwrapped().set_std(std)
            self.metrics.log_value((module_id, "locator_std"), std, window=1)
