"""The phase-1 embedding network (policies.phase1.embedding): shapes, branches, saving and loading, inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.phase1.embedding import (
    EmbeddingConfig,
    EmbeddingNet,
    embed_sketch_levels,
    load_embedding_net,
    photo_inputs,
    save_embedding_net,
)


def _unit_norms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(dim=1)


@pytest.mark.parametrize(
    "backbone,size,photo_input,shared",
    [
        ("compact", 64, "edges", True),
        ("compact", 32, "rgb", True),
        ("compact", 32, "edges", False),
        ("resnet18", 32, "rgb", False),
        ("mobilenet_v3_small", 32, "edges", True),
        ("resnet50", 32, "edges", True),
        ("inception_v3", 32, "rgb", True),  # resized to 75 x 75 inside
    ],
)
def test_embeddings_have_shape_and_unit_norm(backbone, size, photo_input, shared):
    torch.manual_seed(0)
    cfg = EmbeddingConfig(backbone=backbone, embedding_dim=16, image_size=size, photo_input=photo_input, shared_branches=shared)
    net = EmbeddingNet(cfg).eval()
    channels = 1 if photo_input == "edges" else 3
    sketches, photos = torch.rand(2, 1, size, size), torch.rand(2, channels, size, size)
    with torch.no_grad():
        s, p = net.embed_sketches(sketches), net.embed_photos(photos)
        s2, p2 = net(sketches, photos)
    assert s.shape == (2, 16) and p.shape == (2, 16)
    torch.testing.assert_close(_unit_norms(s), torch.ones(2))
    torch.testing.assert_close(_unit_norms(p), torch.ones(2))
    torch.testing.assert_close(s2, s, atol=1e-5, rtol=1e-4)  # eval mode: one pass equals two
    torch.testing.assert_close(p2, p, atol=1e-5, rtol=1e-4)


def test_shared_branches_share_weights_separate_ones_do_not():
    x = torch.rand(3, 1, 32, 32)
    shared = EmbeddingNet(EmbeddingConfig(image_size=32)).eval()
    separate = EmbeddingNet(EmbeddingConfig(image_size=32, shared_branches=False)).eval()
    with torch.no_grad():
        torch.testing.assert_close(shared.embed_sketches(x), shared.embed_photos(x))
        assert not torch.allclose(separate.embed_sketches(x), separate.embed_photos(x))
    assert sum(p.numel() for p in separate.parameters()) == 2 * sum(p.numel() for p in shared.parameters())


def test_save_and_load_round_trip(tmp_path):
    cfg = EmbeddingConfig(embedding_dim=8, image_size=32, shared_branches=False)
    net = EmbeddingNet(cfg)
    net.train()
    net(torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32))  # move the batch-norm statistics
    save_embedding_net(tmp_path, net, cfg)
    loaded, loaded_cfg = load_embedding_net(tmp_path)
    assert loaded_cfg == cfg and not loaded.training
    x = torch.rand(2, 1, 32, 32)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_photos(x), net.embed_photos(x))
        torch.testing.assert_close(loaded.embed_sketches(x), net.embed_sketches(x))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "cannot read the embedding network"),
    ("list", "not an embedding network saved by `darp pretrain`"),
    ("other_config", "the saved network does not load"),
])
def test_a_damaged_network_file_is_a_one_line_error_naming_it(tmp_path, capsys, damage, message):
    """Issue 25, item 7: a truncated embedding_net.pt ended `darp evaluate` in a torch traceback."""
    from sketch_env.atomic import atomic_write_json
    from sketch_env.data import DataError
    from sketch_env.data.generate import generate_dataset
    from tune_runs.cli import main

    cfg = EmbeddingConfig(embedding_dim=8, image_size=32)
    path = save_embedding_net(tmp_path / "run", EmbeddingNet(cfg), cfg)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:2000])
    elif damage == "list":
        torch.save([1, 2], path)
    else:
        payload = torch.load(path, weights_only=True)
        torch.save({**payload, "config": {**payload["config"], "embedding_dim": 16}}, path)
    with pytest.raises(DataError) as error:
        load_embedding_net(tmp_path / "run")
    assert str(error.value).startswith(str(path)) and message in str(error.value) and "\n" not in str(error.value)
    atomic_write_json(tmp_path / "run" / "run.json", {"kind": "triplet"})
    data = generate_dataset(tmp_path / "data", n_photos=4, sketches_per_photo=1)
    assert main(["evaluate", "--data", str(data), "--run", str(tmp_path / "run"), "--split", "train",
                 "--out", str(tmp_path / "eval")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_photo_inputs_edges_and_rgb_shapes():
    photos = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    edges = photo_inputs(photos, EmbeddingConfig(image_size=32), chunk=2)
    rgb = photo_inputs(photos, EmbeddingConfig(image_size=32, photo_input="rgb"), chunk=2)
    assert edges.shape == (3, 1, 32, 32) and rgb.shape == (3, 3, 32, 32)
    assert 0 <= float(rgb.min()) and float(rgb.max()) <= 1


def test_embed_sketch_levels_matches_one_image_at_a_time():
    net = EmbeddingNet(EmbeddingConfig(embedding_dim=8, image_size=16)).eval()
    first = np.random.default_rng(0).integers(0, 20, (3, 16, 16)).astype(np.uint8)
    out = embed_sketch_levels(net, first, batch=5)
    assert out.shape == (3, 17, 8)
    with torch.no_grad():
        one = net.embed_sketches(torch.from_numpy(first[2] <= 7).float()[None, None])
    torch.testing.assert_close(out[2, 7], one[0], atol=1e-5, rtol=1e-4)
    complete = embed_sketch_levels(net, first, batch=2, levels=(16,))
    assert complete.shape == (3, 1, 8)
    torch.testing.assert_close(complete[:, 0], out[:, 16], atol=1e-5, rtol=1e-4)


