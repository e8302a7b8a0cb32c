"""The calibrated confidence (sketch_env.confidence): features, calibrators, ECE, the early-stop table, storage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sketch_env import confidence as C
from sketch_env.data import DataError
from sketch_env.gallery import Gallery


def synthetic_queries(n: int, seed: int, k: int = 10, temperature: float = 0.3):
    """(distances (n, k) nearest first, top-1 outcomes (n,), their true probabilities (n,)): the top-1 is
    right with exactly the softmax share of the nearest photo at `temperature`, so a calibrator that
    learns that map is calibrated by construction."""
    rng = np.random.default_rng(seed)
    d = np.sort(rng.gamma(2.0, 0.4, size=(n, k)).cumsum(1) * rng.uniform(0.3, 1.5, size=(n, 1)), axis=1)
    p = C.top_share(d, temperature, 1)
    return d, rng.random(n) < p, p


def test_top_distances_are_the_gallery_nearest_squared_distances_sorted():
    rng = np.random.default_rng(0)
    photos = rng.normal(size=(13, 4)).astype(np.float32)
    gallery = Gallery(photos, [f"p{i}" for i in range(13)])
    queries = rng.normal(size=(3, 5, 4)).astype(np.float32)
    d = C.top_distances(gallery, queries)
    assert d.shape == (3, 5, 10)
    brute = np.sort(((queries[:, :, None, :] - photos[None, None]) ** 2).sum(-1), axis=-1)[..., :10]
    np.testing.assert_allclose(d, brute, rtol=1e-4, atol=1e-4)
    small = Gallery(photos[:4], ["a", "b", "c", "d"])
    assert C.top_distances(small, torch.as_tensor(queries[0])).shape == (5, 4)  # k = min(10, N)


def test_ranking_features_hand_computed_and_checked():
    d = np.array([[1.0, 4.0, 9.0, 16.0, 25.0, 36.0]])  # Euclidean 1, 2, 3, 4, 5, 6
    x = C.ranking_features(d, temperature=1.0)
    assert x.shape == (1, len(C.FEATURES))
    np.testing.assert_allclose(x[0, :4], [1.0, 1.0, 4.0, 5.0])
    share = 1.0 / np.exp(-(d[0] - 1.0)).sum()
    assert x[0, 4] == pytest.approx(math.log(share / (1 - share)))
    one = C.ranking_features(np.array([[0.5]]), 1.0)  # a gallery of one photo: no gaps, share 1
    np.testing.assert_allclose(one[0, 1:4], 0.0)
    with pytest.raises(ValueError, match="sorted"):
        C.ranking_features(np.array([[2.0, 1.0]]), 1.0)
    with pytest.raises(ValueError, match=r"\(B, k\)"):
        C.ranking_features(np.ones(3), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        C.ranking_features(np.array([[1.0, np.nan]]), 1.0)


def test_softmax_shares_sum_to_one_and_sharpen_as_the_temperature_falls():
    d, _, _ = synthetic_queries(50, 0)
    shares = C.softmax_shares(d, 0.5)
    np.testing.assert_allclose(shares.sum(1), 1.0)
    assert np.all(np.diff(shares, axis=1) <= 1e-12)  # nearer photos get more
    assert np.all(C.top_share(d, 0.1, 1) >= C.top_share(d, 1.0, 1) - 1e-12)
    assert np.all(C.top_share(d, 0.5, 5) >= C.top_share(d, 0.5, 1))


def test_temperature_fit_recovers_the_temperature_that_made_the_outcomes():
    d, y, _ = synthetic_queries(20000, 1, temperature=0.3)
    assert C.fit_temperature(d, y) == pytest.approx(0.3, rel=0.1)


def test_logistic_fit_recovers_known_weights():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40000, 2))
    y = rng.random(40000) < 1 / (1 + np.exp(-(1.5 * x[:, 0] - 2.0 * x[:, 1] + 0.5)))
    mean, std, w = C.fit_logistic(x, y, l2=0.0)
    slope = w[:2] / std
    bias = w[2] - (w[:2] * mean / std).sum()
    np.testing.assert_allclose(slope, [1.5, -2.0], atol=0.08)
    assert bias == pytest.approx(0.5, abs=0.06)


def test_isotonic_is_pool_adjacent_violators():
    score = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y = np.array([0, 1, 0, 0, 1, 1])
    xs, ys = C.fit_isotonic(score, y)
    # blocks {1}: 0/1, {2, 3, 4}: 1/3, {5, 6}: 2/2, each shrunk by (t + 0.5) / (c + 1)
    np.testing.assert_allclose(xs, [1.0, 2.0, 4.0, 5.0, 6.0])
    np.testing.assert_allclose(ys, [0.25, 0.375, 0.375, 2.5 / 3, 2.5 / 3])
    assert np.all(np.diff(ys) >= 0)
    np.testing.assert_allclose(np.interp([0.0, 3.0, 9.0], xs, ys), [0.25, 0.375, 2.5 / 3])


@pytest.mark.parametrize("method, error", [("temperature", 0.01), ("logistic", 0.02), ("isotonic", 0.06)])
def test_a_fitted_calibrator_is_calibrated_where_the_truth_is_known(method, error):
    d, y, _ = synthetic_queries(8000, 3)
    test_d, test_y, truth = synthetic_queries(8000, 4)
    cal = C.fit_calibrator(method, d, y)
    p = cal.predict(test_d)
    assert p.shape == (8000,) and np.all((p >= 0) & (p <= 1))
    assert C.expected_calibration_error(p, test_y) < 0.03
    # it learned the probabilities, not only their average (isotonic: a staircase)
    assert np.mean(np.abs(p - truth)) < error
    # the ECE notices a confidence that is wrong: the true probabilities pushed towards 0 and 1
    sharpened = truth ** 2 / (truth ** 2 + (1 - truth) ** 2)
    assert C.expected_calibration_error(sharpened, test_y) > 0.05


def test_constant_is_calibrated_on_average_and_loses_on_log_loss():
    d, y, _ = synthetic_queries(4000, 5)
    folds = np.arange(4000) % 4
    best, table = C.choose_calibrator(d, y, folds)
    assert best != "constant"
    assert table["constant"]["ece"] < 0.03  # why the choice is by log loss, not by ECE
    assert table[best]["log_loss"] < table["constant"]["log_loss"] - 0.02
    assert set(table) == set(C.METHODS) and table[best]["prediction"].shape == (4000,)


def test_ece_and_reliability_bins_hand_computed():
    p = np.array([0.1, 0.1, 0.9, 0.9])
    y = np.array([0, 1, 1, 1])
    # bin of 0.1: accuracy 0.5 (gap 0.4), bin of 0.9: accuracy 1.0 (gap 0.1); half the queries each
    assert C.expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.25)
    assert C.expected_calibration_error(np.array([0.0, 1.0, 1.0]), np.array([0, 1, 1])) == pytest.approx(0.0)
    bins = C.reliability_bins(np.array([0.0, 0.5, 1.0, 1.0]), np.array([0, 1, 1, 0]), n_bins=4)
    assert bins["edges"].shape == (5,) and bins["count"].tolist() == [1, 0, 1, 2]  # 1.0 is in the last bin
    assert np.isnan(bins["accuracy"][1]) and bins["accuracy"][3] == 0.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        C.reliability_bins(np.array([1.5]), np.array([1]))
    with pytest.raises(ValueError, match="outcomes"):
        C.expected_calibration_error(np.array([0.5, 0.5]), np.array([1]))


def test_early_stop_table_hand_computed():
    conf = np.array([[0.2, 0.85, 0.95, 0.99],   # reaches 0.8 at level 1, 0.9 and 0.95 at level 2
                     [0.1, 0.2, 0.3, 0.4],      # never fires: drawn to the end
                     [0.96, 0.5, 0.5, 0.5]])    # fires at once
    right = np.array([[0, 1, 0, 1],
                      [0, 0, 0, 1],
                      [0, 0, 0, 0]], bool)
    rows = C.early_stop_table(conf, {"top1": right, "top5": np.ones_like(right)}, (0.8, 0.95))
    low, high = rows
    assert low["threshold"] == 0.8 and low["n_fired"] == 2 and low["fires"] == pytest.approx(200 / 3)
    assert low["top1_right"] == pytest.approx(50.0)  # sketch 0 right at level 1, sketch 2 wrong at level 0
    assert low["top5_right"] == 100.0 and low["top5_at_stop"] == 100.0
    assert low["completion_median"] == pytest.approx(np.median([2 / 4, 1 / 4]))
    assert low["saved_median"] == pytest.approx(1 - 3 / 8)
    assert low["saved_mean_all"] == pytest.approx((0.5 + 0.0 + 0.75) / 3)
    assert low["top1_at_stop"] == pytest.approx(200 / 3)  # sketch 1 is right at the end
    assert high["top1_right"] == 0.0 and high["top1_at_stop"] == pytest.approx(100 / 3)
    never = C.early_stop_table(conf, {"top1": right}, (1.1,))[0]
    assert never["n_fired"] == 0 and math.isnan(never["top1_right"]) and never["saved_mean_all"] == 0.0
    with pytest.raises(ValueError, match=r"\(S, L\)"):
        C.early_stop_table(conf[0], {"top1": right[0]})
    with pytest.raises(ValueError, match="top1"):
        C.early_stop_table(conf, {"top1": right[:2]})


def test_photo_folds_keep_each_photo_in_one_fold_and_cross_fit_never_sees_its_fold():
    photos = np.array([f"p{i % 7}" for i in range(70)], dtype=object)
    folds = C.photo_folds(photos, 3, seed=1)
    for p in set(photos):
        assert len(set(folds[photos == p])) == 1
    assert set(folds) == {0, 1, 2}
    np.testing.assert_array_equal(folds, C.photo_folds(photos, 3, seed=1))
    with pytest.raises(ValueError, match="folds"):
        C.photo_folds(photos, 8)
    d, y, _ = synthetic_queries(70, 6)
    held = C.cross_fit("logistic", d, y, folds)
    flipped = y.copy()
    flipped[folds == 0] = ~flipped[folds == 0]
    again = C.cross_fit("logistic", d, flipped, folds)
    np.testing.assert_allclose(held[folds == 0], again[folds == 0])  # fold 0's own outcomes are never read
    assert not np.allclose(held[folds != 0], again[folds != 0])


@pytest.mark.parametrize("method", C.METHODS)
def test_stored_confidence_round_trips_as_plain_json(method, tmp_path):
    d, y, _ = synthetic_queries(2000, 7)
    conf = C.Confidence(C.fit_calibrator(method, d, y, 1), C.fit_calibrator(method, d, y | (d[:, 0] < 1), 5),
                        {"fitted_on": {"split": "val", "n_photos": 60}, "held_out": {"ece_top1": float("nan")}})
    path = conf.save(tmp_path / "calibration.json")
    stored = json.loads(path.read_text())  # strict JSON: NaN becomes null
    assert stored["format"] == C.FORMAT and stored["top1"]["method"] == method
    assert stored["info"]["held_out"]["ece_top1"] is None
    back = C.Confidence.load(path)
    test_d, _, _ = synthetic_queries(300, 8)
    for a, b in zip(conf.predict(test_d), back.predict(test_d)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    p1, p5 = back.predict(test_d)
    assert p1.shape == p5.shape == (300,) and np.all(p5 >= p1)
    assert back.info["fitted_on"]["n_photos"] == 60


def test_a_broken_calibrator_file_is_refused_naming_it(tmp_path):
    d, y, _ = synthetic_queries(500, 9)
    good = C.Confidence(C.fit_calibrator("isotonic", d, y, 1), C.fit_calibrator("logistic", d, y, 5), {}).to_json()
    path = tmp_path / "calibration.json"

    def refused(obj, match):
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        with pytest.raises(DataError, match=match) as e:
            C.Confidence.load(path)
        assert str(path) in str(e.value)

    refused("{not json", "not valid JSON")
    refused({**good, "version": 99}, "not a calibrator")
    refused({**good, "top_k": 5}, "top 5 distances")
    refused({**good, "top1": {**good["top1"], "method": "pickle"}}, "method")
    refused({**good, "top1": {**good["top1"], "std": [1.0, -1.0, 1.0, 1.0, 1.0]}}, "std")
    refused({**good, "top1": {**good["top1"], "weights": [1.0, 2.0]}}, "weights")
    refused({**good, "top1": {**good["top1"], "knots_y": list(reversed(good["top1"]["knots_y"]))}}, "non-decreasing")
    refused({**good, "top5": {**good["top5"], "temperature": -1}}, "temperature")
    refused({**good, "top1": good["top5"]}, "top1/top5")
    with pytest.raises(DataError, match="darp calibrate"):
        C.Confidence.load(tmp_path / "missing.json")
