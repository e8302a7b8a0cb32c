"""Sketch geometry: one definition of each coordinate conversion, and the figures that draw with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sketch_env.data.validate import normalise_sketch
from sketch_env.geometry import (
    join_strokes,
    location_to_pixel,
    location_to_unit,
    pixel_to_location,
    split_strokes,
    stroke_ends,
    unit_to_canvas,
)
from sketch_env.glimpse import extract_glimpses


def test_location_to_pixel_follows_the_glimpse_sensor():
    """The sensor's -1 and +1 are the image's outer edges: half a pixel beyond the outer pixel centres."""
    np.testing.assert_allclose(location_to_pixel([[-1.0, 1.0], [0.0, 0.0]], 64), [[-0.5, 63.5], [31.5, 31.5]])
    # a one-pixel dot at pixel (x, y) is what a patch of one pixel at location_to_pixel^-1 sees, exactly
    image = torch.zeros(1, 8, 8)
    image[0, 5, 2] = 1.0
    centre = (np.array([2.0, 5.0]) + 0.5) * 2 / 8 - 1  # pixel centre -> location
    np.testing.assert_allclose(location_to_pixel(centre, 8), [2.0, 5.0])
    seen = extract_glimpses(image, torch.tensor(centre[None], dtype=torch.float32), size=1, n_patches=1)
    assert float(seen) == pytest.approx(1.0)


def test_location_to_unit_meets_the_renderer_convention():
    """Sketch x = 0 and 1 are drawn at the outer pixel centres, so the image edges lie half a pixel beyond."""
    size = 64
    np.testing.assert_allclose(location_to_unit([[-1.0, 0.0], [1.0, 0.0]], size)[:, 0],
                               [-0.5 / (size - 1), (size - 0.5) / (size - 1)])
    np.testing.assert_allclose(location_to_unit([0.0, 0.0], size), [0.5, 0.5])


def test_unit_to_canvas_inverts_normalise_sketch():
    points = np.array([[0, 0, 0], [400, 100, 0], [200, 50, 1]], np.float64)
    unit = normalise_sketch(points, 400, 200)
    np.testing.assert_allclose(unit[:, :2], [[0, 0.25], [1, 0.5], [0.5, 0.375]])
    np.testing.assert_allclose(unit_to_canvas(unit[:, :2], 400, 200), points[:, :2], atol=1e-4)


def test_strokes_round_trip_and_the_last_point_ends_a_stroke():
    strokes = [np.array([[0.1, 0.2], [0.3, 0.4]]), np.array([[0.5, 0.6]]), np.array([[0.7, 0.8], [0.9, 1.0]])]
    points = join_strokes(strokes)
    assert points[:, 2].tolist() == [0, 1, 1, 0, 1]
    assert stroke_ends(points).tolist() == [2, 3, 5]
    for got, want in zip(split_strokes(points), strokes):
        np.testing.assert_array_equal(got, want)
    points[-1, 2] = 0  # an unfinished last stroke still ends at the last point
    assert stroke_ends(points).tolist() == [2, 3, 5]
    with pytest.raises(ValueError, match="at least one point"):
        join_strokes([np.zeros((0, 2))])


def test_pixel_to_location_inverts_location_to_pixel_for_numpy_and_torch():
    pixels = np.array([[0.0, 63.0], [31.5, 10.25]])
    np.testing.assert_allclose(location_to_pixel(pixel_to_location(pixels, 64), 64), pixels)
    np.testing.assert_allclose(pixel_to_location([[0, 0], [3, 1]], (4, 2)), [[-0.75, -0.5], [0.75, 0.5]])
    back = pixel_to_location(torch.tensor([[3, 1]]), (4, 2))
    assert back.dtype == torch.float32 and torch.equal(back, torch.tensor([[0.75, 0.5]]))
    assert location_to_pixel(torch.zeros(2, dtype=torch.float64), 8).dtype == torch.float64


def test_glimpse_overlay_is_centred_where_the_sensor_sees(tmp_path, monkeypatch):
    """plots.plot_glimpses draws each glimpse square centred on the pixel the sensor read there (it used
    H - 1): one-pixel dots, found by the sensor at their locations, lie at the squares' centres as
    imshow draws them (pixel (col, row) centred at (col, row))."""
    import policies.running.plots as plots

    dots = [(0, 0), (63, 40), (17, 5)]  # (col, row)
    images = np.zeros((1, 17, 64, 64))
    for col, row in dots:
        images[0, :, row, col] = 1.0
    locations = np.zeros((1, 17, len(dots), 2), np.float32)
    locations[0, :] = pixel_to_location(np.array(dots), 64)
    seen = extract_glimpses(torch.as_tensor(images[0, 3], dtype=torch.float32).expand(len(dots), 64, 64),
                            torch.as_tensor(locations[0, 3]), size=1, n_patches=1)
    np.testing.assert_allclose(seen.flatten().numpy(), 1.0, atol=1e-5)  # each location reads its dot, exactly

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig))
    plots.plot_glimpses(images, locations, np.ones((1, 17)), tmp_path / "g.png", patch_pixels=8, levels=(3,))
    squares = figures[0].axes[0].patches
    centres = [(p.get_x() + p.get_width() / 2, p.get_y() + p.get_height() / 2) for p in squares]
    np.testing.assert_allclose(centres, dots, atol=1e-5)
