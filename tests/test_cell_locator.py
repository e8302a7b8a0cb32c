"""The cell locator (policies.darp.cell_locator): DARP's locator choosing among the unread inked cells of the
local grid, its loss, and `darp train --locator-head cells` end to end in local match."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from policies.darp.cell_locator import CHOSEN_CELL, READ_CELLS, CellLocatorModule
from policies.darp.learner import darp_loss
from policies.darp.module import BOOTSTRAP_MASK
from sketch_env.local_match import cell_centres, cell_of
from tests.module_batches import D, G, K, spaces, state

SIDE = 4  # a 4 x 4 local grid


def local_spaces():
    obs, act = spaces()
    obs = gym.spaces.Dict({**obs.spaces, "descriptor": gym.spaces.Box(-1, 1, (8,), np.float32),
                           "cell_ink": gym.spaces.Box(0, 1, (SIDE * SIDE,), np.float32)})
    return obs, act


def make_cell_module(**cfg):
    obs, act = local_spaces()
    cfg = {"n_heads": K, "hidden": 32, "glimpse_hidden": 16, "locator_head": "cells", **cfg}
    return CellLocatorModule(observation_space=obs, action_space=act, model_config=cfg)


def one_level_obs(B: int, inked: list[int], looked: list[int]):
    """(B, T = len(looked)) steps of one level (glimpse index 0..T-1) looking at cells `looked`; ink in `inked`."""
    T = len(looked)
    ink = torch.zeros(SIDE * SIDE)
    ink[inked] = 0.5
    centres = cell_centres(SIDE, SIDE)
    return {
        "glimpse": torch.rand(B, T, 2, 8, 8),
        "location": centres[torch.tensor(looked)].expand(B, T, 2).clone(),
        "level": torch.full((B, T), 2),
        "glimpse_index": torch.arange(T).expand(B, T).clone(),
        "sketch_embedding": torch.nn.functional.normalize(torch.randn(B, T, D), dim=-1),
        "descriptor": torch.zeros(B, T, 8),
        "cell_ink": ink.expand(B, T, SIDE * SIDE).clone(),
    }


def test_a_location_may_go_to_inked_cells_the_level_has_not_read():
    module = make_cell_module()
    obs = one_level_obs(1, inked=[1, 5, 6, 9], looked=[5, 6, 0])  # G = 3 glimpses per level
    allowed, read = module.allowed_cells(obs, torch.zeros(1, SIDE * SIDE))
    chosen = [set(np.flatnonzero(a).tolist()) for a in allowed[0].numpy()]
    assert chosen[0] == {1, 6, 9}  # after reading 5
    assert chosen[1] == {1, 9}  # after reading 5 and 6
    assert chosen[2] == {1, 5, 6, 9}  # the level's last glimpse: the next location opens a new level
    assert set(np.flatnonzero(read[0]).tolist()) == {0, 5, 6}  # the state carried to the next step
    # every inked cell read: any inked cell again; no ink at all: any cell
    full = module.allowed_cells(one_level_obs(1, inked=[5, 6], looked=[5, 6]), torch.zeros(1, SIDE * SIDE))[0]
    assert set(np.flatnonzero(full[0, 1]).tolist()) == {5, 6}
    blank = module.allowed_cells(one_level_obs(1, inked=[], looked=[0]), torch.zeros(1, SIDE * SIDE))[0]
    assert bool(blank.all())


def test_single_steps_carry_the_read_cells_as_the_sequence_computes_them():
    module = make_cell_module()
    obs = one_level_obs(2, inked=[1, 2, 5, 6, 9, 10], looked=[5, 6, 9])
    whole, _ = module.allowed_cells(obs, torch.zeros(2, SIDE * SIDE))
    read = torch.zeros(2, SIDE * SIDE)
    for t in range(3):
        step, read = module.allowed_cells({k: v[:, t : t + 1] for k, v in obs.items()}, read)
        assert torch.equal(step[:, 0], whole[:, t])


@pytest.mark.parametrize("explore", [False, True])
def test_acting_over_a_level_looks_at_distinct_inked_cells(explore):
    torch.manual_seed(0)
    module = make_cell_module()
    for p in module.cell_logits.parameters():  # trained-looking logits: not all equal
        torch.nn.init.normal_(p, std=1.0)
    B, inked = 16, [1, 2, 5, 6, 9, 10, 13]
    s = state(module, B)
    obs = one_level_obs(B, inked, looked=[0])
    chosen = []
    for t in range(G - 1):  # the locations of glimpses 1 .. G-1 of the level
        obs["glimpse_index"][:] = t
        out = module.forward_exploration({Columns.OBS: obs, Columns.STATE_IN: s}) if explore else \
            module.forward_inference({Columns.OBS: obs, Columns.STATE_IN: s})
        cell = out[CHOSEN_CELL][:, 0]
        assert torch.equal(out[Columns.ACTIONS]["location"][:, 0], cell_centres(SIDE, SIDE)[cell])
        assert torch.equal(cell_of(out[Columns.ACTIONS]["location"][:, 0], SIDE, SIDE), cell)
        chosen.append(cell)
        s = out[Columns.STATE_OUT]
        obs["location"] = out[Columns.ACTIONS]["location"]
    chosen = torch.stack(chosen, 1)
    assert set(chosen.flatten().tolist()) <= set(inked) - {0}
    assert all(len(set(row.tolist())) == G - 1 for row in chosen)  # no cell twice in a level
    assert set(s[READ_CELLS].sum(1).tolist()) == {float(G - 1)}  # glimpses 0 .. G-2 read so far (cell 0 + chosen)


def test_the_policy_gradient_takes_the_chosen_cells_log_probability():
    module = make_cell_module()
    B, inked = 3, [1, 5, 6, 9]
    obs = one_level_obs(B, inked, looked=[5, 6, 0])
    fwd = module.forward_train({Columns.OBS: obs, Columns.STATE_IN: state(module, B)})
    # zero-initialised logits: uniform over the allowed cells (3, 2, then 4 at the level's last glimpse)
    probs = torch.softmax(fwd["locator_logits"], -1)
    assert torch.allclose(probs[0, :, 0].max(-1).values, torch.tensor([1 / 3, 1 / 2, 1 / 4]))
    batch = {
        Columns.OBS: obs, Columns.LOSS_MASK: torch.ones(B, 3), Columns.RETURNS_TO_GO: torch.ones(B, 3),
        CHOSEN_CELL: torch.tensor([1, 9, 6]).expand(B, 3), BOOTSTRAP_MASK: torch.ones(B, 3, K),
        "location_sample": torch.zeros(B, 3, 2),
    }
    fwd["baseline"] = torch.zeros(B, 3)
    _, stats = darp_loss(fwd, batch, torch.tensor(0.1), rl_weight=1.0, sup_lambda=0.0,
                         supervised_objective=lambda query, batch, mask: torch.zeros(()))
    # -mean log(1 / n_allowed) x advantage 1
    assert stats["policy_loss"].item() == pytest.approx(np.mean(np.log([3, 2, 4])), rel=1e-5)


def test_the_cell_locator_needs_local_match():
    obs, act = spaces()
    with pytest.raises(ValueError, match="--match local"):
        CellLocatorModule(observation_space=obs, action_space=act, model_config={"n_heads": K, "locator_head": "cells"})
    from policies.running.registry import TrainConfig, with_algo_defaults

    with pytest.raises(ValueError, match="--locator-head cells"):
        with_algo_defaults(TrainConfig(data="d", embedding="e", run_dir="r", locator_head="cells"))


@pytest.mark.slow
def test_darp_train_with_the_cell_locator_runs_and_evaluates_in_local_match(local_cells_setup, tmp_path):
    from tune_runs.cli import main

    data, phase1 = local_cells_setup
    run_dir = tmp_path / "cells"
    assert main(["train", "--data", str(data), "--embedding", str(phase1), "--run-dir", str(run_dir), "--match", "local",
                 "--locator-head", "cells", "--iterations", "2", "--num-envs-per-env-runner", "4",
                 "--episodes-per-batch", "4", "--n-glimpses", "2", "--val-interval", "1"]) == 0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["config"]["locator_head"] == "cells" and run["status"] == "finished"
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "--run", str(run_dir), "--split", "train", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["locator"] == "policy" and metrics["fovea_on_ink"] > 0.5 and 0 < metrics["auir"] <= 100
    # two glimpses per level on distinct cells: more than one cell per episode
    assert metrics["glimpse_cells"] > 2.0


@pytest.fixture(scope="module")
def local_cells_setup(tmp_path_factory):
    from sketch_env.data.generate import generate_dataset
    from tests.rl_fixtures import make_phase1_run

    root = tmp_path_factory.mktemp("cells")
    data = generate_dataset(root / "data", n_photos=8, sketches_per_photo=2, seed=0, test_fraction=0.25)
    return data, make_phase1_run(root, data, local_dim=8)
