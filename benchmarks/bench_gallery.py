"""Gallery.rank throughput and latency next to the memory-bandwidth floor.

For each gallery size N (64-d float32 embeddings) and batch size B, times `Gallery.rank` and prints
queries/s and the latency per query. The floor is what one query must cost at least when the
gallery is read once per query: N x 64 x 4 bytes / the read bandwidth measured here with a large
`torch.sum`. B = 1 should be within 2x of it at N = 100k and 1M; B = 256 reads the gallery once
per block of queries, so its per-query time can go below that floor (it is bound by the matmul).

Run (about a minute on 2 cores):  python benchmarks/bench_gallery.py [--sizes 1000 1000000] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from sketch_env.gallery import Gallery

DIM = 64


def read_bandwidth(n_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes/s of the best of `repeats` sums over a large float32 tensor (a pure streaming read)."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    return n_bytes / min(_timed(lambda: x.sum()) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(gallery: Gallery, batch: int, budget_s: float, rng: np.random.Generator) -> list[float]:
    """Seconds per `rank` call over about budget_s of calls (at least 3), after one warm-up call."""
    target = torch.from_numpy(rng.integers(0, len(gallery), size=batch))
    queries = gallery.embeddings[target] + 0.3 * torch.randn(batch, DIM)
    gallery.rank(queries, target)
    times = []
    while len(times) < 3 or sum(times) < budget_s:
        times.append(_timed(lambda: gallery.rank(queries, target)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, read bandwidth {bandwidth / 1e9:.2f} GB/s")
    print(f"{'N':>9} {'B':>4} {'queries/s':>11} {'ms/query':>9} {'best':>8} {'floor ms':>9} {'x floor':>8}")
    for n in args.sizes:
        emb = torch.randn(n, DIM)
        emb /= emb.norm(dim=1, keepdim=True)
        gallery = Gallery(emb, [str(i) for i in range(n)])
        floor = n * DIM * 4 / bandwidth
        for batch in args.batches:
            times = bench(gallery, batch, args.budget, rng)
            per_query = statistics.median(times) / batch
            best = min(times) / batch
            print(
                f"{n:>9} {batch:>4} {1 / per_query:>11.0f} {per_query * 1e3:>9.4f} {best * 1e3:>8.4f} "
                f"{floor * 1e3:>9.4f} {per_query / floor:>8.2f}"
            )
        del gallery, emb


if __name__ == "__main__":
    main()
