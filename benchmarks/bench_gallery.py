"""Gallery search: exact ranking against the memory-bandwidth floor, and approximate top-k at millions of photos.

Exact (the default, what `make bench` runs): for each gallery size N (64-d float32 embeddings) and
batch size B, times `Gallery.rank` and prints queries/s and the latency per query. The floor is
what one query must cost at least when the gallery is read once per query: N x 64 x 4 bytes / the
read bandwidth measured here with a large `torch.sum`. B = 1 should be within 2x of it at N = 100k
and 1M; B = 256 reads the gallery once per block of queries, so its per-query time can go below
that floor (it is bound by the matmul).

Approximate (`--ann --embedding PHASE1_RUN`): for each N, the exact top-10 (`Gallery.topk(exact=True)`)
next to each index of `sketch_env.gallery_index` attached to the gallery (`Gallery.use_index`, exact
re-rank of the candidates): build time, memory, ms per query for 1 query and for 64 at once (through
`Gallery.topk`, re-rank included), and recall@10 = the share of the exact top-10 found. Every IVF
index is built once and searched at each `--nprobe`; HNSW at each `--ef-search`.

The embeddings are synthetic, drawn to look like the phase-1 run's export (not uniform on the sphere,
which has no neighbourhoods and makes every index look bad, nor a few tight clusters, which flatter
it):
- photos: a smoothed bootstrap of the run's photo embeddings, x = mean + sqrt(1 - h^2) (c - mean) + h L z
  with c a real photo, z ~ N(0, I) and L L^T their full 64 x 64 covariance, normalised to unit length as
  the network's outputs are. It keeps the mean and covariance (the PCA spectrum) for every h; h = 1 is
  the Gaussian with that covariance, h -> 0 copies of the real photos. h is fitted so that the mean
  distance from a photo to its nearest other photo, among as many photos as the export has, matches
  the real one (the local density an index has to resolve); `--bandwidth 1` gives the Gaussian.
- queries: a gallery photo chosen uniformly plus a real sketch-to-photo offset (a sketch's embedding
  minus its own photo's, drawn from all sketches at all 17 completion levels, as the live system queries
  after every stroke) times s, normalised: near their photo, not at it. s is fitted so that the mean
  query-to-photo distance matches the real one.
It prints the fit (the variance share of the leading components, the distances and the target's rank
among as many photos as the export has, real and synthetic) so the reader can judge it.

    python benchmarks/bench_gallery.py [--sizes 1000 1000000] [--threads 2]                       # exact
    python benchmarks/bench_gallery.py --ann --embedding RUN --sizes 1000000 10000000 [--indexes ivfpq hnsw]

Memory: the gallery holds its embeddings twice (row-major and the ranking layout, 2 x N x 64 x 4
bytes: 5.1 GB at 10M) plus its ids; the index adds what the table's "index MB" says. The process's
peak resident memory is printed at the end.
"""

from __future__ import annotations

import os

# torch's and faiss's OpenMP threads spin while waiting by default and then stall each other on 2 cores
# (an IVF-PQ build of 20k photos took 100 s instead of 1 s); must be set before torch is imported
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sketch_env.gallery import Gallery  # noqa: E402

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


def exact_table(args) -> None:
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


# ---------------------------------------------------------------------------------------------------
# Approximate search at millions of photos


