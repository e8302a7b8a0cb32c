"""The built-in fine-grained chair data set: determinism, format, stroke order, fine-grainedness."""

from __future__ import annotations

import numpy as np
import pytest

from sketch_env.data import load_dataset
from sketch_env.data.generate import chair_instance, generate_chairs, generate_dataset
from sketch_env.render import render_points


@pytest.fixture(scope="module")
def chairs():
    """12 photos x 3 sketches, a quarter of the photos in the test split."""
    return generate_chairs(n_photos=12, sketches_per_photo=3, seed=0)


def _strokes(points: np.ndarray) -> list[np.ndarray]:
    ends = np.flatnonzero(points[:, 2] == 1) + 1
    return np.split(points, ends[:-1])


def _first_strokes(points: np.ndarray, k: int) -> np.ndarray:
    return np.concatenate(_strokes(points)[:k])


def _unit(image: np.ndarray) -> np.ndarray:
    v = image.ravel()
    return v / np.linalg.norm(v)


def test_same_seed_same_bytes_other_seed_differs():
    a_sk, a_ph = generate_chairs(n_photos=4, sketches_per_photo=2, seed=3)
    b_sk, b_ph = generate_chairs(n_photos=4, sketches_per_photo=2, seed=3)
    assert a_sk.points.tobytes() == b_sk.points.tobytes()
    np.testing.assert_array_equal(a_sk.offsets, b_sk.offsets)
    assert list(a_sk.sketch_id) == list(b_sk.sketch_id) and list(a_sk.split) == list(b_sk.split)
    assert a_ph.image_bytes == b_ph.image_bytes
    c_sk, c_ph = generate_chairs(n_photos=4, sketches_per_photo=2, seed=4)
    assert all(x != y for x, y in zip(a_ph.image_bytes, c_ph.image_bytes))
    assert a_sk.points.shape != c_sk.points.shape or not np.array_equal(a_sk.points, c_sk.points)


def test_instance_does_not_depend_on_the_number_of_photos():
    few_sk, few_ph = generate_chairs(n_photos=3, sketches_per_photo=2, seed=1)
    many_sk, many_ph = generate_chairs(n_photos=7, sketches_per_photo=2, seed=1)
    assert many_ph.image_bytes[:3] == few_ph.image_bytes
    for i in range(len(few_sk)):
        np.testing.assert_array_equal(few_sk.sketch(i), many_sk.sketch(i))
    _, photo, sketches = chair_instance(1, 2, sketches_per_photo=2)
    np.testing.assert_array_equal(photo, few_ph.decode(2))
    np.testing.assert_array_equal(sketches[1], few_sk.sketch(5))


def test_counts_ids_and_split_by_photo(chairs):
    sketches, photos = chairs
    assert len(photos) == 12 and len(sketches) == 36
    assert list(photos.photo_id) == [f"chair{i:04d}" for i in range(12)]
    assert list(sketches.sketch_id[:3]) == ["chair0000_1", "chair0000_2", "chair0000_3"]
    assert list(sketches.drawer) == ["0", "1", "2"] * 12
    assert all(s.startswith(p + "_") for s, p in zip(sketches.sketch_id, sketches.photo_id))
    assert sorted(photos.split) == ["test"] * 3 + ["train"] * 9
    split_of = dict(zip(photos.photo_id, photos.split))
    assert all(split_of[p] == s for p, s in zip(sketches.photo_id, sketches.split))
    assert np.all(sketches.canvas_width == 256) and np.all(sketches.canvas_height == 256)


def test_points_in_unit_square_with_valid_pen_flags(chairs):
    sketches, _ = chairs
    pts = sketches.points
    assert pts.dtype == np.float32 and np.isfinite(pts).all()
    assert pts[:, :2].min() >= 0.0 and pts[:, :2].max() <= 1.0
    assert set(np.unique(pts[:, 2])) <= {0.0, 1.0}
    assert np.all(pts[sketches.offsets[1:] - 1, 2] == 1)
    n_points = sketches.lengths()
    n_strokes = np.array([len(_strokes(sketches.sketch(i))) for i in range(len(sketches))])
    assert all(len(s) >= 2 for i in range(len(sketches)) for s in _strokes(sketches.sketch(i)))
    # about Chair-V2's density: median 107 points and 10 strokes a sketch, 12.5 px between points
    assert 70 <= np.median(n_points) <= 220 and 5 <= np.median(n_strokes) <= 20
    steps = np.linalg.norm(np.diff(pts[:, :2], axis=0), axis=1)[pts[:-1, 2] == 0] * 256
    assert 8 <= np.median(steps) <= 16


