import numpy as np
import pytest
import torch

from sketch_env.gallery import Gallery
from sketch_env.metrics import acc_at, auir, m_at_a, percentile, percentile_curve, retrieval_metrics

# Two sketches, three levels, a gallery of four photos.
RANKS = np.array([[1, 2, 4], [2, 2, 1]])


def test_acc_at_hand_computed():
    complete = np.array([1, 5, 6, 10, 11])
    assert acc_at(complete, 1) == pytest.approx(20.0)
    assert acc_at(complete, 5) == pytest.approx(40.0)
    assert acc_at(complete, 10) == pytest.approx(80.0)
    assert acc_at(torch.tensor([3, 3]), 3) == pytest.approx(100.0)


def test_auir_hand_computed():
    # (1 + 1/2 + 1/4) / 3 and (1/2 + 1/2 + 1) / 3, averaged: 0.625.
    assert auir(RANKS) == pytest.approx(62.5)


def test_auir_is_mean_of_per_sketch_means():
    ranks = np.random.default_rng(0).integers(1, 30, size=(7, 17))
    per_sketch = [np.mean(1.0 / row) for row in ranks]
    assert auir(ranks) == pytest.approx(100 * np.mean(per_sketch))


def test_m_at_a_and_curve_hand_computed():
    # Percentiles (4 - r) / 3: [1, 2/3, 0] and [2/3, 2/3, 1].
    assert m_at_a(RANKS, 4) == pytest.approx(100 * 4 / 6)
    np.testing.assert_allclose(percentile_curve(RANKS, 4), [100 * 5 / 6, 100 * 2 / 3, 50.0])


def test_percentile_numpy_and_torch():
    np.testing.assert_allclose(percentile(np.array([1, 3, 5]), 5), [1.0, 0.5, 0.0])
    t = percentile(torch.tensor([1, 3, 5]), 5)
    assert t.dtype == torch.float32 and t.tolist() == [1.0, 0.5, 0.0]
    assert percentile(np.array([1, 1]), 1).tolist() == [1.0, 1.0]
    assert percentile(torch.tensor([1]), 1).tolist() == [1.0]


def test_retrieval_metrics_keys_and_values():
    ranks = np.ones((2, 17), np.int64)
    ranks[0] = np.arange(17, 0, -1)  # from rank 17 at the first level to 1 when complete
    ranks[1, -1] = 7
    m = retrieval_metrics(ranks, 20)
    assert list(m) == ["auir", "m_at_a", "acc@1", "acc@5", "acc@10", "percentile_curve", "n_sketches", "n_photos"]
    assert m["acc@1"] == pytest.approx(50.0)
    assert m["acc@5"] == pytest.approx(50.0)
    assert m["acc@10"] == pytest.approx(100.0)
    assert m["auir"] == pytest.approx(100 * np.mean(1.0 / ranks))
    assert m["m_at_a"] == pytest.approx(100 * np.mean((20 - ranks) / 19))
    assert len(m["percentile_curve"]) == 17 and all(isinstance(v, float) for v in m["percentile_curve"])
    assert m["percentile_curve"][0] == pytest.approx(100 * ((20 - 17) / 19 + 1) / 2)
    assert (m["n_sketches"], m["n_photos"]) == (2, 20)


def test_gallery_of_one_scores_perfectly():
    m = retrieval_metrics(np.ones((3, 17), np.int64), 1)
    assert m["auir"] == m["m_at_a"] == m["acc@1"] == 100.0
    assert m["percentile_curve"] == [100.0] * 17


def test_ties_from_the_gallery_feed_the_metrics():
    # Every photo is the same point: all ties, so every target ranks 1.
    g = Gallery(np.ones((5, 3), np.float32), list("abcde"))
    queries = torch.randn(4 * 17, 3)
    ranks = g.rank(queries, torch.arange(4 * 17) % 5).reshape(4, 17)
    m = retrieval_metrics(ranks, len(g))
    assert m["auir"] == m["m_at_a"] == m["acc@1"] == 100.0


def test_torch_and_float_ranks_accepted():
    assert auir(torch.tensor(RANKS)) == pytest.approx(62.5)
    assert auir(RANKS.astype(np.float32)) == pytest.approx(62.5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: auir(np.zeros((0, 17))), "no ranks"),
        (lambda: acc_at(np.array([], np.int64), 1), "no ranks"),
        (lambda: auir(np.array([[1, 0]])), "start at 1, got 0"),
        (lambda: m_at_a(np.array([[1, 5]]), 4), "rank 5 is beyond the gallery of 4"),
        (lambda: percentile_curve(np.array([[1, 5]]), 4), "beyond the gallery"),
        (lambda: auir(np.array([[1.5, 2.0]])), "whole numbers"),
        (lambda: auir(np.array([[np.nan, 2.0]])), "whole numbers"),
        (lambda: auir(np.array([1, 2])), r"shape \(S, L\)"),
        (lambda: acc_at(np.array([[1, 2]]), 1), r"shape \(S,\)"),
        (lambda: acc_at(np.array([1, 2]), 0), "q >= 1"),
        (lambda: m_at_a(np.array([[1]]), 0), "n_photos must be an integer >= 1"),
        (lambda: retrieval_metrics(np.ones((2, 3), np.int64), 5), r"shape \(S, 17\)"),
        (lambda: retrieval_metrics(np.ones((2, 17), np.int64) * 6, 5), "beyond the gallery of 5"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
