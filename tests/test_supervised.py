"""The supervised term: squared error and the infonce ranking loss over the gallery."""

import math

import numpy as np
import pytest
import torch

from policies.darp.supervised import TARGET_EMBEDDING, TARGET_INDEX, AddTargetEmbeddings, SupervisedObjective
from sketch_env.episodes import load_episode_data, load_supervised_targets


def test_mse_averages_valid_steps_only():
    mse = SupervisedObjective("mse")
    q = torch.zeros(2, 3, 2)
    target = torch.ones(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(mse(q, {TARGET_EMBEDDING: target}, mask)) == pytest.approx(2.0)
    target[0, 2] = 100.0  # a padded step must not count
    assert float(mse(q, {TARGET_EMBEDDING: target}, mask)) == pytest.approx(2.0)
    assert float(mse(q, {TARGET_EMBEDDING: torch.ones(2, 3, 2)}, None)) == pytest.approx(2.0)


def test_infonce_is_the_cross_entropy_of_the_target_among_the_gallery():
    gallery = torch.eye(3)  # mean squared pairwise distance 2
    nce = SupervisedObjective("infonce", gallery, temperature=0.5)
    assert nce.tau == pytest.approx(1.0)
    q = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # (1, 2, 3)
    batch = {TARGET_INDEX: torch.tensor([[0, 1]])}
    # step 0: distances^2 to the photos 0, 2, 2 -> logits 0, -2, -2; step 1: 2, 2, 0 -> -2, -2, 0
    hit = -math.log(1.0 / (1.0 + 2.0 * math.exp(-2.0)))
    miss = -math.log(math.exp(-2.0) / (2.0 * math.exp(-2.0) + 1.0))
    assert float(nce(q, batch, torch.tensor([[1, 0]]))) == pytest.approx(hit, rel=1e-5)
    assert float(nce(q, batch, None)) == pytest.approx((hit + miss) / 2, rel=1e-5)


def test_infonce_gradient_moves_the_query_towards_its_photo():
    torch.manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    nce = SupervisedObjective("infonce", gallery)
    q = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1).requires_grad_(True)
    batch = {TARGET_INDEX: torch.tensor([3])}
    before = float(nce(q, batch, None).detach())
    nce(q, batch, None).backward()
    with torch.no_grad():
        after = float(nce(q - 0.1 * q.grad, batch, None))
    assert after < before


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sup_loss"):
        SupervisedObjective("l1")
    with pytest.raises(ValueError, match="gallery"):
        SupervisedObjective("infonce", None)
    with pytest.raises(ValueError, match="sup_temperature"):
        SupervisedObjective("infonce", torch.eye(3), temperature=0.0)


def test_supervised_targets_gallery_matches_the_episodes_gallery(tiny):
    data, embedding = tiny
    episodes = load_episode_data(data, embedding, "train")
    gallery, _ = load_supervised_targets(data, embedding, "train")
    assert list(gallery.photo_ids) == list(episodes.gallery.photo_ids)
    assert torch.equal(gallery.embeddings, episodes.gallery.embeddings)
    assert np.array_equal(episodes.target_index.numpy(), gallery.index_of(episodes.photo_id).numpy())


def test_supervised_targets_complete_sketches_match_the_episodes(tiny):
    data, embedding = tiny
    episodes = load_episode_data(data, embedding, "val")
    _, complete = load_supervised_targets(data, embedding, "val")
    assert torch.equal(complete, episodes.sketch_embedding[:, -1])


def _episode_with_infos(infos):
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    n = len(infos) - 1
    return SingleAgentEpisode(observations=list(np.zeros((n + 1, 1), np.float32)), infos=infos,
                              actions=list(np.zeros(n, np.float32)), rewards=[0.0] * n, len_lookback_buffer=0)


@pytest.mark.parametrize("target, info_key", [("photo", "target_index"), ("final_sketch", "sketch_index")])
def test_targets_are_looked_up_from_the_infos_rows(target, info_key):
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    infos = [{"target_index": t, "sketch_index": s} for t, s in [(1, 5), (1, 5), (3, 0), (3, 0)]]
    episode = _episode_with_infos(infos)
    batch = AddTargetEmbeddings(table=table, target=target)(rl_module=None, batch={}, episodes=[episode])
    (targets,) = batch[TARGET_EMBEDDING].values()
    (index,) = batch[TARGET_INDEX].values()
    rows = [info[info_key] for info in infos[:3]]  # one target per step, from the infos of steps 0..n-1
    assert np.array_equal(np.concatenate(targets), table[rows])
    assert np.concatenate(index).tolist() == [1, 1, 3]


def test_a_row_outside_the_table_is_a_clear_error():
    episode = _episode_with_infos([{"target_index": 7, "sketch_index": 0}] * 3)
    with pytest.raises(ValueError, match="another split"):
        AddTargetEmbeddings(table=np.zeros((4, 2)), target="photo")(rl_module=None, batch={}, episodes=[episode])
    with pytest.raises(ValueError, match="table"):
        AddTargetEmbeddings(target="photo")
