"""`bdqn`: DARP with the locator replaced by a Bootstrapped DQN over a grid of locations.

The paper's "Bootstrapped DQN" baseline (after Osband et al., 2016). The glimpse network, core RNN
and action network are DARP's and learn from the supervised loss exactly as in DARP. Where to look
next is one of grid x grid cell centres, chosen by K heads of Q-values that read h_t detached:
one head, drawn at an episode's start, acts greedily for the whole episode (deep exploration), and
each experience carries a bootstrap mask w in {0, 1}^K (Bernoulli(p) per head) saying which heads
learn from it. TD targets come from the same episode, detached (no target network):
    y_{t,k} = r_t + gamma * max_a Q_k(h_{t+1}, a)      (r_t alone at the episode's last step).
Trained by DARP's algorithm (policies.darp.algorithm.DARP) with `BDQNLearner`; `darp train --algo bdqn`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override
from torch import nn

from policies.baselines.feature_policies import SupervisedLearner
from policies.darp.defaults import ModelConfig
from policies.darp.module import BOOTSTRAP_MASK, HEAD, DARPModule
from sketch_env.local_match import cell_centres

LOCATION_CELL = "location_cell"


def grid_cells(grid: int) -> torch.Tensor:
    """(grid * grid, 2) cell centres (x, y) of a grid over [-1, 1]^2; cell a = row * grid + column."""
    return cell_centres(grid, grid)


class QHeads(nn.Module):
    """K heads of Q-values over A locations. Input h (N, H), detached by the caller. Output (N, K, A)."""

    def __init__(self, hidden: int, n_heads: int, n_actions: int):
        super().__init__()
        self.n_heads, self.n_actions = n_heads, n_actions
        self.fc = nn.Linear(hidden, n_heads * n_actions)

    def forward(self, h):
        return self.fc(h).unflatten(-1, (self.n_heads, self.n_actions))


class BDQNModule(DARPModule):
    """DARPModule whose locator is K Q-heads over grid cells.

    Extra outputs per step (train-batch columns): BOOTSTRAP_MASK (B, T, K) and LOCATION_CELL (B, T),
    the cell looked at next. Deterministic acting: argmax of the heads' mean Q (eval_heads "mean") or
    of head 0 ("first"). model_config: DARPModule's keys; grid: locations per side (5: 25 locations).
    """

    @override(DARPModule)
    def setup_locator(self, cfg: ModelConfig, hidden: int) -> None:
        grid = int(cfg.grid)
        if grid < 1:
            raise ValueError(f"bdqn: grid must be at least 1 cell per side, got {grid}")
        self.q_heads = QHeads(hidden, self.n_heads, grid * grid)
        self.register_buffer("cells", grid_cells(grid))

    @override(DARPModule)
    def _act(self, batch, explore: bool) -> dict[str, Any]:
        h, state_out, starts = self._core(batch)
        B, T = h.shape[:2]
        query = self.predict_query(h, batch)
        q = self.q_heads(h.detach())  # (B, T, K, A)
        if explore:
            head = self.acting_head(batch, starts)
            values = q[torch.arange(B, device=h.device), :, head]  # (B, T, A)
            mask = self.bootstrap_mask(B, T, h.device)
        else:
            head = batch[Columns.STATE_IN][HEAD].long().reshape(B)
            values = q.mean(dim=2) if self.eval_heads == "mean" else q[:, :, 0]
            mask = torch.ones(B, T, self.n_heads, device=h.device)
        cell = values.argmax(-1)  # (B, T)
        state_out[HEAD] = head
        return {
            Columns.ACTIONS: {"location": self.cells[cell], "query": query},
            Columns.STATE_OUT: state_out,
            BOOTSTRAP_MASK: mask,
            LOCATION_CELL: cell,
        }

    @override(DARPModule)
    def _forward_train(self, batch, **kwargs):
        """(B, T) sequences of whole episodes -> query (B, T, D), q_values (B, T, K, A)."""
        h, _, _ = self._core(batch)
        return {"query": self.predict_query(h, batch, train=True), "q_values": self.q_heads(h.detach())}


def td_targets(q_values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """y (B, T, K) = r_t + gamma * max_a Q_k(h_{t+1}, a), detached; r_t alone where t + 1 is not a
    step of the same episode. q_values (B, T, K, A), rewards (B, T), mask (B, T) the valid steps;
    each row is one whole episode (DARP's max_seq_len is the episode length)."""
    best_next = q_values.detach().amax(-1)  # (B, T, K)
    following = torch.zeros_like(best_next)
    following[:, :-1] = best_next[:, 1:] * mask[:, 1:, None].to(best_next.dtype)
    return rewards[..., None].to(best_next.dtype) + gamma * following


def td_loss(q_values, cells, rewards, mask, bootstrap_mask, gamma: float) -> torch.Tensor:
    """Huber TD error of Q_k(h_t, a_t) against td_targets, head k weighted by w_{t,k} (the bootstrap
    mask (B, T, K)), over valid steps; cells (B, T) long are the actions a_t taken."""
    q_taken = q_values.gather(-1, cells.long()[..., None, None].expand(*cells.shape, q_values.shape[2], 1)).squeeze(-1)
    targets = td_targets(q_values, rewards, mask, gamma)
    weights = bootstrap_mask.float() * mask.float()[..., None]
    errors = F.smooth_l1_loss(q_taken, targets, reduction="none")
    return (errors * weights).sum() / weights.sum().clamp(min=1.0)


class BDQNLearner(SupervisedLearner):
    """sup_lambda x supervised + rl_weight x bootstrapped TD loss."""

    @override(SupervisedLearner)
    def compute_loss_for_module(self, *, module_id, config, batch: dict[str, Any], fwd_out):
        mask = batch[Columns.LOSS_MASK]
        supervised = self.supervised_objective(fwd_out["query"], batch, mask)
        td = td_loss(fwd_out["q_values"], batch[LOCATION_CELL], batch[Columns.REWARDS].float(), mask,
                     batch[BOOTSTRAP_MASK], config.gamma)
        self.metrics.log_value((module_id, "supervised_loss"), supervised.item(), window=1)
        self.metrics.log_value((module_id, "td_loss"), td.item(), window=1)
        return config.sup_lambda * supervised + config.rl_weight * td


__all__ = ["BDQNLearner", "BDQNModule", "LOCATION_CELL", "QHeads", "grid_cells", "td_loss", "td_targets"]
