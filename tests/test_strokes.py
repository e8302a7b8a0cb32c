"""Stroke-level edits (sketch_env.strokes): augmentation and noise strokes."""

from __future__ import annotations

import numpy as np
import pytest

from sketch_env.data.store import SketchSet
from sketch_env.render import first_ink_level
from sketch_env.strokes import add_noise_strokes, augment_strokes, noise_strokes, stroke_index


def _sketches() -> SketchSet:
    """Two sketches: 3 strokes (2 + 3 + 2 points) and 1 stroke (4 points)."""
    a = np.array([[0.1, 0.1, 0], [0.2, 0.1, 1], [0.5, 0.5, 0], [0.6, 0.5, 0], [0.7, 0.5, 1],
                  [0.3, 0.8, 0], [0.3, 0.9, 1]], np.float32)
    b = np.array([[0.5, 0.1, 0], [0.5, 0.3, 0], [0.5, 0.5, 0], [0.5, 0.7, 1]], np.float32)
    return SketchSet(points=np.concatenate([a, b]), offsets=np.array([0, 7, 11]), sketch_id=np.array(["a", "b"], object),
                     photo_id=np.array(["p", "q"], object), split=np.array(["train"] * 2, object),
                     drawer=np.array([1, 1]))


def _strokes_of(s: SketchSet, i: int) -> list[np.ndarray]:
    pts = s.sketch(i)
    ends = np.flatnonzero(pts[:, 2] > 0.5) + 1
    return [p for p in np.split(pts, ends) if len(p)]


def test_stroke_index_numbers_strokes_across_sketches():
    stroke, sketch_of_stroke = stroke_index(_sketches())
    assert stroke.tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert sketch_of_stroke.tolist() == [0, 0, 0, 1]


def test_augment_drops_whole_strokes_but_never_the_first():
    s = _sketches()
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = augment_strokes(s, rng, drop_p=0.9, jitter=0.0, max_rotation_deg=0, max_scale=0, max_shift=0)
        assert len(out) == 2
        np.testing.assert_allclose(out.sketch(0)[:2], s.sketch(0)[:2])  # the first stroke is kept as it was
        np.testing.assert_allclose(out.sketch(1), s.sketch(1))  # a one-stroke sketch is never emptied
        kept = _strokes_of(out, 0)
        originals = _strokes_of(s, 0)
        assert all(any(len(k) == len(o) and np.allclose(k, o) for o in originals) for k in kept)


def test_augment_moves_points_a_little_and_keeps_them_on_the_canvas():
    s = _sketches()
    out = augment_strokes(s, np.random.default_rng(1), drop_p=0.0)
    assert out.points.shape == s.points.shape
    moved = np.abs(out.points[:, :2] - s.points[:, :2])
    assert 0 < moved.max() < 0.15
    assert out.points[:, :2].min() >= 0 and out.points[:, :2].max() <= 1
    np.testing.assert_array_equal(out.points[:, 2], s.points[:, 2])


def test_noise_strokes_are_inside_the_canvas_and_end_with_a_pen_lift():
    strokes = noise_strokes(50, np.random.default_rng(0))
    for st in strokes:
        assert 6 <= len(st) <= 24
        assert st[:, :2].min() >= 0 and st[:, :2].max() <= 1
        assert st[-1, 2] == 1 and st[:-1, 2].sum() == 0
        extent = np.ptp(st[:, :2], axis=0).max()
        assert 0.01 < extent <= 0.4 + 1e-9


def test_add_noise_strokes_inserts_n_strokes_between_the_sketch_strokes():
    s = _sketches()
    out = add_noise_strokes(s, 3, seed=7)
    assert list(out.sketch_id) == list(s.sketch_id) and list(out.photo_id) == list(s.photo_id)
    for i in range(2):
        original, noisy = _strokes_of(s, i), _strokes_of(out, i)
        assert len(noisy) == len(original) + 3
        # the original strokes are all there, whole and in their order
        matched = [j for j, st in enumerate(noisy) if any(len(st) == len(o) and np.allclose(st, o) for o in original)]
        assert [len(noisy[j]) for j in matched] == [len(o) for o in original]


def test_add_noise_strokes_is_deterministic_and_zero_is_identity():
    s = _sketches()
    a, b, c = add_noise_strokes(s, 2, seed=3), add_noise_strokes(s, 2, seed=3), add_noise_strokes(s, 2, seed=4)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.points.shape != c.points.shape or not np.array_equal(a.points, c.points)
    same = add_noise_strokes(s, 0, seed=3)
    np.testing.assert_array_equal(same.points, s.points)
    np.testing.assert_array_equal(first_ink_level(same), first_ink_level(s))
    with pytest.raises(ValueError, match=">= 0"):
        add_noise_strokes(s, -1)
