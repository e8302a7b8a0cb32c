"""DARP's RLModule and loss on hand-made batches (no env, no Ray cluster)."""

import pytest
import torch
from ray.rllib.core.columns import Columns

from policies.darp.learner import darp_loss
from policies.darp.module import BOOTSTRAP_MASK, HEAD, LOCATION_SAMPLE
from policies.darp.schedules import StdSchedule
from policies.darp.supervised import TARGET_EMBEDDING
from tests.module_batches import D, K, batch, make_module, state


@pytest.mark.parametrize("B", [1, 2, D])
def test_exploration_outputs_have_per_sample_shapes(B):
    m = make_module()
    out = m.forward_exploration({Columns.OBS: batch(B, 1), Columns.STATE_IN: state(m, B)})
    assert out[Columns.ACTIONS]["location"].shape == (B, 1, 2)
    assert out[Columns.ACTIONS]["query"].shape == (B, 1, D)
    assert out[Columns.ACTION_LOGP].shape == (B, 1)
    assert out[BOOTSTRAP_MASK].shape == (B, 1, K)
    assert out[HEAD].shape == (B, 1)
    assert out[LOCATION_SAMPLE].shape == (B, 1, 2)
    assert out[Columns.ACTIONS]["location"].abs().max() <= 1.0
    q = out[Columns.ACTIONS]["query"]
    assert torch.allclose(q.norm(dim=-1), torch.ones(B, 1), atol=1e-5)


def test_head_is_drawn_at_episode_start_and_kept_after():
    torch.manual_seed(0)
    m = make_module()
    B = 64
    out = m.forward_exploration({Columns.OBS: batch(B, 1, start=True), Columns.STATE_IN: state(m, B)})
    heads = out[Columns.STATE_OUT][HEAD]
    assert len(set(heads.tolist())) > 1, "episode starts must draw different heads"
    out2 = m.forward_exploration({Columns.OBS: batch(B, 1, start=False), Columns.STATE_IN: out[Columns.STATE_OUT]})
    assert torch.equal(out2[Columns.STATE_OUT][HEAD], heads)


def test_h0_comes_from_the_sketch_embedding_only_at_episode_start():
    m = make_module()
    obs = batch(2, 1, start=True)
    obs2 = {k: v.clone() for k, v in obs.items()}
    obs2["sketch_embedding"] = -obs2["sketch_embedding"]
    a = m.forward_inference({Columns.OBS: obs, Columns.STATE_IN: state(m, 2)})[Columns.STATE_OUT]["h"]
    b = m.forward_inference({Columns.OBS: obs2, Columns.STATE_IN: state(m, 2)})[Columns.STATE_OUT]["h"]
    assert not torch.allclose(a, b)
    zeros = make_module(h0_init="zeros", use_sketch_embedding=False)
    a = zeros.forward_inference({Columns.OBS: obs, Columns.STATE_IN: state(zeros, 2)})[Columns.STATE_OUT]["h"]
    b = zeros.forward_inference({Columns.OBS: obs2, Columns.STATE_IN: state(zeros, 2)})[Columns.STATE_OUT]["h"]
    assert torch.allclose(a, b)


def test_inference_is_deterministic():
    m = make_module()
    inp = {Columns.OBS: batch(3, 1), Columns.STATE_IN: state(m, 3)}
    a = m.forward_inference(inp)[Columns.ACTIONS]
    b = m.forward_inference(inp)[Columns.ACTIONS]
    assert torch.equal(a["location"], b["location"]) and torch.equal(a["query"], b["query"])


def train_batch(m, B=4, T=5, mask_heads=None):
    obs = batch(B, T)
    out = m.forward_train({Columns.OBS: obs, Columns.STATE_IN: state(m, B)})
    bmask = torch.ones(B, T, K) if mask_heads is None else mask_heads.expand(B, T, K).clone()
    data = {
        Columns.LOSS_MASK: torch.ones(B, T, dtype=torch.bool),
        Columns.RETURNS_TO_GO: torch.linspace(-1, 1, B * T).reshape(B, T),
        TARGET_EMBEDDING: torch.nn.functional.normalize(torch.randn(B, T, D), dim=-1),
        LOCATION_SAMPLE: torch.rand(B, T, 2) * 2 - 1,
        BOOTSTRAP_MASK: bmask,
    }
    return out, data


def test_supervised_loss_never_reaches_the_locator_and_rl_never_reaches_the_core():
    m = make_module()
    out, data = train_batch(m)
    loss, _ = darp_loss(out, data, m.std, rl_weight=0.0, sup_lambda=1.0)
    loss.backward()
    assert m.locator.fc.weight.grad is None or m.locator.fc.weight.grad.abs().sum() == 0
    assert m.action_net.fc[-1].weight.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)
    out, data = train_batch(m)
    loss, _ = darp_loss(out, data, m.std, rl_weight=1.0, sup_lambda=0.0)
    loss.backward()
    assert m.core.rnn.weight_ih_l0.grad is None or m.core.rnn.weight_ih_l0.grad.abs().sum() == 0
    assert m.locator.fc.weight.grad.abs().sum() > 0


