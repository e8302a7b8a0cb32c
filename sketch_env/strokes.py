"""Stroke-level edits of a batch of sketches: augmentation for training, noise strokes for testing.

Both work on a `SketchSet` (flat points + offsets) with numpy batch ops, never a loop over sketches:

- `augment_strokes`: what a second drawer of the same object might do differently. Drop whole
  strokes (never a sketch's first one, so nothing is left blank), move, turn and resize each stroke a
  little about its own centre, and jitter every point. Used by phase-1 training, fresh each epoch.
- `add_noise_strokes`: the "unnecessary strokes" of on-the-fly retrieval. N strokes that do not
  belong to the object (straight lines and scribbles of a realistic number of points and extent,
  inside the canvas) are inserted between the sketch's strokes at random places of the drawing order.
  Deterministic for a seed, so `darp evaluate --noise-strokes N --noise-seed S` is repeatable.

A stroke is a run of points that ends at a point with pen = 1 (or at the sketch's last point).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sketch_env.data.store import SketchSet


def stroke_index(sketches: SketchSet) -> tuple[np.ndarray, np.ndarray]:
    """Global stroke number of every point (P,) and the sketch of every stroke (n_strokes,).

    A stroke starts at a sketch's first point and after every point with pen = 1.
    """
    n_points = len(sketches.points)
    starts = np.zeros(n_points, bool)
    if n_points:
        starts[1:] = sketches.points[:-1, 2] > 0.5
        starts[sketches.offsets[:-1][sketches.lengths() > 0]] = True
    stroke_of_point = np.cumsum(starts) - 1
    sketch_of_point = np.repeat(np.arange(len(sketches)), sketches.lengths())
    sketch_of_stroke = sketch_of_point[starts]
    return stroke_of_point, sketch_of_stroke


def _with_points(sketches: SketchSet, points: np.ndarray, sketch_of_point: np.ndarray) -> SketchSet:
    """`sketches` with new flat points (grouped by sketch, in order) and their sketch numbers."""
    counts = np.bincount(sketch_of_point, minlength=len(sketches))
    offsets = np.zeros(len(sketches) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return replace(sketches, points=points.astype(np.float32), offsets=offsets)


def augment_strokes(
    sketches: SketchSet,
    rng: np.random.Generator,
    drop_p: float = 0.1,
    jitter: float = 0.004,
    max_rotation_deg: float = 8.0,
    max_scale: float = 0.08,
    max_shift: float = 0.02,
) -> SketchSet:
    """A randomly edited copy of `sketches` (same sketches, same order).

    drop_p: probability of dropping each stroke but the first of its sketch.
    jitter: std of Gaussian noise added to every point (canvas units, the canvas is [0, 1]^2).
    max_rotation_deg, max_scale, max_shift: per-stroke similarity about the stroke's centroid,
    uniform in +-; shift in canvas units. Coordinates are clipped to the canvas.
    """
    if not 0.0 <= drop_p < 1.0:
        raise ValueError(f"drop_p must be in [0, 1), got {drop_p}")
    points = sketches.points
    stroke_of_point, sketch_of_stroke = stroke_index(sketches)
    n_strokes = len(sketch_of_stroke)
    first_stroke = np.ones(n_strokes, bool)
    first_stroke[1:] = sketch_of_stroke[1:] != sketch_of_stroke[:-1]
    keep_stroke = first_stroke | (rng.random(n_strokes) >= drop_p)

    count = np.bincount(stroke_of_point, minlength=n_strokes).astype(np.float64)
    centre = np.stack([np.bincount(stroke_of_point, points[:, c], n_strokes) for c in (0, 1)], 1) / count[:, None]
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, n_strokes))
    scale = 1.0 + rng.uniform(-max_scale, max_scale, n_strokes)
    shift = rng.uniform(-max_shift, max_shift, (n_strokes, 2))
    cos, sin = (np.cos(angle) * scale)[stroke_of_point], (np.sin(angle) * scale)[stroke_of_point]
    rel = points[:, :2] - centre[stroke_of_point]
    xy = np.stack([cos * rel[:, 0] - sin * rel[:, 1], sin * rel[:, 0] + cos * rel[:, 1]], 1)
    xy += centre[stroke_of_point] + shift[stroke_of_point] + rng.normal(0.0, jitter, xy.shape)
    out = np.concatenate([np.clip(xy, 0.0, 1.0), points[:, 2:3]], 1)

    keep = keep_stroke[stroke_of_point]
    sketch_of_point = np.repeat(np.arange(len(sketches)), sketches.lengths())
    return _with_points(sketches, out[keep], sketch_of_point[keep])


def noise_strokes(n: int, rng: np.random.Generator, points_per_stroke: tuple[int, int] = (6, 24)) -> list[np.ndarray]:
    """`n` strokes that belong to no object: each an (m, 3) array of x, y, pen (pen = 1 on the last point).

    Half are straight lines, half scribbles (a random walk that turns smoothly); each spans 0.1 to
    0.4 of the canvas, lies inside it, and has a point count drawn from `points_per_stroke`
    (human strokes in Chair-V2 have a median of about 10 points).
    """
    strokes = []
    for _ in range(n):
        m = int(rng.integers(points_per_stroke[0], points_per_stroke[1] + 1))
        extent = rng.uniform(0.1, 0.4)
        if rng.random() < 0.5:
            direction = rng.normal(size=2)
            direction /= np.linalg.norm(direction) + 1e-12
            xy = np.linspace(0.0, 1.0, m)[:, None] * direction[None, :] * extent
        else:
            heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.6, m))
            steps = np.stack([np.cos(heading), np.sin(heading)], 1) * (extent / m)
            xy = np.cumsum(steps, 0)
        xy -= xy.min(0)
        room = np.maximum(1.0 - xy.max(0), 0.0)
        xy += rng.uniform(0.0, 1.0, 2) * room
        pen = np.zeros((m, 1))
        pen[-1] = 1.0
        strokes.append(np.concatenate([np.clip(xy, 0.0, 1.0), pen], 1))
    return strokes


def add_noise_strokes(sketches: SketchSet, n: int, seed: int = 0) -> SketchSet:
    """`sketches` with `n` noise strokes inserted into each one at random places of its drawing order.

    Each noise stroke goes before stroke k of its sketch, k uniform in 0..n_strokes (n_strokes: after
    the last one). n = 0 returns the sketches unchanged. The same seed gives the same sketches.
    Sketch ids are kept: the sketch is still a drawing of the same photo.
    """
    if n < 0:
        raise ValueError(f"the number of noise strokes must be >= 0, got {n}")
    if n == 0 or len(sketches) == 0:
        return sketches
    rng = np.random.default_rng(seed)
    stroke_of_point, sketch_of_stroke = stroke_index(sketches)
    points = sketches.points.copy()
    # the original sketch's last point ends a stroke, so an inserted stroke never joins it
    points[sketches.offsets[1:][sketches.lengths() > 0] - 1, 2] = 1.0
    strokes_per_sketch = np.bincount(sketch_of_stroke, minlength=len(sketches))
    first_stroke_of_sketch = np.concatenate([[0], np.cumsum(strokes_per_sketch)[:-1]])

    # sort key of every point: (sketch, slot, order); real stroke k of a sketch has slot 2k + 1, a
    # noise stroke inserted before stroke k has slot 2k, so it lands between strokes k - 1 and k
    sketch_of_point = np.repeat(np.arange(len(sketches)), sketches.lengths())
    slot = 2 * (stroke_of_point - first_stroke_of_sketch[sketch_of_point]) + 1
    new_points, new_sketch, new_slot = [points], [sketch_of_point], [slot]
    for s in range(len(sketches)):
        places = rng.integers(0, strokes_per_sketch[s] + 1, n)
        for place, stroke in zip(places, noise_strokes(n, rng)):
            new_points.append(stroke)
            new_sketch.append(np.full(len(stroke), s))
            new_slot.append(np.full(len(stroke), 2 * place))
    all_points = np.concatenate(new_points)
    all_sketch = np.concatenate(new_sketch)
    all_slot = np.concatenate(new_slot)
    order = np.lexsort((np.arange(len(all_points)), all_slot, all_sketch))
    return _with_points(sketches, all_points[order], all_sketch[order])


def with_noise_strokes(dataset, n: int, seed: int):
    """The Dataset `dataset` with `n` noise strokes added to every sketch (`add_noise_strokes`, deterministic for `seed`)."""
    return replace(dataset, sketches=add_noise_strokes(dataset.sketches, n, seed))
