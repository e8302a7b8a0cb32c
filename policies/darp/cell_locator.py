"""DARP with a locator that picks a cell of the local grid: `darp train --locator-head cells --match local`.

Why: in local match the Gaussian locator's deterministic location (the mean of K heads) parks on a few
places: 3.7 distinct cells of an 8 x 8 grid per sketch over 51 glimpses on Chair-V2, where the ink rule
spreads over 19 (`benchmarks/bench_local_attention.py`), and AUIR follows the spread (README, issue 23).
A point-valued policy cannot say "somewhere on the ink I have not read yet"; this one can.

The locator: K bootstrapped heads of logits over the h x w cells, read from h_t detached (as DARP's
Gaussian heads). Only cells that hold ink (the observation's `cell_ink`) and that the level has not read
yet are allowed; where none is left, any inked cell; on a blank sketch, any cell. The logits start at
zero, so an untrained locator is the rule "a uniformly drawn unread inked cell". Exploring, the episode's
acting head samples a cell; acting deterministically, the argmax of the heads' mean probabilities
(`eval_heads` "mean") or of head 0. The glimpse goes to the cell's centre. The cells read so far at the
current level are recomputed from the observed locations in a training sequence and carried in the
recurrent state (`READ_CELLS`) between single steps. The learner (`policies.darp.learner.darp_loss`)
takes the log-probability of the chosen cell (`CHOSEN_CELL`) under each head's masked softmax in place
of the Gaussian's: the same bootstrapped REINFORCE on the same returns.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override
from torch import nn

from policies.darp.defaults import ModelConfig
from policies.darp.module import BOOTSTRAP_MASK, HEAD, LOCATION_SAMPLE, DARPModule
from policies.darp.networks import ValueHead
from sketch_env.local_match import cell_centres, cell_of

READ_CELLS = "read_cells"  # recurrent state: (h * w,) the cells read so far at the current level
CHOSEN_CELL = "chosen_cell"  # extra output / train-batch column: (B, T) the cell looked at next
BLOCKED = -1e9  # the logit of a cell that may not be chosen


class CellLocatorModule(DARPModule):
    """DARPModule whose locator chooses among the unread inked cells of the local grid (needs local match)."""

    @override(DARPModule)
    def setup_locator(self, cfg: ModelConfig, hidden: int) -> None:
        if not self.local_obs:
            raise ValueError("locator_head 'cells' chooses cells of the local descriptor grid: train with --match local")
        self.n_cells = int(self.observation_space["cell_ink"].shape[0])
        side = math.isqrt(self.n_cells)
        if side * side != self.n_cells:
            raise ValueError(f"locator_head 'cells' needs a square local grid, got {self.n_cells} cells")
        self.side = side
        self.glimpses_per_level = int(self.observation_space["glimpse_index"].n)
        self.cell_logits = nn.Linear(hidden, self.n_heads * self.n_cells)
        nn.init.zeros_(self.cell_logits.weight)
        nn.init.zeros_(self.cell_logits.bias)
        self.baseline = ValueHead(hidden)
        self.register_buffer("centres", cell_centres(side, side))
        self.register_buffer("std", torch.tensor(float(cfg.std)))  # unused here; DARPLearner sets it every update

    @override(DARPModule)
    def get_initial_state(self) -> dict[str, Any]:
        state = super().get_initial_state()
        state[READ_CELLS] = np.zeros(self.n_cells, np.float32)
        return state

    def allowed_cells(self, obs: dict, read_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) bool: the cells the location chosen at each step may go to, and (B, C) the cells read at
        the level by the sequence's last step (the next state). The location chosen at step t is read at
        t + 1: on the same level unless t is the level's last glimpse, when a new level starts unread."""
        B, T = obs["glimpse_index"].shape
        looked = cell_of(obs["location"].reshape(-1, 2), self.side, self.side).reshape(B, T)
        seen = torch.nn.functional.one_hot(looked, self.n_cells).bool()  # (B, T, C)
        read, steps = read_in.reshape(B, self.n_cells).bool(), []
        for t in range(T):  # the level's cells so far; a level's first glimpse starts afresh
            read = torch.where((obs["glimpse_index"][:, t] == 0)[:, None], seen[:, t], read | seen[:, t])
            steps.append(read)
        read_so_far = torch.stack(steps, 1)
        new_level = obs["glimpse_index"] == self.glimpses_per_level - 1
        ink = obs["cell_ink"] > 0
        allowed = ink & ~(read_so_far & ~new_level[..., None])
        allowed = torch.where(allowed.any(-1, keepdim=True), allowed, ink)
        allowed = torch.where(allowed.any(-1, keepdim=True), allowed, torch.ones_like(allowed))
        return allowed, read.float()

    def masked_logits(self, h: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """(B, T, K, C) logits of every head, BLOCKED where a cell is not allowed; h (B, T, H) detached."""
        logits = self.cell_logits(h).unflatten(-1, (self.n_heads, self.n_cells))
        return logits.masked_fill(~allowed[:, :, None], BLOCKED)

    @override(DARPModule)
    def _act(self, batch, explore: bool) -> dict[str, Any]:
        h, state_out, starts = self._core(batch)
        B, T = h.shape[:2]
        query = self.predict_query(h, batch)
        allowed, read = self.allowed_cells(batch[Columns.OBS], batch[Columns.STATE_IN][READ_CELLS])
        logits = self.masked_logits(h.detach(), allowed)
        head = batch[Columns.STATE_IN][HEAD].long().reshape(B)
        if explore:
            head = self.acting_head(batch, starts)
            own = logits[torch.arange(B, device=h.device), :, head]  # (B, T, C)
            cell = torch.distributions.Categorical(logits=own).sample()
            logp = torch.log_softmax(own, -1).gather(-1, cell[..., None]).squeeze(-1)
            mask = self.bootstrap_mask(B, T, h.device)
        else:
            probs = torch.softmax(logits, -1)
            cell = (probs.mean(dim=2) if self.eval_heads == "mean" else probs[:, :, 0]).argmax(-1)
            logp = torch.zeros(B, T, device=h.device)
            mask = torch.ones(B, T, self.n_heads, device=h.device)
        state_out[HEAD] = head
        state_out[READ_CELLS] = read
        location = self.centres[cell]
        return {
            Columns.ACTIONS: {"location": location, "query": query},
            Columns.ACTION_LOGP: logp,
            Columns.STATE_OUT: state_out,
            HEAD: head[:, None].expand(B, T),
            BOOTSTRAP_MASK: mask,
            LOCATION_SAMPLE: location,
            CHOSEN_CELL: cell,
        }

    @override(DARPModule)
    def _forward_train(self, batch, **kwargs):
        """(B, T) sequences -> query (B, T, D), masked cell logits (B, T, K, C), baseline (B, T)."""
        h, _, _ = self._core(batch)
        allowed, _ = self.allowed_cells(batch[Columns.OBS], batch[Columns.STATE_IN][READ_CELLS])
        return {
            "query": self.predict_query(h, batch, train=True),
            "locator_logits": self.masked_logits(h.detach(), allowed),
            "baseline": self.baseline(h.detach()),
        }


__all__ = ["BLOCKED", "CHOSEN_CELL", "READ_CELLS", "CellLocatorModule"]