def test_bootstrap_mask_silences_heads():
    m = make_module()
    only_head_1 = torch.zeros(1, 1, K)
    only_head_1[..., 1] = 1.0
    out, data = train_batch(m, mask_heads=only_head_1)
    loss, _ = darp_loss(out, data, m.std, rl_weight=1.0, sup_lambda=0.0)
    loss.backward()
    grad = m.locator.fc.weight.grad.reshape(K, 2, -1)
    assert grad[1].abs().sum() > 0
    for k in (0, 2, 3):
        assert grad[k].abs().sum() == 0


def test_loss_matches_hand_computation_for_one_step():
    m = make_module()
    out, data = train_batch(m, B=1, T=1)
    loss, stats = darp_loss(out, data, m.std, rl_weight=0.5, sup_lambda=2.0)
    sup = ((out["query"] - data[TARGET_EMBEDDING]) ** 2).sum()
    ret = data[Columns.RETURNS_TO_GO][0, 0]
    adv = ret - out["baseline"][0, 0]
    logp = torch.distributions.Normal(out["locator_means"][0, 0], m.std).log_prob(data[LOCATION_SAMPLE][0, 0]).sum(-1)
    pg = -(logp * adv).mean()
    expected = 0.5 * (pg + adv**2) + 2.0 * sup
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(stats["supervised_loss"], sup)


@pytest.mark.parametrize("shape", ["linear", "exponential", "cosine"])
def test_std_schedule_runs_from_start_to_end(shape):
    s = StdSchedule(0.4, 0.1, shape, 1000)
    assert s(0) == pytest.approx(0.4)
    assert s(1000) == pytest.approx(0.1)
    assert s(5000) == pytest.approx(0.1)
    values = [s(t) for t in range(0, 1001, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_std_schedule_rejects_bad_values():
    with pytest.raises(ValueError):
        StdSchedule(0.0, 0.1)
    with pytest.raises(ValueError):
        StdSchedule(0.3, 0.1, "linear", 0)


def test_residual_query_starts_at_the_phase1_embedding():
    m = make_module(residual_query=True)
    obs = batch(3, 1)
    q = m.forward_inference({Columns.OBS: obs, Columns.STATE_IN: state(m, 3)})[Columns.ACTIONS]["query"]
    assert torch.allclose(q, obs["sketch_embedding"], atol=1e-6)
    free = make_module(residual_query=False)
    q = free.forward_inference({Columns.OBS: obs, Columns.STATE_IN: state(free, 3)})[Columns.ACTIONS]["query"]
    assert not torch.allclose(q, obs["sketch_embedding"], atol=1e-3)


def test_dropout_acts_in_the_learner_forward_only():
    m = make_module(residual_query=False, dropout=0.5)
    inp = {Columns.OBS: batch(3, 4), Columns.STATE_IN: state(m, 3)}
    torch.manual_seed(0)
    explore = [m.forward_exploration(inp)[Columns.ACTIONS]["query"] for _ in range(2)]
    inference = [m.forward_inference(inp)[Columns.ACTIONS]["query"] for _ in range(2)]
    trained = [m.forward_train(inp)["query"] for _ in range(2)]
    assert torch.equal(explore[0], explore[1]) and torch.equal(inference[0], inference[1])
    assert torch.allclose(inference[0], explore[0])  # the query does not depend on exploration
    assert not torch.allclose(trained[0], trained[1])
    plain = make_module(residual_query=False, dropout=0.0)
    plain.load_state_dict(m.state_dict())
    assert torch.allclose(plain.forward_train(inp)["query"], inference[0])


def test_dropout_rejects_bad_values():
    with pytest.raises(ValueError, match="dropout"):
        make_module(dropout=1.0)


def test_conv_retina_reads_sharp_glimpses():
    from policies.darp.networks import GlimpseNetwork

    net = GlimpseNetwork((3, 16, 16), 8, 32, encoder="conv")
    out = net(torch.rand(2, 5, 3, 16, 16), torch.zeros(2, 5, 2), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, 8))
    assert out.shape == (2, 5, 32)
    out.sum().backward()
    assert net.what.net[0].weight.grad.abs().sum() > 0  # the patches reach the convolutions
    with pytest.raises(ValueError, match="'linear' or 'conv'"):
        GlimpseNetwork((3, 8, 8), 8, 32, encoder="mlp")


def test_normalised_advantages_ignore_the_scale_and_offset_of_returns():
    m = make_module()
    out, data = train_batch(m)
    _, plain = darp_loss(out, data, m.std, rl_weight=1.0, sup_lambda=0.0, advantage_norm=True)
    shifted = dict(data)
    shifted[Columns.RETURNS_TO_GO] = 10.0 * data[Columns.RETURNS_TO_GO] + 3.0
    baseline = out["baseline"].detach()
    out_shifted = dict(out, baseline=10.0 * baseline + 3.0)  # the same advantages, 10 x larger
    _, scaled = darp_loss(out_shifted, shifted, m.std, rl_weight=1.0, sup_lambda=0.0, advantage_norm=True)
    assert torch.allclose(plain["policy_loss"], scaled["policy_loss"], atol=1e-5)
    _, raw = darp_loss(out_shifted, shifted, m.std, rl_weight=1.0, sup_lambda=0.0)
    assert not torch.allclose(raw["policy_loss"], scaled["policy_loss"], atol=1e-3)
