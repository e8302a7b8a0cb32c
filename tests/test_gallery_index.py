"""The approximate index behind Gallery.topk: exact re-rank, exact ranks, files checked against the gallery."""

import json

import numpy as np
import pytest
import torch

from sketch_env.errors import DataError
from sketch_env.gallery import Gallery
from sketch_env.gallery_index import (
    INDEX_FILE,
    INDEX_META,
    IndexConfig,
    build_index,
    default_nlist,
    load_index,
    save_index,
)


def clustered(n: int, d: int = 16, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` centres: neighbourhoods an IVF index can find."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.4 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def gallery_and_queries():
    emb = clustered(4000)
    rng = np.random.default_rng(1)
    queries = emb[rng.integers(0, len(emb), 32)] + 0.05 * rng.normal(size=(32, emb.shape[1])).astype(np.float32)
    return Gallery(emb, [f"p{i}" for i in range(len(emb))]), torch.from_numpy(queries.astype(np.float32))


def test_affine_layout_filled_in_blocks_is_the_same(monkeypatch):
    from sketch_env import gallery as gallery_module

    emb = torch.from_numpy(clustered(1000))
    whole = Gallery(emb, [str(i) for i in range(1000)])
    monkeypatch.setattr(gallery_module, "BLOCK_ELEMENTS", 16 * 7)  # blocks of 7 photos
    blocked = Gallery(emb, [str(i) for i in range(1000)])
    expected = torch.cat([-2.0 * emb.T, (emb * emb).sum(1)[None]])
    torch.testing.assert_close(blocked._affine, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole._affine, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["ivfpq", "ivfflat", "hnsw"])
def test_index_topk_equals_exact_when_it_probes_enough(gallery_and_queries, kind):
    g, q = gallery_and_queries
    exact_i, exact_d, exact_r = g.ranked_topk(q, 10)
    # every cell probed / a wide beam: the candidates hold the true top 10, and the re-rank makes them exact
    config = IndexConfig(kind=kind, nlist=32, nprobe=32, pq_m=8, candidates=200, ef_search=400)
    g.use_index(build_index(g.embeddings.numpy(), config, threads=1))
    try:
        approx_i, approx_d, approx_r = g.ranked_topk(q, 10)
        assert torch.equal(approx_i, exact_i)
        torch.testing.assert_close(approx_d, exact_d, rtol=0, atol=1e-5)
        assert torch.equal(approx_r, exact_r)
        assert torch.equal(g.topk(q, 10, exact=True)[0], exact_i)
    finally:
        g.use_index(None)


def test_ranks_never_use_the_index(gallery_and_queries):
    g, q = gallery_and_queries
    target = torch.arange(len(q)) * 7
    before = g.rank(q, target)
    # a deliberately poor index: one cell probed of 64, 10 candidates
    g.use_index(build_index(g.embeddings.numpy(), IndexConfig(nlist=64, nprobe=1, pq_m=4, candidates=10), threads=1))
    try:
        assert torch.equal(g.rank(q, target), before)
        top, _ = g.topk(q, 10)
        assert top.shape == (len(q), 10)
    finally:
        g.use_index(None)


def test_too_few_candidates_fall_back_to_exact():
    emb = clustered(300, clusters=3)
    g = Gallery(emb, [str(i) for i in range(300)])
    q = torch.from_numpy(emb[:4])
    exact_i, exact_d = g.topk(q, 50)
    # 64 cells, one probed: a cell holds ~5 photos, fewer than k = 50, so every query is answered exactly
    g.use_index(build_index(emb, IndexConfig(kind="ivfflat", nlist=64, nprobe=1, candidates=50), threads=1))
    approx_i, approx_d = g.topk(q, 50)
    torch.testing.assert_close(approx_d, exact_d, rtol=0, atol=1e-6)
    assert [set(a) for a in approx_i.tolist()] == [set(e) for e in exact_i.tolist()] or torch.equal(approx_i, exact_i)


def test_use_index_refuses_another_gallery(gallery_and_queries):
    g, _ = gallery_and_queries
    other = build_index(clustered(500), IndexConfig(kind="ivfflat", nlist=8), threads=1)
    with pytest.raises(ValueError, match="500 x 16"):
        g.use_index(other)


def test_save_and_load_checks_the_gallery(tmp_path, gallery_and_queries):
    g, q = gallery_and_queries
    emb = g.embeddings.numpy()
    index = build_index(emb, IndexConfig(nlist=32, nprobe=8, pq_m=8), threads=1)
    out = save_index(tmp_path / "index", index)
    assert sorted(p.name for p in out.iterdir()) == [INDEX_FILE, INDEX_META]
    loaded = load_index(out, emb)
    assert loaded.describe() == "IVF32,PQ8 nprobe=8" and loaded.n == len(emb)
    np.testing.assert_array_equal(loaded.search(q.numpy(), 20), index.search(q.numpy(), 20))
    changed = emb.copy()
    changed[5, 0] += 0.01
    with pytest.raises(DataError, match="built for other embeddings"):
        load_index(out, changed)
    with pytest.raises(DataError, match="built for 4000 x 16"):
        load_index(out, emb[:100])
    (out / INDEX_FILE).write_bytes(b"not an index")
    with pytest.raises(DataError, match="not a readable faiss index"):
        load_index(out, emb)
    meta = json.loads((out / INDEX_META).read_text())
    (out / INDEX_META).write_text(json.dumps({**meta, "config": {"kind": "lsh"}}))
    with pytest.raises(DataError, match="not an index description"):
        load_index(out, emb)


def test_config_checks_and_sizes():
    with pytest.raises(ValueError, match="kind must be"):
        IndexConfig(kind="lsh")
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        IndexConfig(nprobe=0)
    assert default_nlist(1_000_000) == 4096 and default_nlist(10_000_000) == 4096 and default_nlist(10) == 16
    with pytest.raises(ValueError, match="must divide"):
        build_index(clustered(100), IndexConfig(pq_m=5, nlist=4))
