"""Latency of one stroke in `darp serve`: render + phase-1 embedding + policy glimpses + ranking.

Builds the serving path (`tune_runs.serve.LiveRetriever`) at the paper's sizes with untrained
weights (latency does not depend on them): the compact phase-1 CNN on 64 x 64 partial sketches
(D = 64), the DARP module (GRU 256, K = 6 heads, 3 patches of 8 x 8), 12 glimpses per stroke, and
a gallery of 10,000 random unit vectors. Sketches come from the built-in generator. Each sketch is
sent stroke by stroke as the page sends it (all strokes so far; earlier levels come from the cache),
which is the latency a person feels after lifting the pen. Also timed: each part of a stroke on its
own, and a whole sketch sent at once to a replica that has not seen it (a cache miss replays every
stroke). Target: median stroke under 50 ms on 2 cores.

One torch thread, as a serve replica runs by default: the ops of a policy step are tiny, and on a
busy machine a second thread's synchronisation costs more than it saves (measured: 8x slower at
load 4 on 2 cores). The process-CPU column is the steadier figure on a shared machine.

    python benchmarks/bench_serve.py [--gallery 10000] [--glimpses 12] [--sketches 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from policies.darp_module import DARPModule
from policies.embedding import EmbeddingConfig, EmbeddingNet
from sketch_env.data.generate import generate_chairs
from sketch_env.env import EnvConfig, action_space, observation_space
from sketch_env.gallery import Gallery
from sketch_env.render import render_points
from tune_runs.serve import LiveRetriever

DIM = 64


def make_retriever(n_photos: int, n_glimpses: int, seed: int = 0) -> LiveRetriever:
    torch.manual_seed(seed)
    config = EnvConfig(n_glimpses=n_glimpses)
    module = DARPModule(observation_space=observation_space(config, DIM), action_space=action_space(DIM), model_config={})
    module.eval()
    net = EmbeddingNet(EmbeddingConfig(embedding_dim=DIM)).eval()
    photos = torch.nn.functional.normalize(torch.randn(n_photos, DIM, generator=torch.Generator().manual_seed(seed)), dim=1)
    return LiveRetriever(module, net, Gallery(photos, [f"p{i}" for i in range(n_photos)]), config)


def stroke_latencies(retriever: LiveRetriever, sketches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Wall-clock and process-CPU milliseconds of each `query` call, sending every sketch stroke by
    stroke with a target. On a shared machine the CPU time is the steadier figure (with one thread)."""
    wall, cpu = [], []
    for i, points in enumerate(sketches):
        target = retriever.gallery.photo_ids[i % len(retriever.gallery)]
        for end in np.flatnonzero(points[:, 2] == 1) + 1:
            start, cpu_start = time.perf_counter(), time.process_time()
            retriever.query(points[:end], target)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    return 1000 * np.array(wall), 1000 * np.array(cpu)


@torch.no_grad()
def part_latencies(retriever: LiveRetriever, points: np.ndarray, repeats: int) -> dict[str, float]:
    """Median milliseconds of each part of one stroke (on the partial sketch `points`), timed alone."""
    cfg, net = retriever.config, retriever.net
    sketch = torch.from_numpy(render_points(points, net.config.image_size))
    query = net.embed_sketches(sketch[None, None]).clamp(-1.0, 1.0)
    previous = retriever.advance(None, points, 0)
    parts = {
        "render (2 sizes)": lambda: (render_points(points, cfg.image_size), render_points(points, net.config.image_size)),
        "phase-1 embedding": lambda: net.embed_sketches(sketch[None, None]),
        "one level (the above + policy)": lambda: retriever.advance(previous, points, 1),
        "rank + top-10": lambda: (retriever.gallery.topk(query, 10), retriever.gallery.rank(query, torch.tensor([0]))),
    }
    result = {}
    for name, fn in parts.items():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = 1000 * float(np.median(times))
    policy = result["one level (the above + policy)"] - result["render (2 sizes)"] - result["phase-1 embedding"]
    result[f"  of which policy ({cfg.n_glimpses} glimpses)"] = policy
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=10_000, help="photos in the synthetic gallery")
    parser.add_argument("--glimpses", type=int, default=12, help="glimpses per stroke (the run's n_glimpses)")
    parser.add_argument("--sketches", type=int, default=20, help="generated sketches sent stroke by stroke")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (a serve replica's default is 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retriever = make_retriever(args.gallery, args.glimpses)
    sketch_set, _ = generate_chairs(n_photos=args.sketches, sketches_per_photo=1, seed=0)
    sketches = [sketch_set.sketch(i) for i in range(len(sketch_set))]
    n_strokes = [int(s[:, 2].sum()) for s in sketches]
    print(f"gallery {args.gallery} photos (D {DIM}), {args.glimpses} glimpses per stroke, {args.threads} torch threads, "
          f"{len(sketches)} sketches of {min(n_strokes)}-{max(n_strokes)} strokes")

    stroke_latencies(retriever, sketches[:2])  # warm-up
    live, live_cpu = stroke_latencies(make_retriever(args.gallery, args.glimpses), sketches)
    parts = part_latencies(retriever, sketches[0], repeats=20)
    cold = []
    for points in sketches[:5]:
        fresh = make_retriever(args.gallery, args.glimpses)
        start = time.perf_counter()
        fresh.query(points, fresh.gallery.photo_ids[0])
        cold.append(1000 * (time.perf_counter() - start) / int(points[:, 2].sum()))

    print(f"\n{'per stroke (as the page sends it)':38s}{'ms':>8s}{'CPU ms':>8s}")
    for name, fn in (("min", np.min), ("median", np.median), ("p90", lambda x: np.percentile(x, 90)), ("max", np.max)):
        print(f"  {name:36s}{fn(live):8.1f}{fn(live_cpu):8.1f}")
    print(f"  {'strokes timed':36s}{len(live):8d}")
    print(f"{'parts of one stroke, each timed alone':38s}{'ms':>8s}")
    for name, value in parts.items():
        print(f"  {name:36s}{value:8.1f}")
    print(f"  {'one level + rank + top-10':36s}{parts['one level (the above + policy)'] + parts['rank + top-10']:8.1f}")
    print(f"{'cache miss: whole sketch at once':38s}{'ms':>8s}")
    print(f"  {'per stroke replayed (median)':36s}{np.median(cold):8.1f}")
    verdict = "under" if np.median(live) < 50 else "OVER"
    print(f"\nmedian stroke {np.median(live):.1f} ms wall ({np.median(live_cpu):.1f} ms CPU): {verdict} the 50 ms target"
          f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
