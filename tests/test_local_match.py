"""Local matching (issue 23): the local term against a direct computation, the environment's local and dense
ranks against the score's definition, and a locator forced onto the one discriminative cell of a synthetic set."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sketch_env.env import EnvConfig, SketchRetrievalEnv, observation_space
from sketch_env.gallery import Gallery
from sketch_env.local_match import LocalGallery, cell_centres, cell_ink, cell_of, grid_similarity, local_cost, neighbour_cells
from sketch_env.metrics import auir
from sketch_env.render import N_LEVELS
from sketch_env.vector_env import SketchRetrievalVectorEnv
from sketch_env.synthetic import LOCAL_SHAPE, with_local_grids

H, W, D_LOCAL = LOCAL_SHAPE


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def direct_similarity(sketch_cell: np.ndarray, photo: np.ndarray, cell: int) -> float:
    """max over the 3 x 3 neighbourhood of `cell` (h, w grid of `photo`) of <sketch_cell, photo[c']>, by loops."""
    h, w, _ = photo.shape
    y, x = divmod(cell, w)
    return max(float(sketch_cell @ photo[yy, xx]) for yy in range(y - 1, y + 2) for xx in range(x - 1, x + 2)
               if 0 <= yy < h and 0 <= xx < w)


def test_cells_and_neighbourhoods():
    nb = neighbour_cells(3, 4)
    assert nb.shape == (12, 9)
    assert sorted(nb[0][nb[0] >= 0].tolist()) == [0, 1, 4, 5]  # a corner has 4 cells around it, itself included
    assert sorted(nb[5][nb[5] >= 0].tolist()) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    loc = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [-0.49, 0.51]])
    assert cell_of(loc, 4, 4).tolist() == [0, 15, 10, 3 * 4 + 1]
    image = torch.zeros(1, 8, 8)
    image[0, :4, 4:] = 1.0  # the top-right quarter inked
    image[0, 7, 0] = 1.0
    ink = cell_ink(torch.nn.functional.pad(image.cumsum(1).cumsum(2), (1, 0, 1, 0)), 2, 2)
    assert ink.tolist() == [[0.0, 1.0, 1 / 16, 0.0]]


def test_local_distances_equal_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    photos = unit(torch.randn(5, H, W, D_LOCAL, generator=gen))
    sketches = unit(torch.randn(7, H, W, D_LOCAL, generator=gen))
    gallery = LocalGallery(photos)
    cells = torch.randint(0, H * W, (7,), generator=gen)
    descriptors = sketches.reshape(7, H * W, D_LOCAL)[torch.arange(7), cells]
    got = gallery.distance_at(descriptors, cells)
    want = torch.tensor([[2 - 2 * direct_similarity(descriptors[r].numpy(), photos[j].numpy(), int(cells[r]))
                          for j in range(5)] for r in range(7)])
    assert torch.allclose(got, want, atol=1e-5)
    dense = gallery.dense_distance(sketches)
    want_dense = torch.tensor([[np.mean([2 - 2 * direct_similarity(sketches[r].reshape(-1, D_LOCAL)[c].numpy(),
                                                                     photos[j].numpy(), c) for c in range(H * W)])
                                for j in range(5)] for r in range(7)], dtype=torch.float32)
    assert torch.allclose(dense, want_dense, atol=1e-5)
    every_cell = grid_similarity(sketches, photos)  # (7, 5, H * W), what phase 1 trains
    assert torch.allclose(2 - 2 * every_cell.mean(-1), dense, atol=1e-5)
    with pytest.raises(ValueError, match="descriptors must be"):
        gallery.distance_at(descriptors[:, :3], cells)
    assert local_cost("local", 3, (8, 8), 32, 64) == 64 + 3 * 9 * 32
    assert local_cost("dense", 3, (8, 8), 32, 64) == 64 + 64 * 9 * 32 and local_cost("global", 3, (8, 8), 32, 64) == 64