class RealisticEmbeddings:
    """Synthetic photo embeddings and queries shaped like a phase-1 export (see the module docstring)."""

    def __init__(self, run_dir: str, bandwidth: float | None = None):
        from sketch_env.embedding_export import load_embedding_export

        export = load_embedding_export(run_dir)
        photos = export.photo_embedding.astype(np.float64)
        if photos.shape[1] != DIM:
            raise SystemExit(f"{run_dir}: embeddings of dimension {photos.shape[1]}, this benchmark is for {DIM}")
        self.real_photos = export.photo_embedding
        self.mean = photos.mean(0)
        cov = np.cov(photos, rowvar=False)
        values, vectors = np.linalg.eigh(cov)
        self.spectrum = np.clip(values[::-1], 0, None)
        self.factor = (vectors * np.sqrt(np.clip(values, 0, None))).astype(np.float32)  # x = mean + factor @ z
        rows = export.photo_index()
        target = np.array([rows[p] for p in export.sketch_photo_id])
        self.real_queries = export.sketch_embedding  # (S, 17, D)
        self.real_target = target
        self.offsets = (export.sketch_embedding - export.photo_embedding[target][:, None, :]).reshape(-1, DIM)
        self.h, self.scale = 1.0, 1.0
        self.h = bandwidth if bandwidth is not None else self._fit(
            "h", np.linspace(0.05, 1.0, 20), lambda: self._nn_distance(self.photos(len(self.real_photos), seed=7)),
            self._nn_distance(torch.from_numpy(self.real_photos)), decreasing=False)
        real_distance = float(np.linalg.norm(self.offsets, axis=1).mean())
        self.scale = self._fit("scale", np.linspace(0.5, 3.0, 26), lambda: self._query_distance(), real_distance,
                               decreasing=False)

    def _fit(self, name: str, grid, measure, target: float, decreasing: bool) -> float:
        """The value of `name` on `grid` whose `measure()` is closest to `target`."""
        best, best_gap = grid[0], np.inf
        for value in grid:
            setattr(self, name, float(value))
            gap = abs(measure() - target)
            if gap < best_gap:
                best, best_gap = float(value), gap
        setattr(self, name, best)
        return best

    @staticmethod
    def _nn_distance(photos: torch.Tensor) -> float:
        g = Gallery(photos, [str(i) for i in range(len(photos))])
        return float(g.topk(g.embeddings, 2, exact=True)[1][:, 1].clamp_min(0).sqrt().mean())

    def _query_distance(self) -> float:
        photos = self.photos(4096, seed=11)
        q, t = self.queries(photos, 4096, seed=12)
        return float((q - photos[t]).norm(dim=1).mean())

    def photos(self, n: int, seed: int, block: int = 1 << 20) -> torch.Tensor:
        """(n, D) unit float32 photos, made `block` at a time (no float64 copy of the gallery)."""
        out = torch.empty(n, DIM)
        rng = np.random.default_rng(seed)
        mean = self.mean.astype(np.float32)
        shrink = np.float32(np.sqrt(max(0.0, 1.0 - self.h**2)))
        for start in range(0, n, block):
            m = min(block, n - start)
            centre = self.real_photos[rng.integers(0, len(self.real_photos), m)]
            x = mean + shrink * (centre - mean) + np.float32(self.h) * (rng.standard_normal((m, DIM), dtype=np.float32) @ self.factor.T)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + m] = torch.from_numpy(x)
        return out

    def queries(self, photos: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, D) queries near random gallery photos and those photos' rows (n,)."""
        rng = np.random.default_rng(seed)
        target = torch.from_numpy(rng.integers(0, len(photos), n))
        offset = self.scale * torch.from_numpy(self.offsets[rng.integers(0, len(self.offsets), n)])
        q = photos[target] + offset
        return q / q.norm(dim=1, keepdim=True), target

    def describe(self) -> None:
        """Print how the synthetic data compares with the real export it was fitted to."""
        share = np.cumsum(self.spectrum) / self.spectrum.sum()
        effective = self.spectrum.sum() ** 2 / (self.spectrum**2).sum()
        n = len(self.real_photos)
        print(f"fitted to {n} real photo embeddings and {len(self.offsets)} sketch-to-photo offsets: "
              f"bandwidth h = {self.h:.2f}, offset scale s = {self.scale:.2f}")
        print(f"  variance in the leading 4 / 8 / 16 / 32 components: "
              + " / ".join(f"{share[k - 1]:.2f}" for k in (4, 8, 16, 32)) + f"; effective dimension {effective:.1f}")
        real_q = torch.from_numpy(self.real_queries.reshape(-1, DIM).copy())
        real_t = torch.from_numpy(np.repeat(self.real_target, self.real_queries.shape[1]))
        real = Gallery(self.real_photos, [str(i) for i in range(n)])
        real_rank = real.rank(real_q, real_t).float()
        synth_photos = self.photos(n, seed=123)
        synth_q, synth_t = self.queries(synth_photos, len(real_q), seed=124)
        synth = Gallery(synth_photos, [str(i) for i in range(n)])
        synth_rank = synth.rank(synth_q, synth_t).float()
        nn_real, nn_synth = self._nn_distance(real.embeddings), self._nn_distance(synth.embeddings)
        print(f"  {'':10} {'query-photo dist':>17} {'photo NN dist':>14} {'target rank (N=%d)' % n:>20} {'acc@10':>7}")
        for name, q, t, g, rank, nn in (("real", real_q, real_t, real, real_rank, nn_real),
                                         ("synthetic", synth_q, synth_t, synth, synth_rank, nn_synth)):
            dist = (q - g.embeddings[t]).norm(dim=1).mean()
            print(f"  {name:10} {dist:>17.3f} {nn:>14.3f} {rank.mean():>20.1f} {100 * (rank <= 10).float().mean():>6.1f}%")


def rss_gb(field: str = "VmRSS") -> float:
    """Resident memory of this process (VmRSS) or its peak (VmHWM), GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def time_topk(gallery: Gallery, queries: torch.Tensor, batch: int, exact: bool, budget_s: float, most: int) -> float:
    """Median seconds per query of `Gallery.topk(k=10)` over batches of `batch` queries (after a warm-up)."""
    gallery.topk(queries[:batch], 10, exact=exact)
    times = []
    for start in range(0, min(len(queries), most * batch) - batch + 1, batch):
        times.append(_timed(lambda: gallery.topk(queries[start : start + batch], 10, exact=exact)) / batch)
        if sum(times) * batch > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def recall_at_10(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean share of each query's exact top-10 among the 10 returned."""
    hits = (found[:, :, None] == truth[:, None, :]).any(1).float().sum(1)
    return float(hits.mean() / truth.shape[1])


