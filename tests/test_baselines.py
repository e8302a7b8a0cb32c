"""The baselines and ablations: modules and losses on hand-made batches, then each trains and evaluates."""

import json

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from policies.baselines.feature_policies import QUERY_SAMPLE, NoAttentionModule, SketchPolicyModule, reinforce_loss
from policies.baselines.bdqn import LOCATION_CELL, BDQNModule, grid_cells, td_loss, td_targets
from policies.darp.module import BOOTSTRAP_MASK
from policies.darp.networks import GlimpseNetwork
from policies.baselines.ppo import PPOSketchModule, QueryGaussian, QueryMean, UnitQueryForEnv, unit_query
from policies.running.registry import ALGOS, TrainConfig, with_algo_defaults
from tests.module_batches import D, batch, spaces, state

K = 4


def build(cls, **cfg):
    obs, act = spaces()
    return cls(observation_space=obs, action_space=act, model_config={"n_heads": K, "hidden": 32, "glimpse_hidden": 16,
                                                                      "std": 0.3, **cfg})


def forward(module, B, explore, start=True, T=1):
    return (module.forward_exploration if explore else module.forward_inference)(
        {Columns.OBS: batch(B, T, start=start), Columns.STATE_IN: state(module, B)})


def test_glimpse_network_without_attention_ignores_glimpse_and_location():
    net = GlimpseNetwork((2, 8, 8), D, 16, attention=False)
    obs = batch(5, 1)
    a = net(obs["glimpse"], obs["location"], obs["level"], obs["sketch_embedding"])
    b = net(torch.rand_like(obs["glimpse"]), -obs["location"], obs["level"], obs["sketch_embedding"])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="use_sketch_embedding"):
        GlimpseNetwork((2, 8, 8), D, 16, use_sketch_embedding=False, attention=False)


@pytest.mark.parametrize("explore", [True, False])
def test_no_attention_module_looks_at_the_centre_and_keeps_a_core_state(explore):
    m = build(NoAttentionModule)
    assert not hasattr(m, "locator") and m.glimpse_net.what is None
    out = forward(m, 3, explore)
    assert torch.equal(out[Columns.ACTIONS]["location"], torch.zeros(3, 1, 2))
    assert torch.allclose(out[Columns.ACTIONS]["query"].norm(dim=-1), torch.ones(3, 1), atol=1e-5)
    assert set(out[Columns.STATE_OUT]) == {"h"} and out[Columns.STATE_OUT]["h"].shape == (3, 32)
    assert m._forward_train({Columns.OBS: batch(3, 5), Columns.STATE_IN: state(m, 3)})["query"].shape == (3, 5, D)


