"""Progressive rendering: a batch of sketches as their 17 partial sketches, all at once.

An on-the-fly retrieval episode sees the sketch at 17 completion levels (the point sequence cut at
16 evenly spaced positions, plus the complete sketch). Instead of rasterising 17 times, we compute
once, for every pixel, the first level at which it is inked (`first_ink_level`); each level is then
a comparison (`render_levels`). A level map is built by

1. giving every point the first level that includes it (`point_levels`),
2. sampling every stroke segment (point i to i + 1, absent after a pen lift) at most one pixel
   apart along its longer axis (a DDA line) and every point as a dot, each sample carrying the level
   of the segment's later point (a point's own level for its dot),
3. keeping the smallest level per pixel (`np.minimum.at`), and
4. thickening with a separable min-filter: a square pen of `thickness` pixels.

Coordinates are in [0, 1]^2 with y down; x maps to the pixel centre x * (size - 1). Samples that
fall outside the canvas are dropped, not clipped onto its border.
"""

from __future__ import annotations

import math

import numpy as np

from sketch_env.data.store import DataError, SketchSet

N_LEVELS = 17
N_GLIMPSES = 12  # glimpses per completion level by default (the paper's): an episode is N_LEVELS x n_glimpses steps
NEVER = 255  # first_ink_level of a pixel that no level inks


def default_thickness(size: int) -> int:
    """Pen side in pixels: 2 at 64 x 64, 3 at 256 x 256 (grows with the square root of the size,
    so strokes stay visible at 64 without blotting out details at 256)."""
    return max(1, int(math.floor(1.5 * math.sqrt(size / 64) + 0.5)))


