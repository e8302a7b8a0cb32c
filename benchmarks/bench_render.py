"""Throughput of progressive rendering (all 17 levels) and of glimpse extraction, on 2 CPU threads.

Rendering is timed on random-walk sketches of 150 points in 5 strokes and, when ../shared/data is
there, on the real Chair-V2 training sketches. Run:

    .venv/bin/python benchmarks/bench_render.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from sketch_env.data.store import SketchSet
from sketch_env.glimpse import extract_glimpses, glimpses_from_integral, integral_image
from sketch_env.render import N_LEVELS, render_levels

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def random_walk_sketches(n: int, n_points: int = 150, n_strokes: int = 5, seed: int = 0) -> SketchSet:
    """n sketches of random-walk strokes (steps of about 2% of the canvas) inside [0.1, 0.9]^2."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, 0.02, (n, n_points, 2))
    steps[:, :: n_points // n_strokes] = rng.uniform(-0.3, 0.3, (n, len(range(0, n_points, n_points // n_strokes)), 2))
    xy = 0.5 + np.cumsum(steps, axis=1)
    xy = 0.1 + 0.8 * (xy - xy.min(1, keepdims=True)) / np.ptp(xy, axis=1, keepdims=True)
    pen = np.zeros((n, n_points, 1))
    pen[:, n_points // n_strokes - 1 :: n_points // n_strokes] = 1
    pen[:, -1] = 1
    sketches = list(np.concatenate([xy, pen], axis=2).astype(np.float32))
    return SketchSet.from_list(sketches, [f"walk_{i}" for i in range(n)], ["walk"] * n, ["train"] * n, np.zeros(n))


def chair_v2_sketches() -> SketchSet | None:
    """The Chair-V2 training sketches, normalised to the unit square, or None when unavailable."""
    coords = SHARED_DATA / "chairv2" / "ChairV2_Coordinate_train"
    if not coords.is_file():
        return None
    try:
        from sketch_env.data.qmul import read_coordinate_pickle
        from sketch_env.data.validate import normalise_sketch
    except ImportError:
        return None
    raw = read_coordinate_pickle(coords)
    sketches = [normalise_sketch(points, 256.0, 256.0) for points in raw.values()]
    n = len(sketches)
    return SketchSet.from_list(sketches, list(raw), ["chair"] * n, ["train"] * n, np.zeros(n))


def best_rate(call, items: int, seconds: float) -> float:
    """Items per second of the fastest of repeated calls within `seconds` (after one warm-up call).

    The fastest call, as timeit recommends: on a machine shared with other jobs the slower calls
    measure the other jobs.
    """
    call()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return items / best


def render_rate(sketches: SketchSet, size: int, seconds: float) -> float:
    """Sketches per second of render_levels on one batch."""
    return best_rate(lambda: render_levels(sketches, size), len(sketches), seconds)


def glimpse_rate(batch: int, seconds: float, cached_integral: bool) -> float:
    """Glimpses per second (3 patches of 8 x 8, scale 2) on (batch, 64, 64) images at random locations.

    cached_integral: time only `glimpses_from_integral`, as an environment does for its 12 glimpses
    per completion level after computing the integral images once.
    """
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 64, 64, generator=generator) < 0.1).float()
    locations = torch.rand(batch, 2, generator=generator) * 2 - 1
    if cached_integral:
        integral = integral_image(images)
        return best_rate(lambda: glimpses_from_integral(integral, locations), batch, seconds)
    return best_rate(lambda: extract_glimpses(images, locations), batch, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    torch.set_num_threads(2)

    real = chair_v2_sketches()
    sets = [("random walk", random_walk_sketches(256))]
    if real is not None:
        sets.append(("Chair-V2 train", real))
    print(f"render_levels: {N_LEVELS} levels, float32 output, 2 threads, fastest of repeated calls")
    print(f"{'sketches':<16} {'points/sketch':>13} {'size':>5} {'batch':>6} {'sketches/s':>11}")
    for name, sketches in sets:
        for size, batch in ((64, 256), (256, 32)):
            chunk = sketches.subset(np.arange(batch) % len(sketches))
            rate = render_rate(chunk, size, args.seconds)
            print(f"{name:<16} {chunk.lengths().mean():>13.0f} {size:>5} {batch:>6} {rate:>11,.0f}")
    print()
    print("extract_glimpses: 3 patches of 8x8, scale 2, 64x64 images")
    print(f"{'batch':>6} {'glimpses/s':>12} {'from cached integral':>21}")
    for batch in (1, 16, 64, 256):
        full, cached = glimpse_rate(batch, args.seconds, False), glimpse_rate(batch, args.seconds, True)
        print(f"{batch:>6} {full:>12,.0f} {cached:>21,.0f}")


if __name__ == "__main__":
    main()
