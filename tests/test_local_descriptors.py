"""Phase 1's local descriptors (issue 23): the head, the local InfoNCE, the training hook and the grid export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.phase1.embedding import EmbeddingConfig, EmbeddingNet, embed_photo_grids, embed_sketch_grids, embed_sketches
from policies.phase1.local_descriptors import (
    captured_feature_maps,
    local_infonce_loss,
    local_loss,
)
from sketch_env.local_grids import LocalGrids, load_local_grids, photo_grids_for, save_local_grids, sketch_grids_for


def test_the_head_gives_unit_descriptors_per_cell_of_the_trunk_map():
    net = EmbeddingNet(EmbeddingConfig(local_dim=12, width=8))
    images = torch.rand(3, 1, 64, 64)
    fmap = net.feature_map(images)
    assert fmap.shape == (3, 32, 8, 8)  # the compact trunk's third block: 4 x width channels, 64 / 8 cells a side
    grids = net.local_head(fmap)
    assert grids.shape == (3, 8, 8, 12) and torch.allclose(grids.norm(dim=-1), torch.ones(3, 8, 8), atol=1e-5)
    assert EmbeddingNet(EmbeddingConfig()).local_head is None
    with pytest.raises(ValueError, match="compact backbone"):
        EmbeddingNet(EmbeddingConfig(backbone="resnet18", local_dim=8))


@pytest.mark.parametrize("shared", [True, False])
def test_the_training_pass_hands_its_feature_maps_to_the_local_term(shared):
    torch.manual_seed(0)
    net = EmbeddingNet(EmbeddingConfig(local_dim=8, width=8, shared_branches=shared))
    sketches, photos = torch.rand(4, 1, 64, 64), torch.rand(3, 1, 64, 64)
    with captured_feature_maps(net) as maps:
        net(sketches, photos)
    assert sum(len(m) for m in maps) == 7 and all(m.shape[1:] == (32, 8, 8) for m in maps)
    loss = local_loss(net, maps, sketches, torch.tensor([0, 1, 2, 0]), 0.1)
    loss.backward()
    assert loss.item() > 0 and net.local_head.net[0].weight.grad is not None
    assert all(not layer._forward_hooks for layer in net.feature_map_layers()), "hooks are removed after the block"
    with captured_feature_maps(EmbeddingNet(EmbeddingConfig(width=8))) as none:
        pass
    assert none == []


def test_local_infonce_is_the_cross_entropy_of_each_inked_cell_over_the_photos():
    torch.manual_seed(1)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    photos = unit(torch.randn(3, 2, 2, 4))
    sketches = unit(torch.randn(2, 2, 2, 4))
    labels = torch.tensor([2, 0])
    ink = torch.tensor([[[True, False], [True, True]], [[False, False], [False, True]]])
    got = local_infonce_loss(sketches, photos, labels, ink, 0.5)
    terms = []
    for b in range(2):
        for c in range(4):
            if not ink[b].reshape(-1)[c]:
                continue
            sims = torch.stack([(sketches[b].reshape(-1, 4)[c] * photos[m].reshape(-1, 4)).sum(-1).max() for m in range(3)])
            terms.append(-torch.log_softmax(sims / 0.5, 0)[labels[b]])  # a 2 x 2 grid: every cell neighbours every cell
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)
    matched = local_infonce_loss(photos[labels], photos, labels, torch.ones(2, 2, 2, dtype=torch.bool), 0.05)
    assert matched < got  # a sketch cell equal to its own photo's cell costs little


def test_grids_round_trip_and_changed_items_are_re_embedded_or_refused(tmp_path):
    from sketch_env.data import DataError, load_dataset
    from sketch_env.data.generate import generate_dataset
    from sketch_env.data.store import photo_digests, sketch_digests
    from sketch_env.strokes import with_noise_strokes

    ds = load_dataset(generate_dataset(tmp_path / "data", n_photos=4, sketches_per_photo=1, seed=0))
    torch.manual_seed(0)
    net = EmbeddingNet(EmbeddingConfig(local_dim=4, width=4)).eval()
    grids = LocalGrids(ds.photos.photo_id, embed_photo_grids(net, ds.photos).numpy(), ds.sketches.sketch_id,
                       embed_sketch_grids(net, ds.sketches).numpy(), photo_digests(ds.photos), sketch_digests(ds.sketches))
    assert grids.shape == (8, 8, 4) and grids.sketch_grids.shape == (4, 17, 8, 8, 4)
    save_local_grids(tmp_path / "run", grids)
    back = load_local_grids(tmp_path / "run")
    assert np.array_equal(back.sketch_grids, grids.sketch_grids) and list(back.photo_id) == list(grids.photo_id)
    order = ds.sketches.subset(np.array([2, 0]))
    assert torch.equal(sketch_grids_for(back, order, tmp_path / "run"), torch.from_numpy(grids.sketch_grids[[2, 0]]))
    noisy = with_noise_strokes(ds, 2, 0).sketches
    with pytest.raises(DataError, match="other strokes"):
        sketch_grids_for(back, noisy, tmp_path / "run")
    redone = sketch_grids_for(back, noisy, tmp_path / "run", lambda s: embed_sketch_grids(net, s))
    assert torch.equal(redone, embed_sketch_grids(net, noisy))
    assert torch.equal(photo_grids_for(back, ds.photos, tmp_path / "run"), torch.from_numpy(grids.photo_grids))
    with pytest.raises(DataError, match="local-dim"):
        load_local_grids(tmp_path / "elsewhere")
    # the level grids are what the network gives each rendered partial sketch, as the embeddings are
    assert embed_sketches(net, ds.sketches).shape == (4, 17, 64)


@pytest.mark.slow
def test_pretrain_with_local_descriptors_exports_grids_that_match_their_photos(tmp_path):
    """A short phase 1 with --local-dim trains the local term and exports grids of the kept network; sketch cells
    then match their own photo better than other photos (local AUIR over chance)."""
    from policies.phase1.embedding import load_embedding_net
    from policies.phase1.training import Phase1Config, run
    from sketch_env.data.generate import generate_dataset
    from sketch_env.local_match import LocalGallery

    data = generate_dataset(tmp_path / "data", n_photos=24, sketches_per_photo=2, seed=0)
    record = run(Phase1Config(data=str(data), run_dir=str(tmp_path / "p1"), epochs=6, local_dim=8, width=8,
                              num_threads=1, val_every=3, batch_size=16))
    assert record["config"]["local_dim"] == 8
    grids = load_local_grids(tmp_path / "p1")
    net, config = load_embedding_net(tmp_path / "p1")
    assert config.local_dim == 8 and grids.shape == (8, 8, 8)
    from sketch_env.data import load_dataset

    ds = load_dataset(data)
    assert np.array_equal(grids.sketch_grids[:3], embed_sketch_grids(net, ds.sketches.subset(np.arange(3))).numpy())
    distance = LocalGallery(torch.from_numpy(grids.photo_grids)).dense_distance(torch.from_numpy(grids.sketch_grids[:, -1]))
    own = torch.tensor([list(grids.photo_id).index(p) for p in ds.sketches.photo_id])
    rank = 1 + (distance < distance[torch.arange(len(own)), own][:, None]).sum(1).float()
    assert rank.mean() < 0.4 * len(grids.photo_id), f"mean rank {rank.mean():.1f} of {len(grids.photo_id)} photos"