def ann_table(args) -> None:
    import faiss

    from sketch_env.gallery_index import IndexConfig, build_index

    faiss.omp_set_num_threads(args.threads)
    data = RealisticEmbeddings(args.embedding, args.bandwidth)
    data.describe()
    print(f"torch {torch.__version__}, faiss {faiss.__version__}, {args.threads} threads; ms per query of "
          f"Gallery.topk(k=10) for 1 query and for 64 at once; recall of the exact top-10 over {args.queries} queries")
    print(f"{'N':>9} {'search':<34} {'build s':>8} {'index MB':>9} {'ms (1)':>8} {'ms (64)':>8} {'recall@10':>10} {'RSS GB':>7}")
    for n in args.sizes:
        photos = data.photos(n, seed=0)
        gallery = Gallery(photos, np.arange(n).astype(str).astype(object))
        del photos
        queries, _ = data.queries(gallery.embeddings, args.queries, seed=1)
        truth = torch.cat([gallery.topk(queries[s : s + 64], 10, exact=True)[0] for s in range(0, len(queries), 64)])
        one = time_topk(gallery, queries, 1, True, args.budget, most=20)
        many = time_topk(gallery, queries, 64, True, args.budget, most=1 if n > 2_000_000 else 3)
        gallery_mb = 2 * gallery.embeddings.numel() * 4 / 1e6
        print(f"{n:>9} {'exact (gallery %.0f MB)' % gallery_mb:<34} {'-':>8} {'-':>9} {one * 1e3:>8.2f} "
              f"{many * 1e3:>8.3f} {1.0:>10.4f} {rss_gb():>7.2f}", flush=True)
        for kind in args.indexes:
            if kind == "hnsw" and n > args.hnsw_max:
                print(f"{n:>9} {'HNSW%d,Flat' % args.hnsw_m:<34} not built above --hnsw-max {args.hnsw_max}: "
                      f"a second copy of the gallery plus its graph (~{n * (DIM * 4 + 2 * args.hnsw_m * 4) / 1e9:.1f} GB)")
                continue
            config = IndexConfig(kind=kind, pq_m=args.pq_m, candidates=args.candidates, hnsw_m=args.hnsw_m, seed=0)
            index = build_index(gallery.embeddings.numpy(), config, threads=args.threads)
            megabytes = index.memory_bytes() / 1e6
            gallery.use_index(index)
            settings = args.ef_search if kind == "hnsw" else args.nprobe
            for value in settings:
                if kind == "hnsw":
                    config = IndexConfig(kind=kind, hnsw_m=args.hnsw_m, ef_search=value, candidates=args.candidates)
                    index.index.hnsw.efSearch = value
                else:
                    config = IndexConfig(kind=kind, nlist=index.config.nlist, nprobe=value, pq_m=args.pq_m,
                                         candidates=args.candidates)
                    faiss.extract_index_ivf(index.index).nprobe = value
                index.config = config
                found = torch.cat([gallery.topk(queries[s : s + 64], 10)[0] for s in range(0, len(queries), 64)])
                recall = recall_at_10(found, truth)
                one = time_topk(gallery, queries, 1, False, args.budget, most=200)
                many = time_topk(gallery, queries, 64, False, args.budget, most=10)
                rerank = f"+rerank {args.candidates}" if kind == "ivfpq" else ""
                print(f"{n:>9} {config.describe(n) + rerank:<34} {index.build_s:>8.1f} {megabytes:>9.0f} "
                      f"{one * 1e3:>8.3f} {many * 1e3:>8.3f} {recall:>10.4f} {rss_gb():>7.2f}", flush=True)
            gallery.use_index(None)
            del index
        del gallery, queries, truth
    print(f"peak resident memory of this process: {rss_gb('VmHWM'):.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="gallery sizes (default: 1k 10k 100k 1M exact; 1M 10M with --ann)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per row")
    parser.add_argument("--ann", action="store_true", help="the approximate-search table (needs --embedding)")
    parser.add_argument("--embedding", help="phase-1 run whose export the synthetic embeddings are fitted to")
    parser.add_argument("--indexes", nargs="+", default=["ivfpq", "ivfflat", "hnsw"], choices=["ivfpq", "ivfflat", "hnsw"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 48, 64, 96], help="IVF settings measured (64: the default)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--pq-m", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=256, help="candidates re-ranked exactly per query")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest gallery an HNSW index is built for")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="h of the synthetic photos (default: fitted; 1: the Gaussian of the real covariance)")
    parser.add_argument("--queries", type=int, default=500, help="queries for recall and timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ann:
        if not args.embedding:
            parser.error("--ann needs --embedding PHASE1_RUN (the export the synthetic embeddings are fitted to)")
        args.sizes = args.sizes or [1_000_000, 10_000_000]
        ann_table(args)
    else:
        args.sizes = args.sizes or [1_000, 10_000, 100_000, 1_000_000]
        exact_table(args)


if __name__ == "__main__":
    main()
