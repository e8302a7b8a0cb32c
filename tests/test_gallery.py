import numpy as np
import pytest
import torch

from sketch_env import gallery as gallery_module
from sketch_env.gallery import Gallery


def brute_force_ranks(emb: np.ndarray, queries: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1 + number of photos strictly closer than the target, in float64 / int64 on the CPU."""
    d = ((queries[:, None, :].astype(np.float64) - emb[None].astype(np.float64)) ** 2).sum(-1)
    return 1 + (d < d[np.arange(len(target)), target][:, None]).sum(1)


def test_hand_computed_ranks_with_ties():
    # Row 3 duplicates row 1; query (1, 0) is at squared distance 1, 0, 1, 0 from the rows.
    emb = np.array([[0, 0], [1, 0], [2, 0], [1, 0]], np.float32)
    g = Gallery(emb, ["a", "b", "c", "d"])
    ranks = g.rank(np.array([[1, 0]] * 4, np.float32), np.array([0, 1, 2, 3]))
    assert ranks.dtype == torch.long
    # Ties count in the query's favour: b and d (distance 0) both rank 1, a and c (distance 1) both 3.
    assert ranks.tolist() == [3, 1, 3, 1]
    assert g.percentile(ranks).tolist() == pytest.approx([1 / 3, 1.0, 1 / 3, 1.0])


def test_gallery_of_one():
    g = Gallery(torch.tensor([[0.6, 0.8]]), ["only"])
    ranks = g.rank(torch.tensor([[1.0, 0.0], [-5.0, 3.0]]), torch.tensor([0, 0]))
    assert ranks.tolist() == [1, 1]
    assert g.percentile(ranks).tolist() == [1.0, 1.0]
    idx, dist = g.topk(torch.tensor([[1.0, 0.0]]), 1)
    assert idx.tolist() == [[0]]
    assert dist[0].tolist() == pytest.approx([0.4**2 + 0.8**2])


def test_percentile_extremes():
    g = Gallery(np.eye(5, dtype=np.float32), list("abcde"))
    assert g.percentile(torch.tensor([1, 5, 3])).tolist() == pytest.approx([1.0, 0.0, 0.5])


@pytest.mark.parametrize("block_elements", [gallery_module.BLOCK_ELEMENTS, 3 * 60])
def test_rank_matches_brute_force_with_duplicates(monkeypatch, block_elements):
    # Small integers keep every float32 product and sum exact, so ties are exact ties.
    monkeypatch.setattr(gallery_module, "BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(0)
    emb = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    emb = np.concatenate([emb, emb[:20]])  # 60 rows, 20 exact duplicates
    queries = rng.integers(-2, 3, size=(37, 6)).astype(np.float32)
    target = rng.integers(0, 60, size=37)
    g = Gallery(emb, [f"p{i}" for i in range(60)])
    ranks = g.rank(queries, target).numpy()
    np.testing.assert_array_equal(ranks, brute_force_ranks(emb, queries, target))
    # A photo and its duplicate always rank the same.
    originals = rng.integers(0, 20, size=37)
    np.testing.assert_array_equal(g.rank(queries, originals).numpy(), g.rank(queries, originals + 40).numpy())


def test_rank_matches_brute_force_on_normalised_embeddings():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(500, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    target = rng.integers(0, 500, size=64)
    queries = emb[target] + 0.7 * rng.normal(size=(64, 64)).astype(np.float32)
    g = Gallery(torch.from_numpy(emb), [str(i) for i in range(500)])
    np.testing.assert_array_equal(g.rank(queries, target).numpy(), brute_force_ranks(emb, queries, target))
    # Float duplicates far apart in the gallery (503 rows: the last ones are a kernel's edge tile) tie exactly.
    with_dups = Gallery(np.concatenate([emb, emb[:3]]), [str(i) for i in range(503)])
    originals = np.arange(64) % 3
    np.testing.assert_array_equal(
        with_dups.rank(queries, originals).numpy(), with_dups.rank(queries, originals + 500).numpy()
    )
    # One query at a time gives the same ranks as the batch.
    one_by_one = [int(g.rank(queries[i : i + 1], target[i : i + 1])[0]) for i in range(64)]
    assert one_by_one == g.rank(queries, target).tolist()


def test_topk_matches_sorted_distances_and_rank():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(200, 16)).astype(np.float32)
    queries = rng.normal(size=(9, 16)).astype(np.float32)
    g = Gallery(emb, [str(i) for i in range(200)])
    idx, dist = g.topk(queries, 10)
    assert idx.shape == (9, 10) and dist.shape == (9, 10) and dist.dtype == torch.float32
    ref = ((queries[:, None] - emb[None]) ** 2).sum(-1)
    np.testing.assert_allclose(dist.numpy(), np.sort(ref, 1)[:, :10], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(idx.numpy(), np.argsort(ref, 1)[:, :10])
    # The photo at top-k position j has rank j + 1 as a target.
    for j in range(10):
        assert g.rank(queries, idx[:, j]).tolist() == [j + 1] * 9


def test_ranked_topk_gives_the_ranks_of_the_top_photos_with_ties():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    emb[10:14] = emb[5]  # duplicates: equal distances, ties in the query's favour
    queries = np.concatenate([emb[5:6] + 0.01, rng.normal(size=(6, 8)).astype(np.float32)])
    g = Gallery(emb, [str(i) for i in range(60)])
    idx, dist, ranks = g.ranked_topk(queries, 12)
    top_idx, top_dist = g.topk(queries, 12)
    assert torch.equal(idx, top_idx) and torch.equal(dist, top_dist)
    for j in range(12):
        assert ranks[:, j].tolist() == g.rank(queries, idx[:, j]).tolist()
    assert ranks[0, :5].tolist() == [1] * 5, "the target's five copies all rank 1"


def test_index_of_and_attributes():
    g = Gallery(np.zeros((3, 4), np.float64), ["x", "y", "z"])
    assert len(g) == 3 and g.dim == 4
    assert g.embeddings.dtype == torch.float32 and g.embeddings.shape == (3, 4)
    assert list(g.photo_ids) == ["x", "y", "z"]
    assert g.index_of(["z", "x"]).tolist() == [2, 0]
    assert g.index_of(["z"]).dtype == torch.long
    with pytest.raises(ValueError, match="'w' is not in the gallery of 3 photos"):
        g.index_of(["x", "w"])


def test_empty_batch():
    g = Gallery(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    assert g.rank(np.zeros((0, 3), np.float32), np.zeros(0, np.int64)).shape == (0,)
    idx, dist = g.topk(np.zeros((0, 3), np.float32), 2)
    assert idx.shape == (0, 2) and dist.shape == (0, 2)


@pytest.mark.parametrize(
    "emb, ids, message",
    [
        (np.zeros((0, 4), np.float32), [], r"shape \(N, D\)"),
        (np.zeros(4, np.float32), ["a"] * 4, r"shape \(N, D\)"),
        (np.zeros((2, 4), np.float32), ["a"], "1 photo ids for 2"),
        (np.zeros((2, 4), np.float32), ["a", "a"], "distinct.*'a'"),
        (np.array([[0.0, np.nan]], np.float32), ["a"], "NaN"),
    ],
)
def test_bad_gallery(emb, ids, message):
    with pytest.raises(ValueError, match=message):
        Gallery(emb, ids)


def test_bad_queries_and_targets():
    g = Gallery(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    q = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"shape \(B, 3\), got \(2, 4\)"):
        g.rank(np.zeros((2, 4), np.float32), [0, 1])
    with pytest.raises(ValueError, match=r"shape \(B, 3\), got \(3,\)"):
        g.rank(np.zeros(3, np.float32), [0])
    with pytest.raises(ValueError, match=r"in \[0, 3\), got values in \[0, 3\]"):
        g.rank(q, [0, 3])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        g.rank(q, [-1, 0])
    with pytest.raises(ValueError, match=r"\(2,\) integers"):
        g.rank(q, [0])
    with pytest.raises(ValueError, match=r"\(2,\) integers"):
        g.rank(q, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\(2,\) integers"):
        g.rank(q, [True, False])
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        g.topk(q, 4)
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        g.topk(q, 0)


def test_queries_with_grad_and_float64():
    g = Gallery(torch.eye(3), ["a", "b", "c"])
    q = torch.tensor([[0.9, 0.1, 0.0]], dtype=torch.float64, requires_grad=True)
    assert g.rank(q, torch.tensor([0])).tolist() == [1]
    assert g.rank(q, torch.tensor([2])).tolist() == [3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(3)
    emb = rng.integers(-2, 3, size=(300, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(50, 8)).astype(np.float32)
    target = rng.integers(0, 300, size=50)
    ids = [str(i) for i in range(300)]
    cpu = Gallery(emb, ids)
    gpu = Gallery(torch.from_numpy(emb).cuda(), ids)
    ranks = gpu.rank(queries, target)
    assert ranks.device.type == "cuda"
    np.testing.assert_array_equal(ranks.cpu().numpy(), cpu.rank(queries, target).numpy())
    assert gpu.percentile(ranks).device.type == "cuda"
    assert gpu.index_of(["3"]).device.type == "cuda"
