from pathlib import Path

import numpy as np
import pytest

from sketch_env.data.store import DataError, SketchSet
from sketch_env.render import (
    N_LEVELS,
    default_thickness,
    first_ink_level,
    level_cut_points,
    point_levels,
    render_levels,
    render_points,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def sketch_set(sketches: list[np.ndarray]) -> SketchSet:
    n = len(sketches)
    return SketchSet.from_list(sketches, [f"s{i}" for i in range(n)], ["p"] * n, ["train"] * n, np.zeros(n))


def random_sketches(n: int, seed: int = 0) -> list[np.ndarray]:
    """Random-walk sketches of 1 to 60 points in 1 to 6 strokes, some points slightly off the canvas."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        n_points = int(rng.integers(1, 61))
        xy = np.clip(0.5 + np.cumsum(rng.normal(0, 0.08, (n_points, 2)), axis=0), -0.05, 1.05)
        pen = (rng.random(n_points) < 0.15).astype(np.float32)
        pen[-1] = 1
        out.append(np.column_stack([xy, pen]).astype(np.float32))
    return out


HORIZONTAL = np.array([[0.25, 0.5, 0], [0.75, 0.5, 1]], np.float32)  # at size 17: row 8, columns 4..12


def test_level_cut_points_examples():
    assert level_cut_points(17).tolist() == list(range(1, 18))
    assert level_cut_points(5).tolist() == [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5]
    assert level_cut_points(1).tolist() == [1] * 17
    assert level_cut_points(100).tolist() == [5, 11, 17, 23, 29, 35, 41, 47, 52, 58, 64, 70, 76, 82, 88, 94, 100]
    batch = level_cut_points(np.array([[1, 5], [17, 100]]))
    assert batch.shape == (2, 2, N_LEVELS)
    assert batch[1, 1].tolist() == level_cut_points(100).tolist()


@pytest.mark.parametrize("bad", [0, np.array([3, 0]), -2])
def test_level_cut_points_refuses_empty_sketches(bad):
    with pytest.raises(ValueError, match="at least one point"):
        level_cut_points(bad)


def test_level_cut_points_refuses_non_integers():
    with pytest.raises(ValueError, match="integers"):
        level_cut_points(np.array([2.5]))


def test_point_levels_agree_with_cut_points():
    sketches = sketch_set(random_sketches(40))
    levels = point_levels(sketches)
    assert levels.dtype == np.uint8 and levels.shape == (len(sketches.points),)
    cuts = level_cut_points(sketches.lengths())
    for i in range(len(sketches)):
        own = levels[sketches.offsets[i] : sketches.offsets[i + 1]]
        assert np.all(np.diff(own.astype(int)) >= 0)
        included = (own[None, :] <= np.arange(N_LEVELS)[:, None]).sum(axis=1)
        np.testing.assert_array_equal(included, cuts[i])


def test_hand_made_line_renders_expected_pixels():
    for thickness, rows, cols in [(1, [8], range(4, 13)), (2, [8, 9], range(4, 14)), (3, [7, 8, 9], range(3, 14))]:
        expected = np.zeros((17, 17), np.float32)
        expected[np.ix_(rows, list(cols))] = 1
        np.testing.assert_array_equal(render_points(HORIZONTAL, 17, thickness), expected)


def test_hand_made_line_levels():
    # two points: level 0 holds the first point (a dot), the segment arrives with the second at level 16
    first = first_ink_level(sketch_set([HORIZONTAL]), 17, thickness=1)[0]
    expected = np.full((17, 17), 255, np.uint8)
    expected[8, 4:13] = 16
    expected[8, 4] = 0
    np.testing.assert_array_equal(first, expected)


def test_single_point_stroke_is_a_dot():
    dot = np.array([[0.5, 0.5, 1]], np.float32)
    image = render_points(dot, 17, thickness=3)
    expected = np.zeros((17, 17), np.float32)
    expected[7:10, 7:10] = 1
    np.testing.assert_array_equal(image, expected)


def test_pen_lift_breaks_the_line():
    strokes = np.array([[0.25, 0.25, 0], [0.25, 0.75, 1], [0.75, 0.25, 0], [0.75, 0.75, 1]], np.float32)
    lifted = render_points(strokes, 17, thickness=1)
    assert lifted[4:13, 4].all() and lifted[4:13, 12].all()
    assert lifted.sum() == 18  # the two vertical lines and nothing between them
    joined = strokes.copy()
    joined[1, 2] = 0
    assert render_points(joined, 17, thickness=1)[:, 5:12].sum() > 0  # without the lift a diagonal crosses


def test_levels_grow_and_end_with_the_full_render():
    raw = random_sketches(30, seed=1)
    levels = render_levels(sketch_set(raw), 32)
    assert levels.shape == (30, N_LEVELS, 32, 32) and levels.dtype == np.float32
    assert set(np.unique(levels)) <= {0.0, 1.0}
    assert np.all(levels[:, :-1] <= levels[:, 1:])
    for i, points in enumerate(raw):
        np.testing.assert_array_equal(levels[i, -1], render_points(points, 32))


def test_each_level_is_the_render_of_its_prefix():
    raw = random_sketches(6, seed=2)
    levels = render_levels(sketch_set(raw), 24, thickness=2)
    for i, points in enumerate(raw):
        for level, n in enumerate(level_cut_points(len(points))):
            np.testing.assert_array_equal(levels[i, level], render_points(points[:n], 24, thickness=2))


def test_batch_equals_single_renders_even_without_a_final_pen_lift():
    open_end = np.array([[0.1, 0.1, 0], [0.2, 0.1, 0]], np.float32)  # no pen lift on its last point
    other = np.array([[0.9, 0.9, 0], [0.9, 0.5, 1]], np.float32)
    batch = first_ink_level(sketch_set([open_end, other]), 32)
    np.testing.assert_array_equal(batch[0], first_ink_level(sketch_set([open_end]), 32)[0])
    np.testing.assert_array_equal(batch[1], first_ink_level(sketch_set([other]), 32)[0])


def test_points_off_the_canvas_are_dropped_not_clipped():
    sketch = np.array([[0.5, 0.5, 1], [0.5, 1.2, 1]], np.float32)  # a dot inside, a dot below the canvas
    image = render_points(sketch, 17, thickness=1)
    assert image.sum() == 1 and image[8, 8] == 1


def test_default_thickness_scales_with_size():
    assert default_thickness(64) == 2 and default_thickness(256) == 3
    line = render_points(np.array([[0.2, 0.5, 0], [0.8, 0.5, 1]], np.float32), 64)
    assert line[:, 32].sum() == 2


def test_empty_set_gives_empty_batch():
    empty = sketch_set([])
    assert render_levels(empty, 16).shape == (0, N_LEVELS, 16, 16)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(DataError, match=r"no points to render, e.g. \['s1'\]"):
        first_ink_level(sketch_set([HORIZONTAL, np.zeros((0, 3), np.float32)]))
    with pytest.raises(DataError, match="non-finite"):
        render_points(np.array([[0.5, np.nan, 1]], np.float32))
    with pytest.raises(ValueError, match="nothing to draw"):
        render_points(np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        render_points(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="thickness"):
        render_points(HORIZONTAL, 16, thickness=0.5)
    with pytest.raises(ValueError, match="size"):
        render_points(HORIZONTAL, 1)
    with pytest.raises(ValueError, match="n_levels"):
        render_levels(sketch_set([HORIZONTAL]), 16, n_levels=0)


@pytest.mark.skipif(not (SHARED_DATA / "chairv2" / "ChairV2_Coordinate_train").is_file(), reason="no Chair-V2 data")
def test_real_chair_sketches_render_progressively():
    from sketch_env.data.qmul import read_coordinate_pickle
    from sketch_env.data.validate import check_sketch, normalise_sketch

    raw = read_coordinate_pickle(SHARED_DATA / "chairv2" / "ChairV2_Coordinate_train")
    usable = [p for name, p in list(raw.items())[:64] if check_sketch(p, 256, 256, name) is None]
    levels = render_levels(sketch_set([normalise_sketch(p, 256, 256) for p in usable]), 64)
    ink = levels.sum(axis=(2, 3))
    assert np.all(np.diff(ink, axis=1) >= 0)
    assert np.all(ink[:, 0] < ink[:, -1])  # every real sketch gains ink as it is drawn
    assert np.all((ink[:, -1] > 100) & (ink[:, -1] < 0.5 * 64 * 64))  # drawn lines, not blank or blotted