def test_blocks_of_a_large_gallery_give_the_same_distances(monkeypatch):
    import sketch_env.local_match as lm

    gen = torch.Generator().manual_seed(1)
    photos = unit(torch.randn(9, H, W, D_LOCAL, generator=gen))
    grids = unit(torch.randn(3, H, W, D_LOCAL, generator=gen))
    whole = LocalGallery(photos).dense_distance(grids)
    monkeypatch.setattr(lm, "BLOCK_ELEMENTS", 1)  # one query row per block
    assert torch.allclose(LocalGallery(photos).dense_distance(grids), whole)


def test_gallery_rank_adds_the_extra_term():
    gen = torch.Generator().manual_seed(2)
    gallery = Gallery(unit(torch.randn(6, 4, generator=gen)), [f"p{i}" for i in range(6)])
    queries = unit(torch.randn(3, 4, generator=gen))
    target = torch.tensor([0, 3, 5])
    assert torch.equal(gallery.rank(queries, target, torch.zeros(3, 6)), gallery.rank(queries, target))
    behind = torch.zeros(3, 6)
    behind[torch.arange(3), target] = 100.0  # every target pushed behind all other photos
    assert gallery.rank(queries, target, behind).tolist() == [6, 6, 6]
    extra = torch.full((3, 6), 100.0)
    extra[:, 0] = 0.0  # photo 0 first for every query
    assert gallery.rank(queries, target, extra)[0] == 1
    top, distance, ranks = gallery.ranked_topk(queries, 2, extra)
    assert top[:, 0].tolist() == [0, 0, 0] and bool((distance[:, 1] > 100.0).all()) and ranks[:, 0].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="extra must have shape"):
        gallery.rank(queries, target, torch.zeros(2, 6))