@pytest.mark.parametrize("B", [1, D])
def test_sketch_policy_samples_unit_queries_and_its_logp_matches_the_loss(B):
    torch.manual_seed(0)
    m = build(SketchPolicyModule)
    out = m.forward_exploration({Columns.OBS: batch(B, 1)})
    assert Columns.STATE_OUT not in out, "a stateless module must not invent a state for RLlib"
    query, sample = out[Columns.ACTIONS]["query"], out[QUERY_SAMPLE]
    assert query.shape == sample.shape == (B, 1, D) and out[Columns.ACTION_LOGP].shape == (B, 1)
    assert torch.allclose(query.norm(dim=-1), torch.ones(B, 1), atol=1e-5)
    assert not torch.allclose(sample.norm(dim=-1), torch.ones(B, 1), atol=1e-3), "the learner needs the raw sample"
    train = m._forward_train({Columns.OBS: batch(B, 1)})
    returns = torch.linspace(-1, 1, B)[:, None]
    loss_batch = {Columns.RETURNS_TO_GO: returns, QUERY_SAMPLE: sample}
    _, stats = reinforce_loss(train, loss_batch, 0.3 / D**0.5)
    logp = out[Columns.ACTION_LOGP]
    expected = -(logp * (returns - train["baseline"]).detach()).mean()
    assert stats["policy_loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    inference = forward(m, B, explore=False)
    assert inference[Columns.STATE_OUT] == {}
    assert torch.allclose(inference[Columns.ACTIONS]["query"], train["query_mean"], atol=1e-6)


def test_grid_cells_are_cell_centres_row_major():
    cells = grid_cells(5)
    assert cells.shape == (25, 2)
    assert torch.allclose(cells[0], torch.tensor([-0.8, -0.8])) and torch.allclose(cells[1], torch.tensor([-0.4, -0.8]))
    assert torch.allclose(cells[12], torch.zeros(2)) and torch.allclose(cells[24], torch.tensor([0.8, 0.8]))


def test_td_targets_by_hand():
    # one episode of 3 valid steps + 1 padded step, K = 2 heads, A = 2 cells
    q = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]],
                       [[3.0, 0.5], [4.0, 5.0]],
                       [[-1.0, -2.0], [7.0, 6.0]],
                       [[9.0, 9.0], [9.0, 9.0]]]], requires_grad=True)  # (1, 4, 2, 2)
    rewards = torch.tensor([[0.1, 0.2, 0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    y = td_targets(q, rewards, mask, gamma=0.5)
    expected = torch.tensor([[[0.1 + 0.5 * 3.0, 0.1 + 0.5 * 5.0],
                              [0.2 + 0.5 * -1.0, 0.2 + 0.5 * 7.0],
                              [0.3, 0.3],  # last step: no bootstrap from the padded step
                              [0.0, 0.0]]])
    assert torch.allclose(y, expected)
    assert not y.requires_grad, "targets must be detached"


def test_td_loss_trains_only_masked_heads_on_the_taken_cell():
    q = torch.zeros(1, 2, 2, 3, requires_grad=True)
    cells = torch.tensor([[2, 0]])
    rewards = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    w = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # only head 0 at step 0 learns
    loss = td_loss(q, cells, rewards, mask, w, gamma=0.0)
    loss.backward()
    grad = q.grad[0]
    assert loss.item() == pytest.approx(0.5)  # Huber of error 1
    assert grad[0, 0, 2] != 0 and torch.count_nonzero(grad) == 1


@pytest.mark.parametrize("explore", [True, False])
def test_bdqn_module_looks_at_grid_cells(explore):
    torch.manual_seed(0)
    m = build(BDQNModule, grid=3)
    out = forward(m, 6, explore)
    loc, cell = out[Columns.ACTIONS]["location"], out[LOCATION_CELL]
    assert loc.shape == (6, 1, 2) and cell.shape == (6, 1) and out[BOOTSTRAP_MASK].shape == (6, 1, K)
    assert torch.equal(loc, grid_cells(3)[cell])
    train = m._forward_train({Columns.OBS: batch(6, 4), Columns.STATE_IN: state(m, 6)})
    assert train["q_values"].shape == (6, 4, K, 9) and train["query"].shape == (6, 4, D)
    assert not hasattr(m, "locator")


@pytest.mark.parametrize("shape", [(1,), (D,), (3, 5)])
def test_query_gaussian_shapes(shape):
    """logp, entropy and kl must have the batch shape at B = 1 and B = D (RLlib issue 53994)."""
    inputs = torch.randn(*shape, 2 * D)
    dist = QueryGaussian.from_logits(inputs)
    action = dist.sample()
    assert action["location"].shape == (*shape, 2) and action["query"].shape == (*shape, D)
    assert torch.equal(action["location"], torch.zeros(*shape, 2))
    for value in (dist.logp(action), dist.entropy(), dist.kl(QueryGaussian.from_logits(torch.randn(*shape, 2 * D)))):
        assert value.shape == shape
    mean, log_std = inputs.chunk(2, dim=-1)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(action["query"]).sum(-1)
    assert torch.allclose(dist.logp(action), expected)
    deterministic = dist.to_deterministic()
    assert isinstance(deterministic, QueryMean) and torch.equal(deterministic.sample()["query"], mean)
    obs, act = spaces()
    assert QueryGaussian.required_input_dim(act) == 2 * D


def test_ppo_module_dist_inputs_value_and_inference():
    m = build(PPOSketchModule)
    obs = batch(7, 1)
    flat = {k: v[:, 0] for k, v in obs.items()}
    out = m.forward_exploration({Columns.OBS: flat})
    assert out[Columns.ACTION_DIST_INPUTS].shape == (7, 2 * D)
    assert torch.allclose(out[Columns.ACTION_DIST_INPUTS][:, D:].exp(), torch.full((7, D), 0.3 / D**0.5))
    assert m.compute_values({Columns.OBS: flat}).shape == (7,)
    inference = m.forward_inference({Columns.OBS: obs, Columns.STATE_IN: {}})
    assert inference[Columns.ACTIONS]["query"].shape == (7, 1, D) and inference[Columns.STATE_OUT] == {}


def test_unit_query_connector_normalises_only_what_the_env_gets():
    raw = {"location": np.zeros(2, np.float32), "query": np.full(D, 0.5, np.float32)}
    assert np.linalg.norm(unit_query(raw)["query"]) == pytest.approx(1.0)
    batch_ = {Columns.ACTIONS: {("episode",): [raw]}}
    UnitQueryForEnv()(rl_module=None, batch=batch_, episodes=[])
    assert np.linalg.norm(batch_[Columns.ACTIONS_FOR_ENV][("episode",)][0]["query"]) == pytest.approx(1.0)
    assert np.array_equal(batch_[Columns.ACTIONS][("episode",)][0]["query"], np.full(D, 0.5)), "the episode keeps the raw sample"


def test_algo_defaults():
    base = dict(data="d", embedding="e", run_dir="r")
    assert with_algo_defaults(TrainConfig(**base)).n_glimpses == 12
    ppo = with_algo_defaults(TrainConfig(**base, algo="ppo"))
    assert (ppo.n_glimpses, ppo.gamma) == (1, 0.0)
    assert with_algo_defaults(TrainConfig(**base, algo="darp-no-attention", n_glimpses=3)).n_glimpses == 3
    flat = with_algo_defaults(TrainConfig(**base, algo="darp-no-exploration"))
    assert (flat.n_heads, flat.bootstrap_p, flat.std_start, flat.std_end, flat.gamma) == (1, 1.0, 0.05, 0.05, 0.99)


# --- end to end: each model trains one iteration on the tiny fixture and `darp evaluate` reads it ---


@pytest.mark.slow
@pytest.mark.parametrize("algo", [a for a in ALGOS if a != "darp"])
def test_each_model_trains_and_evaluates(ray_local, tiny, tmp_path, algo):
    from policies.running import evaluate
    from policies.running.fit import train

    data, phase1 = tiny
    run_dir = tmp_path / algo
    glimpses = 2 if algo in ("darp-no-exploration", "bdqn") else None
    train(TrainConfig(data=str(data), embedding=str(phase1), run_dir=str(run_dir), algo=algo, iterations=1,
                      num_envs_per_env_runner=4, episodes_per_batch=8, n_glimpses=glimpses, val_interval=0), quiet=True)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["kind"] == algo and run["config"]["n_glimpses"] == (glimpses or 1)
    metrics = evaluate.evaluate_run(evaluate.EvaluateConfig(data=data, run=run_dir, split="test", out=tmp_path / "eval"))
    assert metrics["n_sketches"] > 0 and 0 < metrics["auir"] <= 100
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["auir"] == pytest.approx(metrics["auir"])


@pytest.mark.parametrize("cls", [SketchPolicyModule, PPOSketchModule])
def test_untrained_feature_policies_query_with_the_phase1_embedding(cls):
    """Bhunia et al.'s policies start as the triplet network: the mean is the partial sketch's own embedding."""
    m = build(cls)
    obs = batch(4, 1)
    out = m.forward_inference({Columns.OBS: obs, Columns.STATE_IN: {}})
    assert torch.allclose(out[Columns.ACTIONS]["query"], torch.nn.functional.normalize(obs["sketch_embedding"], dim=-1),
                          atol=1e-6)