def test_photos_decode_to_rgb_images(chairs):
    _, photos = chairs
    images = photos.decode_all(256)
    assert images.shape == (12, 256, 256, 3) and images.dtype == np.uint8
    assert all(img.std() > 10 for img in images)
    _, small = generate_chairs(n_photos=1, sketches_per_photo=1, photo_size=64)
    assert small.decode(0).shape == (64, 64, 3)


def test_different_instances_differ(chairs):
    sketches, photos = chairs
    images = photos.decode_all(64).astype(np.float32)
    for i in range(11):
        assert np.abs(images[i] - images[i + 1]).mean() > 5
        assert not np.array_equal(sketches.sketch(3 * i), sketches.sketch(3 * i + 3))


def test_strokes_go_from_coarse_to_fine(chairs):
    sketches, _ = chairs
    coverage, first_vs_rest = [], []
    for i in range(len(sketches)):
        pts = sketches.sketch(i)
        full = np.ptp(pts[:, :2], axis=0)
        early = np.ptp(pts[: int(0.3 * len(pts)), :2], axis=0)
        coverage.append(np.prod(early) / np.prod(full))
        area = [np.prod(np.ptp(s[:, :2], axis=0) + 0.01) for s in _strokes(pts)]
        first_vs_rest.append(np.mean(area[:2]) / np.mean(area[len(area) // 2 :]))
    # the first 30% of the points (the outline) span most of the finished sketch ...
    assert np.mean(coverage) > 0.45
    # ... and the first two strokes are several times larger than the late ones (details)
    assert np.median(first_vs_rest) > 2.5 and np.mean(np.array(first_vs_rest) > 1) > 0.9


def test_fine_grained_coarse_outlines_alike_full_sketches_differ():
    sketches, _ = generate_chairs(n_photos=16, sketches_per_photo=2, seed=5)
    coarse = np.array([_unit(render_points(_first_strokes(sketches.sketch(i), 2), 8, 1)) for i in range(32)])
    full = np.array([_unit(render_points(sketches.sketch(i), 32)) for i in range(32)])
    photo = np.repeat(np.arange(16), 2)
    other = photo[:, None] != photo[None, :]
    same = (photo[:, None] == photo[None, :]) & ~np.eye(32, dtype=bool)
    coarse_sim, full_sim = coarse @ coarse.T, full @ full.T
    # outlines of different chairs look alike at a glance, the finished sketches do not
    assert np.median(coarse_sim[other]) > 0.65
    assert np.median(full_sim[other]) < np.median(coarse_sim[other]) - 0.2
    # and two people's sketches of one chair agree more than sketches of two chairs
    assert np.median(full_sim[same]) > np.median(full_sim[other]) + 0.05


def test_generate_dataset_writes_a_loadable_data_set(tmp_path):
    out = generate_dataset(tmp_path / "chairs", n_photos=4, sketches_per_photo=2, seed=2, test_fraction=0.5)
    ds = load_dataset(out)
    assert ds.manifest["name"] == "builtin-chairs"
    assert ds.manifest["source"] == "darp data generate seed=2"
    assert ds.manifest["splits"] == {"test": 4, "train": 4}
    sketches, photos = generate_chairs(n_photos=4, sketches_per_photo=2, seed=2, test_fraction=0.5)
    np.testing.assert_array_equal(ds.sketches.points, sketches.points)
    assert list(ds.sketches.sketch_id) == list(sketches.sketch_id)
    assert ds.photos.image_bytes == photos.image_bytes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_photos": 0}, "at least one photo"),
        ({"sketches_per_photo": 0}, "at least one photo"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"seed": -1}, "seed"),
        ({"photo_size": 8}, "photo_size"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_chairs(**{"n_photos": 1, **kwargs})


def test_backdrops_stay_in_range():
    """Studio and room backdrops are pale, nearly grey at the top-left corner (no uint8 wrap-around)."""
    from sketch_env.data.generate import _background

    corners = np.array([np.asarray(_background(np.random.default_rng(i), 32))[0, 0] for i in range(300)], int)
    assert corners.min() > 140 and np.ptp(corners, axis=1).max() < 70