@pytest.mark.parametrize("match", ["local", "dense", "dense-ink"])
def test_env_ranks_by_the_local_score_on_a_small_gallery(episodes, match):
    """Every step's rank is 1 + the photos whose score ||q - e||^2 + w x (mean local distance over this level's
    glimpse cells so far, over every cell, or over every inked cell) is strictly below the target's, computed directly."""
    data = with_local_grids(episodes)
    G, weight = 3, 0.7
    env = SketchRetrievalVectorEnv(EnvConfig(n_glimpses=G, match=match, local_weight=weight), 2, data)
    obs, info = env.reset(seed=3)
    photos = data.photo_grids.float().numpy()
    embeddings = data.gallery.embeddings.double().numpy()
    rng = np.random.default_rng(0)
    evidence = [[] for _ in range(2)]
    for t in range(N_LEVELS * G):
        level = t // G
        for b in range(2):
            if t % G == 0:
                evidence[b] = []
            evidence[b].append(int(cell_of(torch.as_tensor(obs["location"][b : b + 1]), H, W)))
        action = {"location": rng.uniform(-1, 1, (2, 2)).astype(np.float32),
                  "query": np.clip(obs["sketch_embedding"] + rng.normal(0, 0.2, obs["sketch_embedding"].shape), -1, 1).astype(np.float32)}
        sketches, targets = info["sketch_index"].copy(), info["target_index"].copy()
        obs, _, _, _, info = env.step(action)
        for b in range(2):
            grid = data.sketch_grids[sketches[b], level].float().numpy()
            image = data.images[sketches[b], level].numpy().reshape(H, 64 // H, W, 64 // W)
            inked = [c for c in range(H * W) if image[c // W, :, c % W].any()]
            cells = {"local": evidence[b], "dense": range(H * W), "dense-ink": inked or range(H * W)}[match]
            local = np.array([np.mean([2 - 2 * direct_similarity(grid.reshape(-1, D_LOCAL)[c], photos[j], c) for c in cells])
                              for j in range(len(photos))])
            score = ((embeddings - action["query"][b].astype(np.float64)) ** 2).sum(1) + weight * local
            assert info["rank"][b] == 1 + int((score < score[targets[b]] - 1e-6).sum()), f"step {t} env {b}"


def test_local_observation_holds_the_descriptor_at_the_glimpse_and_the_ink_of_every_cell(episodes):
    data = with_local_grids(episodes)
    env = SketchRetrievalEnv(EnvConfig(n_glimpses=2, match="local"), data)
    space = observation_space(EnvConfig(n_glimpses=2, match="local"), data.dim, data.local_shape)
    assert space["descriptor"].shape == (D_LOCAL,) and space["cell_ink"].shape == (H * W,)
    obs, info = env.reset(seed=0)
    obs, *_ = env.step({"location": np.array([0.6, -0.8], np.float32), "query": obs["sketch_embedding"]})
    assert space.contains(obs)
    cell = int(cell_of(torch.tensor([[0.6, -0.8]]), H, W))
    grid = data.sketch_grids[info["sketch_index"], 0].float().reshape(-1, D_LOCAL)
    assert np.allclose(obs["descriptor"], grid[cell].numpy())
    image = data.images[info["sketch_index"], 0].float()
    assert np.allclose(obs["cell_ink"], image.reshape(H, 64 // H, W, 64 // W).mean((1, 3)).reshape(-1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="local grids"):
        SketchRetrievalEnv(EnvConfig(match="local"), episodes)
    with pytest.raises(ValueError, match="match must be one of"):
        EnvConfig(match="sparse")


def test_a_locator_on_the_one_discriminative_cell_beats_one_elsewhere(episodes):
    """Photos differ only at one cell of their grids, where each sketch shows its own photo's descriptor, and
    the global query is uninformative: glimpses forced onto that cell find every target, glimpses elsewhere
    leave the ranking to the global distance."""
    n, s = len(episodes.gallery), len(episodes)
    assert n + 1 <= 16
    d = 16
    u = torch.eye(d)[0]
    photo_grids = u.repeat(n, H, W, 1)
    key_cell = (0, 3)  # top right, away from the centre cell every episode starts at
    photo_grids[:, key_cell[0], key_cell[1]] = torch.eye(d)[1 : n + 1]
    sketch_grids = u.repeat(s, N_LEVELS, H, W, 1)
    sketch_grids[:, :, key_cell[0], key_cell[1]] = photo_grids[episodes.target_index, key_cell[0], key_cell[1]][:, None]
    query = unit(torch.ones(s, N_LEVELS, episodes.dim))
    data = dataclasses.replace(with_local_grids(episodes, 0, photo_grids, sketch_grids), sketch_embedding=query)
    G = 2
    env = SketchRetrievalVectorEnv(EnvConfig(n_glimpses=G, match="local", local_weight=10.0), s, data)

    def auir_at(location) -> float:
        obs, _ = env.reset(options={"sketch_index": np.arange(s)})
        ranks = np.zeros((s, N_LEVELS), np.int64)
        for t in range(N_LEVELS * G):
            action = {"location": np.tile(np.asarray(location, np.float32), (s, 1)), "query": obs["sketch_embedding"]}
            obs, _, _, _, info = env.step(action)
            if t % G == G - 1:
                ranks[:, t // G] = info["rank"]
        return auir(ranks)

    on_key = auir_at([0.75, -0.75])  # the centre of cell (0, 3) of a 4 x 4 grid
    elsewhere = [auir_at(loc) for loc in ([-0.75, 0.75], [-0.75, -0.75], [0.25, 0.25])]
    assert on_key > 95.0, on_key
    assert all(on_key > other + 30.0 for other in elsewhere), (on_key, elsewhere)


def test_episode_data_checks_its_grids(episodes):
    grids = with_local_grids(episodes)
    with pytest.raises(ValueError, match="pairs"):
        dataclasses.replace(episodes, photo_grids=grids.photo_grids)
    with pytest.raises(ValueError, match="sketch_grids must have shape"):
        dataclasses.replace(grids, sketch_grids=grids.sketch_grids[:, :, :2])
    assert grids.local_shape == (H, W, D_LOCAL) and episodes.local_shape is None


def test_cell_centres_are_the_inverse_of_cell_of():
    centres = cell_centres(4, 8)  # 4 rows, 8 columns
    assert centres.shape == (32, 2)
    assert torch.equal(cell_of(centres, 4, 8), torch.arange(32))
    assert torch.allclose(centres[0], torch.tensor([-7 / 8, -3 / 4])) and torch.allclose(centres[-1], torch.tensor([7 / 8, 3 / 4]))
