"""DARP as an RLlib TorchRLModule (new API stack).

The module samples its own actions (no RLlib action distribution): the location comes from the
acting locator head's Gaussian with the scheduled std, the query is the action network's output.
Per-episode values live in the recurrent state: at an episode's first step (level 0, glimpse 0) the
module draws the acting head and initialises h0 from the phase-1 sketch embedding. Every step it
also draws a bootstrap mask (Bernoulli(p) per head) and returns it, the acting head and the raw
(unclipped) location sample as extra outputs, which RLlib stores per timestep and hands to the
learner as train-batch columns (this survives the slicing of episodes across several learners).

Observation (dict, see sketch_env.env): glimpse (k, g, g), location (2,), level (int),
glimpse_index (int), sketch_embedding (D,). Action (dict): location (2,) in [-1, 1], query (D,).

model_config: the keys of `policies.darp.defaults.ModelConfig`, all optional (its defaults are `darp train`'s).

In local and dense match (issue 23) the observation also holds `descriptor` (d,), the phase-1 local
descriptor at the glimpse's cell, and `cell_ink` (h * w,); the glimpse network reads both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.annotations import override

from policies.darp.defaults import ModelConfig
from policies.darp.networks import ActionNetwork, CoreNetwork, GlimpseNetwork, LocatorHeads, ValueHead

HEAD = "head"
BOOTSTRAP_MASK = "bootstrap_mask"
LOCATION_SAMPLE = "location_sample"


class DARPModule(TorchRLModule):
    """Glimpse network -> core RNN -> (action network, K locator heads, baseline).

    Subclasses (policies.baselines.bdqn, policies.baselines.feature_policies) keep the core and replace where to look next:
    `attention = False` makes the glimpse network read the partial sketch's features only, and
    `setup_locator` builds the networks that choose the next location.
    """

    attention = True

    @override(TorchRLModule)
    def setup(self):
        cfg = ModelConfig.of(self.model_config)
        obs_space = self.observation_space
        embed_dim = obs_space["sketch_embedding"].shape[0]
        self.n_heads = int(cfg.n_heads)
        self.bootstrap_p = float(cfg.bootstrap_p)
        self.eval_heads = cfg.eval_heads
        if self.eval_heads not in ("mean", "first"):
            raise ValueError(f"eval_heads must be 'mean' or 'first', got {self.eval_heads!r}")
        hidden = int(cfg.hidden)
        glimpse_hidden = int(cfg.glimpse_hidden)
        self.local_obs = "descriptor" in obs_space.spaces
        local_size = obs_space["descriptor"].shape[0] + obs_space["cell_ink"].shape[0] if self.local_obs else 0
        self.glimpse_net = GlimpseNetwork(
            obs_space["glimpse"].shape, embed_dim, glimpse_hidden, bool(cfg.use_sketch_embedding),
            self.attention, cfg.retina_encoder, local_size,
        )
        self.core = CoreNetwork(glimpse_hidden, embed_dim, hidden, cfg.cell, cfg.h0_init)
        # residual_query: a_t = normalize(e_t + ACTN(h_t)) with e_t the phase-1 embedding of the current
        # partial sketch and ACTN's last layer zero-initialised, so training starts from the triplet
        # network's query and learns a correction (far less prone to memorising training photos).
        self.residual_query = bool(cfg.residual_query)
        self.action_net = ActionNetwork(
            hidden, embed_dim, zero_init=self.residual_query, dropout=float(cfg.dropout)
        )
        self.setup_locator(cfg, hidden)

    def setup_locator(self, cfg: ModelConfig, hidden: int) -> None:
        """The networks that choose the next location from h (H = `hidden`): K Gaussian heads + baseline."""
        self.locator = LocatorHeads(hidden, self.n_heads)
        self.baseline = ValueHead(hidden)
        # Not learned: set from the std schedule by the learner; a buffer so it syncs with the weights.
        self.register_buffer("std", torch.tensor(float(cfg.std)))

    @override(TorchRLModule)
    def get_initial_state(self) -> dict[str, Any]:
        state = {k: v.numpy() for k, v in self.core.initial_state().items()}
        state[HEAD] = np.zeros((), np.int64)
        return state

    def _core(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Run glimpse net + core over (B, T). Returns h (B, T, H), core state out, starts (B,)."""
        obs = batch[Columns.OBS]
        state_in = batch[Columns.STATE_IN]
        starts = (obs["level"][:, 0] == 0) & (obs["glimpse_index"][:, 0] == 0)
        local = torch.cat([obs["descriptor"], obs["cell_ink"]], -1) if self.local_obs else None
        g = self.glimpse_net(obs["glimpse"], obs["location"], obs["level"], obs["sketch_embedding"], local)
        core_state = {k: state_in[k] for k in ("h", "c") if k in state_in}
        h, core_out = self.core(g, core_state, starts, obs["sketch_embedding"][:, 0])
        return h, core_out, starts

    def predict_query(self, h: torch.Tensor, batch, train: bool = False) -> torch.Tensor:
        """The action network's query (B, T, D) from h (B, T, H), residual on the observed embedding if set.

        train: the learner's forward (dropout on, if configured)."""
        base = batch[Columns.OBS]["sketch_embedding"] if self.residual_query else None
        return self.action_net(h, base, train=train)

    def acting_head(self, batch, starts: torch.Tensor) -> torch.Tensor:
        """(B,) the head that acts: drawn at an episode's first step (starts (B,) bool), else kept."""
        head = batch[Columns.STATE_IN][HEAD].long().reshape(len(starts))
        drawn = torch.randint(0, self.n_heads, head.shape, device=head.device)
        return torch.where(starts, drawn, head)

    def bootstrap_mask(self, B: int, T: int, device) -> torch.Tensor:
        """(B, T, K) float: which heads learn from each experience, Bernoulli(bootstrap_p) per head."""
        return (torch.rand(B, T, self.n_heads, device=device) < self.bootstrap_p).float()

    def _act(self, batch, explore: bool) -> dict[str, Any]:
        h, state_out, starts = self._core(batch)
        B, T = h.shape[:2]
        query = self.predict_query(h, batch)
        means = self.locator(h.detach())  # (B, T, K, 2)
        head = batch[Columns.STATE_IN][HEAD].long().reshape(B)
        if explore:
            head = self.acting_head(batch, starts)
            mean = means[torch.arange(B, device=h.device), :, head]  # (B, T, 2)
            sample = mean + self.std * torch.randn_like(mean)
            logp = torch.distributions.Normal(mean, self.std).log_prob(sample).sum(-1)
            mask = self.bootstrap_mask(B, T, h.device)
        else:
            sample = means.mean(dim=2) if self.eval_heads == "mean" else means[:, :, 0]
            logp = torch.zeros(B, T, device=h.device)
            mask = torch.ones(B, T, self.n_heads, device=h.device)
        state_out[HEAD] = head
        return {
            Columns.ACTIONS: {"location": sample.clamp(-1.0, 1.0), "query": query},
            Columns.ACTION_LOGP: logp,
            Columns.STATE_OUT: state_out,
            HEAD: head[:, None].expand(B, T),
            BOOTSTRAP_MASK: mask,
            LOCATION_SAMPLE: sample,
        }

    @override(TorchRLModule)
    def _forward_exploration(self, batch, **kwargs):
        return self._act(batch, explore=True)

    @override(TorchRLModule)
    def _forward_inference(self, batch, **kwargs):
        return self._act(batch, explore=False)

    @override(TorchRLModule)
    def _forward(self, batch, **kwargs):
        return self._act(batch, explore=False)

    @override(TorchRLModule)
    def _forward_train(self, batch, **kwargs):
        """(B, T) sequences of whole episodes -> query (B, T, D), locator means (B, T, K, 2), baseline (B, T)."""
        h, _, _ = self._core(batch)
        return {
            "query": self.predict_query(h, batch, train=True),
            "locator_means": self.locator(h.detach()),
            "baseline": self.baseline(h.detach()),
        }

    def set_std(self, value: float) -> None:
        self.std.fill_(float(value))