def level_cut_points(n_points: np.ndarray | int, n_levels: int = N_LEVELS) -> np.ndarray:
    """How many points each completion level holds: the project's one definition.

    Level l holds the first max(1, floor((l + 1) * P / n_levels)) points; the last level holds all P.
    n_points: int or integer array (...,) of point counts P >= 1. Returns int64 (..., n_levels).
    """
    _check_n_levels(n_levels)
    p = np.asarray(n_points)
    if p.dtype.kind not in "iu":
        raise ValueError(f"n_points must be integers, got dtype {p.dtype}")
    if p.size and p.min() < 1:
        raise ValueError(f"every sketch needs at least one point to be cut into levels, got n_points min {p.min()}")
    p = p.astype(np.int64)[..., None]
    levels = np.arange(1, n_levels + 1, dtype=np.int64)
    return np.maximum(1, levels * p // n_levels)


def point_levels(sketches: SketchSet, n_levels: int = N_LEVELS) -> np.ndarray:
    """The first completion level that includes each point: (P,) uint8 over `sketches.points`.

    Point k (0-based) of a sketch of P points is included from the first level l with
    cut(l) >= k + 1, i.e. l = ceil(n_levels * (k + 1) / P) - 1 for k >= 1, and 0 for k = 0.
    """
    _check_n_levels(n_levels)
    lengths = _checked_lengths(sketches.offsets, len(sketches.points), sketches.sketch_id)
    return _point_levels(sketches.offsets, lengths, n_levels)


def first_ink_level(
    sketches: SketchSet, size: int = 64, thickness: float | None = None, n_levels: int = N_LEVELS
) -> np.ndarray:
    """For every pixel, the first completion level at which it is inked.

    Returns (S, size, size) uint8; 255 where no level inks the pixel. `thickness` is the side of the
    square pen in pixels, rounded to a whole pixel (default `default_thickness(size)`); an even side
    extends the stroke one pixel further right/down than left/up.
    """
    _check_n_levels(n_levels)
    lengths = _checked_lengths(sketches.offsets, len(sketches.points), sketches.sketch_id)
    return _first_ink(sketches.points, sketches.offsets, lengths, size, thickness, n_levels)


def render_levels(
    sketches: SketchSet, size: int = 64, thickness: float | None = None, n_levels: int = N_LEVELS
) -> np.ndarray:
    """The partial sketches of every sketch: (S, n_levels, size, size) float32, ink = 1, paper = 0.

    Level L is inked where first_ink_level <= L, so level L is contained in level L + 1 and the last
    level is the complete sketch. Memory is S * n_levels * size^2 * 4 bytes: render large sets in chunks.
    """
    first = first_ink_level(sketches, size, thickness, n_levels)
    levels = np.arange(n_levels, dtype=np.uint8)[None, :, None, None]
    return (first[:, None] <= levels).astype(np.float32)


def render_points(points: np.ndarray, size: int = 64, thickness: float | None = None) -> np.ndarray:
    """Render one (possibly partial) sketch: points (n, 3) of x, y, pen -> (size, size) float32.

    The same rasteriser as `render_levels`: render_points(s[:n_L]) equals level L of s.
    """
    points = np.asarray(points, np.float32)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (n, 3) (x, y, pen), got {points.shape}")
    if len(points) == 0:
        raise ValueError("points is empty: there is nothing to draw (a blank canvas is np.zeros((size, size)))")
    offsets = np.array([0, len(points)], np.int64)
    first = _first_ink(points, offsets, np.diff(offsets), size, thickness, N_LEVELS)
    return (first[0] != NEVER).astype(np.float32)


def _check_n_levels(n_levels: int) -> None:
    if not 1 <= n_levels < NEVER:
        raise ValueError(f"n_levels must be in [1, {NEVER - 1}], got {n_levels}")


def _checked_lengths(offsets: np.ndarray, n_points: int, sketch_id) -> np.ndarray:
    """Per-sketch point counts; refuse offsets that do not tile the points or empty sketches."""
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != n_points:
        raise ValueError(f"offsets must run from 0 to the number of points ({n_points}), got {offsets!r}")
    lengths = np.diff(offsets)
    empty = np.flatnonzero(lengths < 1)
    if len(empty):
        ids = [sketch_id[i] for i in empty[:3]]
        raise DataError(f"{len(empty)} sketch(es) have no points to render, e.g. {ids}; drop them before rendering")
    return lengths


def _point_levels(offsets: np.ndarray, lengths: np.ndarray, n_levels: int) -> np.ndarray:
    n_total = int(offsets[-1])
    per_point_len = np.repeat(lengths, lengths)
    k = np.arange(n_total, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    # ceil(n_levels * (k + 1) / P) - 1, in integers; the first point is in every level
    level = (n_levels * (k + 1) + per_point_len - 1) // per_point_len - 1
    level[k == 0] = 0
    return level.astype(np.uint8)


def _pen_side(size: int, thickness: float | None) -> int:
    if thickness is None:
        return default_thickness(size)
    if not math.isfinite(thickness) or thickness < 1:
        raise ValueError(f"thickness must be at least 1 pixel, got {thickness}")
    return int(math.floor(thickness + 0.5))


def _first_ink(
    points: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, size: int, thickness: float | None, n_levels: int
) -> np.ndarray:
    """Level map of sketches given as flat points (P, 3) + offsets (S + 1,): (S, size, size) uint8."""
    if size < 2:
        raise ValueError(f"size must be at least 2 pixels, got {size}")
    pen_side = _pen_side(size, thickness)
    points = np.asarray(points, np.float32)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (P, 3) (x, y, pen), got {points.shape}")
    if not np.isfinite(points).all():
        raise DataError(f"{int((~np.isfinite(points)).any(axis=1).sum())} point(s) have non-finite coordinates")
    n_sketches = len(lengths)
    level_map = np.full(n_sketches * size * size, NEVER, np.uint8)
    if n_sketches == 0:
        return level_map.reshape(0, size, size)

    # per point: pixel coordinates, level, and where its sketch starts in the flat level map
    x = points[:, 0] * np.float32(size - 1)
    y = points[:, 1] * np.float32(size - 1)
    level = _point_levels(offsets, lengths, n_levels)
    base = np.repeat(np.arange(n_sketches, dtype=np.int64) * (size * size), lengths)

    # segments i -> i + 1 within a stroke: pen down at i, and i is not the last point of its sketch
    is_last = np.zeros(len(points), bool)
    is_last[offsets[1:] - 1] = True
    start = np.flatnonzero((points[:, 2] == 0) & ~is_last)
    dx, dy = x[start + 1] - x[start], y[start + 1] - y[start]
    n_samples = np.ceil(np.maximum(np.abs(dx), np.abs(dy))).astype(np.int64) + 1
    first_sample = np.cumsum(n_samples) - n_samples
    step = np.arange(int(n_samples.sum())) - np.repeat(first_sample, n_samples)
    t = step.astype(np.float32) / np.repeat(np.maximum(n_samples - 1, 1), n_samples).astype(np.float32)

    # samples: every segment's DDA points at the later point's level, then every point as a dot
    sample_x = np.concatenate([np.repeat(x[start], n_samples) + t * np.repeat(dx, n_samples), x])
    sample_y = np.concatenate([np.repeat(y[start], n_samples) + t * np.repeat(dy, n_samples), y])
    sample_level = np.concatenate([np.repeat(level[start + 1], n_samples), level])
    sample_base = np.concatenate([np.repeat(base[start], n_samples), base])

    bound = np.float32(size - 0.5)
    inside = (sample_x >= -0.5) & (sample_x < bound) & (sample_y >= -0.5) & (sample_y < bound)
    col = (sample_x[inside] + 0.5).astype(np.int64)  # round half up; non-negative, so truncation is floor
    row = (sample_y[inside] + 0.5).astype(np.int64)
    np.minimum.at(level_map, sample_base[inside] + row * size + col, sample_level[inside])
    return _min_filter(level_map.reshape(n_sketches, size, size), pen_side)


def _min_filter(level_map: np.ndarray, side: int) -> np.ndarray:
    """Square min-filter of `side` pixels over the last two axes (separable: rows, then columns).

    Ink at pixel p spreads to p - (side - 1) // 2 ... p + side // 2 along each axis.
    """
    lo, hi = (side - 1) // 2, side // 2
    out = level_map
    for axis in (-1, -2):
        src, out = out, out.copy()
        n = src.shape[axis]
        for d in range(-hi, lo + 1):
            if d == 0 or abs(d) >= n:
                continue
            # out[q] = min(out[q], src[q + d])
            dst_sl, src_sl = (slice(0, n - d), slice(d, n)) if d > 0 else (slice(-d, n), slice(0, n + d))
            dst_view = _take(out, axis, dst_sl)
            np.minimum(dst_view, _take(src, axis, src_sl), out=dst_view)
    return out


def _take(a: np.ndarray, axis: int, sl: slice) -> np.ndarray:
    index = [slice(None)] * a.ndim
    index[axis] = sl
    return a[tuple(index)]
