"""What a query costs in each match mode (issue 23): time to score a batch of queries against a gallery.

For galleries of N random photos (8 x 8 grids of 32-d local descriptors, 64-d embeddings, as phase 1
exports them) it times, per query and completion level: the global ranking alone (`Gallery.rank`), plus
the local term of k glimpse cells (`LocalGallery.distance_at`, once per glimpse), plus the dense term
over every cell (`LocalGallery.dense_distance`), and prints them beside the multiply-adds
`sketch_env.local_match.local_cost` counts. One thread, so the figures compare modes, not machines.

    python benchmarks/bench_local_match.py [--photos 60 1000 10000] [--glimpses 3] [--queries 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from sketch_env.gallery import Gallery
from sketch_env.local_match import LocalGallery, local_cost


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def timed(fn, repeat: int) -> float:
    fn()  # warm up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, nargs="+", default=[60, 1000, 10000])
    parser.add_argument("--glimpses", type=int, default=3, help="glimpse cells per level in local match")
    parser.add_argument("--queries", type=int, default=64, help="queries scored per call (a vector env's batch)")
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--local-dim", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    g, d, b = args.grid, args.local_dim, args.queries
    print(f"{b} queries per call, {args.glimpses} glimpse cells per level, {g} x {g} x {d} grids, D = {args.dim}; "
          "microseconds per query and level (1 thread)")
    print("| photos | global | + local (k cells) | + dense (every cell) | multiply-adds per photo: global / local / dense |")
    print("|---|---|---|---|---|")
    for n in args.photos:
        gallery = Gallery(unit(torch.randn(n, args.dim, generator=gen)), [str(i) for i in range(n)])
        local = LocalGallery(unit(torch.randn(n, g, g, d, generator=gen)).half())
        queries = unit(torch.randn(b, args.dim, generator=gen))
        target = torch.randint(0, n, (b,), generator=gen)
        grids = unit(torch.randn(b, g, g, d, generator=gen))
        cells = torch.randint(0, g * g, (args.glimpses, b), generator=gen)
        descriptors = [grids.reshape(b, g * g, d)[torch.arange(b), c] for c in cells]
        t_global = timed(lambda: gallery.rank(queries, target), args.repeat)
        t_local = timed(lambda: [local.distance_at(x, c) for x, c in zip(descriptors, cells)], args.repeat)
        t_dense = timed(lambda: local.dense_distance(grids), max(1, args.repeat // 2))
        per = 1e6 / b
        costs = [local_cost(m, args.glimpses, (g, g), d, args.dim) for m in ("global", "local", "dense")]
        print(f"| {n} | {t_global * per:.1f} | {(t_global + t_local) * per:.1f} | {(t_global + t_dense) * per:.1f} | "
              f"{costs[0]} / {costs[1]} / {costs[2]} |", flush=True)


if __name__ == "__main__":
    main()
