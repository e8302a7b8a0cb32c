"""The dynamic ranking reward variants: pure batched functions shared by the single and vector env.

All take and return tensors over a batch of B steps (one per episode):

- `threshold`  (the DARP paper): 1 if 1/rank >= eta_t, with eta_t = 1 / (1 + exp(-alpha * t + beta))
  and t the training step. With the paper's alpha = 0.02, beta = -2, eta_0 = 0.88 and eta_t rises
  towards 1, so the reward is in effect "the target is ranked first".
- `best_rank`  (the authors' released code): 1 if the rank at this completion level is at least as
  good as the best rank seen so far for this sketch and level, from a memory table kept by the env.
- `rank_gain`: the change of the ranking percentile since the previous step of the episode.
"""

from __future__ import annotations

import math

import torch

REWARDS = ("threshold", "best_rank", "rank_gain")


def eta(training_step: int, alpha: float = 0.02, beta: float = -2.0) -> float:
    """The threshold schedule eta_t = 1 / (1 + exp(-alpha * t + beta)), a float in (0, 1)."""
    return 1.0 / (1.0 + math.exp(-alpha * training_step + beta))


def threshold_reward(rank: torch.Tensor, eta_t: float) -> torch.Tensor:
    """rank (B,) long, 1 = best -> (B,) float64: 1.0 where 1 / rank >= eta_t, else 0.0."""
    return (1.0 / rank.double() >= eta_t).double()


def best_rank_reward(rank: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rank (B,), best (B,) the best rank seen so far for each step's sketch and level.

    Returns (reward (B,) float64: 1.0 where rank <= best, the updated best (B,) = min(best, rank)).
    Ties count as success, as in the authors' code. A table entry that was never visited should
    hold a value above any rank (e.g. gallery size + 1), so a first visit is rewarded.
    """
    return (rank <= best).double(), torch.minimum(best, rank.to(best.dtype))


def rank_gain_reward(percentile: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """percentile (B,) now, previous (B,) at the episode's previous step -> (B,) float64 difference.

    Within [-1, 1]; over an episode the rewards telescope to the last percentile minus the first
    `previous` (the env uses the phase-1 embedding's percentile at level 0 there).
    """
    return percentile.double() - previous.double()
