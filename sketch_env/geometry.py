"""Sketch geometry: the coordinate systems a point passes through, and strokes as point arrays.

- canvas: pixels of a w x h drawing surface, y down (the page, a coordinate file). A canvas maps
  onto sketch units by its longer side, the shorter axis centred (`sketch_env.data.validate.
  normalise_sketch`); `unit_to_canvas` maps back.
- sketch units: x, y in [0, 1], y down, the coordinates data sets store.
- image pixels: a rendered size x size image in pixel-centre coordinates: pixel i's centre is at
  i, the image covers [-0.5, size - 0.5], and the sketch point x is drawn at x * (size - 1)
  (`sketch_env.render`).
- sensor locations: x, y in [-1, 1], where -1 is the left/top edge of the image and +1 the
  right/bottom edge (`sketch_env.glimpse`, grid_sample's align_corners=False convention).
  `location_to_pixel` / `pixel_to_location` are the one conversion to and from image pixels: the
  sensor, the fixed locators, the env's frames and the plots' glimpse boxes all use them.

A sketch is a (P, 3) array of x, y and pen, with pen = 1 on the last point of each stroke.
"""

from __future__ import annotations

import numpy as np
import torch


def location_to_pixel(locations, size):
    """Sensor locations (..., 2) in [-1, 1] -> pixel-centre coordinates (x, y) of an image of `size`
    (an int for size x size, or (width, height)).

    -1 maps to -0.5 (the outer edge of pixel 0), 0 to (size - 1) / 2, +1 to size - 0.5. numpy arrays
    and lists come back as float64 numpy, torch tensors as floating tensors (for the env's steps).
    """
    locations = _floating(locations)
    return (locations + 1.0) / 2.0 * _sizes(size, locations) - 0.5


def pixel_to_location(pixels, size):
    """Pixel-centre coordinates (..., 2) (x, y) of an image of `size` -> sensor locations: the inverse of
    `location_to_pixel`, so the centre of pixel (col, row) is ((2 col + 1) / W - 1, (2 row + 1) / H - 1)."""
    pixels = _floating(pixels)
    return (pixels + 0.5) * 2.0 / _sizes(size, pixels) - 1.0


def _floating(values):
    """A torch tensor as a floating tensor (float32 unless it already floats), anything else as float64 numpy."""
    if isinstance(values, torch.Tensor):
        return values if values.is_floating_point() else values.to(torch.float32)
    return np.asarray(values, np.float64)


def _sizes(size, like):
    """size (int, or (width, height)) in the array type of `like`, to broadcast over its last axis."""
    return like.new_tensor(size) if isinstance(like, torch.Tensor) else np.asarray(size, np.float64)


def unit_length(pixels, size: int):
    """A length in pixels of a size x size image, in sketch units (one pixel is 1 / (size - 1))."""
    return np.asarray(pixels, np.float64) / (size - 1)


def location_to_unit(locations, size: int) -> np.ndarray:
    """Sensor locations (..., 2) on a size x size image -> sketch units (slightly beyond [0, 1] at the edges)."""
    return unit_length(location_to_pixel(locations, size), size)


def unit_to_canvas(xy, w: float, h: float) -> np.ndarray:
    """Sketch units (..., 2) -> pixels of a w x h canvas (the inverse of `normalise_sketch`)."""
    side = max(w, h)
    return np.asarray(xy, np.float64) * side - np.array([(side - w) / 2, (side - h) / 2])


def stroke_ends(points: np.ndarray) -> np.ndarray:
    """(n_strokes,) int64 point counts at which the strokes of `points` (P, 3) end.

    A stroke ends after every point with pen = 1; the last point ends one whatever its flag.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"points must have shape (P, 3) with P >= 1, got {points.shape}")
    return np.append(np.flatnonzero(points[:-1, 2] == 1) + 1, len(points)).astype(np.int64)


def split_strokes(points: np.ndarray) -> list[np.ndarray]:
    """(P, 3) points -> one (n_i, 2) array of x, y per stroke."""
    ends = stroke_ends(points)
    return [s[:, :2] for s in np.split(np.asarray(points), ends[:-1])]


def join_strokes(strokes: list[np.ndarray]) -> np.ndarray:
    """Strokes, each (n_i, 2) x, y with n_i >= 1 -> (P, 3) float64 points with pen = 1 ending each stroke."""
    if not strokes or any(len(s) == 0 for s in strokes):
        raise ValueError("need at least one stroke, and at least one point in every stroke")
    xy = np.concatenate([np.asarray(s, np.float64).reshape(-1, 2) for s in strokes])
    pen = np.zeros(len(xy))
    pen[np.cumsum([len(s) for s in strokes]) - 1] = 1.0
    return np.column_stack([xy, pen])
