"""Env-only speed of SketchRetrieval-v0: steps per second with random actions, no policy.

Builds Chair-V2-sized episodes in memory (random-walk sketches rendered by the project's renderer,
random unit embeddings: 760 sketches, a gallery of 240 photos, D = 64), then steps
SketchRetrievalVectorEnv at B = 1, 16, 64, 256 and the single SketchRetrievalEnv for reference.
Random actions are drawn before timing. Target: >= 50,000 steps/s at B = 256 on 2 cores.

    python benchmarks/bench_env.py [--sizes 1 16 64 256] [--seconds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sketch_env.data import SketchSet
from sketch_env.env import EnvConfig, SketchRetrievalEnv
from sketch_env.episodes import EpisodeData
from sketch_env.gallery import Gallery
from sketch_env.render import N_LEVELS, render_levels
from sketch_env.vector_env import SketchRetrievalVectorEnv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sketch_env.synthetic import random_walk_sketch  # noqa: E402  (the env tests' random-walk sketches, longer)

ACTION_POOL = 64  # pre-drawn action batches, cycled


def chair_sized_episodes(n_sketches: int = 760, n_photos: int = 240, dim: int = 64, seed: int = 0) -> EpisodeData:
    """Episodes with Chair-V2's training-split sizes, built in memory."""
    rng = np.random.default_rng(seed)
    strokes = [random_walk_sketch(rng, int(rng.integers(80, 200)), 0.03, 0.02, 20) for _ in range(n_sketches)]
    ids = [f"s{i}" for i in range(n_sketches)]
    photo_of = rng.integers(0, n_photos, n_sketches)
    sketches = SketchSet.from_list(strokes, ids, [f"p{i}" for i in photo_of], ["train"] * n_sketches, np.zeros(n_sketches))
    images = torch.from_numpy(render_levels(sketches).astype(np.uint8))

    def unit(x):
        return torch.from_numpy((x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32))

    return EpisodeData(
        images=images,
        sketch_embedding=unit(rng.normal(size=(n_sketches, N_LEVELS, dim))),
        target_index=torch.from_numpy(photo_of.astype(np.int64)),
        gallery=Gallery(unit(rng.normal(size=(n_photos, dim))), [f"p{i}" for i in range(n_photos)]),
        sketch_id=np.array(ids, dtype=object),
        photo_id=np.array([f"p{i}" for i in photo_of], dtype=object),
    )


def random_actions(rng: np.random.Generator, shape: tuple[int, ...], dim: int) -> list[dict[str, np.ndarray]]:
    return [
        {
            "location": rng.uniform(-1, 1, (*shape, 2)).astype(np.float32),
            "query": np.clip(rng.normal(0, 0.2, (*shape, dim)), -1, 1).astype(np.float32),
        }
        for _ in range(ACTION_POOL)
    ]


def steps_per_second(env, actions: list[dict[str, np.ndarray]], per_step: int, seconds: float) -> tuple[float, float]:
    """Env steps (a vector step of B counts B) per wall-clock second and per CPU second of this
    process, over about `seconds` of stepping. On a shared machine the CPU figure is the steadier."""
    env.reset(seed=0)
    for action in actions[:8]:  # warm-up
        env.step(action)
    steps, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for action in actions:
            _, _, terminated, _, _ = env.step(action)
            steps += 1
            if per_step == 1 and terminated:
                env.reset()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return steps * per_step / wall, steps * per_step / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64, 256], help="batch sizes B")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--reward", default="rank_gain", choices=["threshold", "best_rank", "rank_gain"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    episodes = chair_sized_episodes()
    config = EnvConfig(reward=args.reward)
    rng = np.random.default_rng(0)
    print(f"{len(episodes)} sketches, gallery {len(episodes.gallery)}, D {episodes.dim}, "
          f"{config.n_glimpses} glimpses x 17 levels, reward {args.reward}, {args.threads} torch threads")
    print(f"{'':31s}{'steps/s':>10s}{'steps/CPU-s':>13s}")
    single = SketchRetrievalEnv(config, episodes)
    wall, cpu = steps_per_second(single, random_actions(rng, (), episodes.dim), 1, args.seconds)
    print(f"{'SketchRetrievalEnv':31s}{wall:>10,.0f}{cpu:>13,.0f}")
    for b in args.sizes:
        vector = SketchRetrievalVectorEnv(config, b, episodes)
        wall, cpu = steps_per_second(vector, random_actions(rng, (b,), episodes.dim), b, args.seconds)
        print(f"{f'SketchRetrievalVectorEnv B={b}':31s}{wall:>10,.0f}{cpu:>13,.0f}")


if __name__ == "__main__":
    main()
