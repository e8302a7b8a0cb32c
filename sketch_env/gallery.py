"""The photo gallery: the one place in the project where ranks and top-k photos are computed.

Rank of the target photo for a query = 1 + the number of gallery photos *strictly* closer to the
query (squared Euclidean distance) than the target. Ties count in the query's favour: a photo at
exactly the target's distance (e.g. a duplicate of the target) does not push the target down, so
a gallery of identical photos ranks every target 1. Every metric and reward reads ranks from here.

Distances come from one matrix product per block of queries: the gallery is stored once as the
(D + 1, N) matrix ``[-2 E^T; ||e||^2]`` so that ``[q, 1] @ that = ||e||^2 - 2 q.e``, which is the
squared distance minus ``||q||^2``. That term is the same for every photo of a query, so leaving it
out changes neither the order nor the ties (and saves a pass); `topk` adds it back to its k
distances. The target's value is read from the same row it is compared with, so a photo and its
exact duplicate get the same value and ties are counted consistently. For one query this layout
makes the rank a single streaming read of the gallery, which is what bounds its speed.

Large galleries: `use_index` attaches an approximate index (`sketch_env.gallery_index`, faiss) that
`topk` and `ranked_topk` then ask for candidates, re-ranked exactly here (the live server's top 10
at millions of photos). `rank` never uses it: ranks, and every metric and reward read from them,
stay exact whatever the gallery's size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from sketch_env.metrics import percentile as _percentile

# Largest (queries x photos) block of float32 values computed at once (64 MiB): one query at a
# time at N = 16M photos, 256 queries at once up to N = 65k.
BLOCK_ELEMENTS = 1 << 24

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class Gallery:
    """N photo embeddings that queries are ranked against.

    embeddings: (N, D) float32, torch tensor (any device; results live on the same device) or numpy.
    photo_ids:  N distinct photo ids, in the order of the rows of `embeddings`.
    """

    def __init__(self, embeddings: torch.Tensor | np.ndarray, photo_ids: Sequence[str]):
        emb = torch.as_tensor(embeddings).detach()
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"gallery embeddings must have shape (N, D) with N, D >= 1, got {tuple(emb.shape)}")
        emb = emb.to(torch.float32).contiguous()
        if not bool(torch.isfinite(emb).all()):
            raise ValueError("gallery embeddings contain NaN or infinite values")
        ids = np.asarray(list(photo_ids), dtype=object)
        if ids.shape != (emb.shape[0],):
            raise ValueError(f"{len(ids)} photo ids for {emb.shape[0]} gallery embeddings")
        self._index = {pid: i for i, pid in enumerate(ids)}
        if len(self._index) != len(ids):
            dup = sorted(p for p, n in Counter(ids).items() if n > 1)
            raise ValueError(f"gallery photo ids must be distinct; repeated: {dup[:5]}")
        self.embeddings = emb
        self.photo_ids = ids
        self.index = None  # a sketch_env.gallery_index.GalleryIndex, see `use_index`
        # (D + 1, N): rows -2 e^T and ||e||^2, see the module docstring; filled in blocks so that a
        # gallery of millions of photos needs no temporary copy of itself.
        n, d = emb.shape
        self._affine = torch.empty(d + 1, n, dtype=torch.float32, device=emb.device)
        step = max(1, BLOCK_ELEMENTS // d)
        for start in range(0, n, step):
            block = emb[start : start + step]
            torch.mul(block.T, -2.0, out=self._affine[:d, start : start + step])
            self._affine[d, start : start + step] = (block * block).sum(1)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __contains__(self, photo_id) -> bool:
        return photo_id in self._index

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def index_of(self, photo_ids: Sequence[str]) -> torch.LongTensor:
        """Row index of each photo id, (len(photo_ids),) long on the gallery's device."""
        try:
            rows = [self._index[p] for p in photo_ids]
        except KeyError as e:
            raise ValueError(f"photo id {e.args[0]!r} is not in the gallery of {len(self)} photos") from None
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def rank(self, queries: torch.Tensor | np.ndarray, target_index: torch.Tensor | np.ndarray,
             extra: torch.Tensor | None = None) -> torch.LongTensor:
        """Rank (1 = best) of each query's target photo.

        queries:      (B, D) float embeddings.
        target_index: (B,) integer row of each query's true photo (see `index_of`).
        extra:        (B, N) added to each query's squared distances before ranking (local matching's
                      term, `sketch_env.local_match`), or None.
        Returns (B,) long: 1 + the number of photos strictly closer to the query than its target.
        """
        q = self._queries(queries)
        target = self._targets(target_index, q.shape[0])
        closer = [  # int32 counting is about twice as fast as the default int64 on CPU
            (scores < scores.gather(1, target[start : start + scores.shape[0], None])).sum(1, dtype=torch.int32)
            for start, scores in self._score_blocks(q, extra)
        ]
        return torch.cat(closer).long() + 1

    def percentile(self, ranks: torch.Tensor) -> torch.Tensor:
        """Ranking percentile (N - rank) / (N - 1) of (...) ranks, float32; 1.0 for a gallery of one."""
        return _percentile(torch.as_tensor(ranks, device=self.device), len(self))

    def use_index(self, index) -> None:
        """Let `topk` / `ranked_topk` take candidates from `index` (a `GalleryIndex` built for these
        embeddings, see `sketch_env.gallery_index`), or go back to exact search with None."""
        if index is not None and (index.n, index.dim) != (len(self), self.dim):
            raise ValueError(f"the index covers {index.n} x {index.dim} embeddings, the gallery is {len(self)} x {self.dim}")
        if index is not None and self.device.type != "cpu":
            raise ValueError(f"an index serves galleries on the CPU; this one is on {self.device}")
        self.index = index
        self._numpy_embeddings = self.embeddings.numpy() if index is not None else None
        self._numpy_norms = self._affine[self.dim].numpy() if index is not None else None

    def topk(self, queries: torch.Tensor | np.ndarray, k: int, exact: bool = False) -> tuple[torch.LongTensor, torch.Tensor]:
        """The k nearest photos of each query, nearest first.

        queries: (B, D). Returns indices (B, k) long and squared distances (B, k) float32.
        Equal distances come in no particular order. With an index attached (`use_index`) and not
        `exact`, the photos are the k nearest of the index's candidates (see `ranked_topk`).
        """
        indices, distances, _ = self.ranked_topk(queries, k, exact=exact)
        return indices, distances

    def ranked_topk(self, queries: torch.Tensor | np.ndarray, k: int,
                    extra: torch.Tensor | None = None, exact: bool = False) -> tuple[torch.LongTensor, torch.Tensor, torch.LongTensor]:
        """`topk` and the rank each of the k photos would have as the query's target: (B, k) long.

        Read from the same k scores: every photo strictly closer than the j-th is among the first j,
        so its rank is 1 + the number of the k scores below its own (ties in the query's favour),
        exactly what `rank` gives, without ranking the k photos against the whole gallery again.

        With an index attached and not `exact`, the index proposes `index.config.candidates` photos
        per query and they are re-ranked with exact distances: photos, distances and ranks are
        exact whenever the candidates hold the query's true k nearest (recall, measured by
        benchmarks/bench_gallery.py); a query with fewer than k candidates is searched exactly.
        extra (B, N): added to the squared distances (as in `rank`); the distances returned include it
        (searched exactly: an index knows nothing of the extra term).
        """
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (the gallery size), got {k}")
        q = self._queries(queries)
        if self.index is not None and not exact and extra is None and len(q):
            return self._reranked_topk(q, k)
        indices, distances, ranks = [], [], []
        for start, scores in self._score_blocks(q, extra):
            values, idx = torch.topk(scores, k, dim=1, largest=False, sorted=True)
            indices.append(idx)
            distances.append((values + (q[start : start + len(idx)] ** 2).sum(1, keepdim=True)).clamp_min_(0.0))
            ranks.append((values[:, None, :] < values[:, :, None]).sum(2) + 1)
        return torch.cat(indices), torch.cat(distances), torch.cat(ranks)

    def _reranked_topk(self, q: torch.Tensor, k: int):
        """`ranked_topk` over the index's candidates, scored as `_score_blocks` scores (||e||^2 - 2 q.e).

        In numpy, single-threaded: a few hundred candidates per query are too little work to share
        between threads (handing them out costs more than the work on a busy machine).
        """
        n_candidates = min(len(self), max(k, self.index.config.candidates))
        qn = q.numpy()
        rows = self.index.search(qn, n_candidates)  # (B, R), -1 where the index found fewer
        found = rows >= 0
        rows = np.where(found, rows, 0)
        vectors = self._numpy_embeddings[rows]  # (B, R, D)
        scores = self._numpy_norms[rows] - 2.0 * np.matmul(vectors, qn[:, :, None])[..., 0]
        scores[~found] = np.inf
        part = np.argpartition(scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(np.arange(k), (len(q), 1))
        values = np.take_along_axis(scores, part, 1)
        order = np.argsort(values, axis=1, kind="stable")
        values = np.take_along_axis(values, order, 1)
        indices = np.take_along_axis(np.take_along_axis(rows, part, 1), order, 1)
        ranks = (values[:, None, :] < values[:, :, None]).sum(2) + 1
        distances = np.maximum(values + (qn * qn).sum(1, keepdims=True), 0.0)
        indices, distances, ranks = torch.from_numpy(indices), torch.from_numpy(distances.astype(np.float32)), torch.from_numpy(ranks)
        short = torch.from_numpy(np.isinf(values).any(1))
        if bool(short.any()):  # fewer than k candidates: those queries get the exact answer
            exact_i, exact_d, exact_r = self.ranked_topk(q[short], k, exact=True)
            indices[short], distances[short], ranks[short] = exact_i, exact_d, exact_r
        return indices, distances, ranks.long()

    def _queries(self, queries) -> torch.Tensor:
        q = torch.as_tensor(queries, device=self.device).detach()
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (B, {self.dim}), got {tuple(q.shape)}")
        return q.to(torch.float32)

    def _targets(self, target_index, batch: int) -> torch.Tensor:
        target = torch.as_tensor(target_index, device=self.device)
        if target.shape != (batch,) or target.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"target_index must be ({batch},) integers, got {tuple(target.shape)} {target.dtype}")
        if batch:
            low, high = (int(v) for v in torch.aminmax(target))
            if low < 0 or high >= len(self):
                raise ValueError(f"target_index must be in [0, {len(self)}), got values in [{low}, {high}]")
        return target.long()

    def _score_blocks(self, q: torch.Tensor, extra: torch.Tensor | None = None):
        """Yield (start, scores) with scores (b, N) = ||e||^2 - 2 q.e (+ extra) for queries start..start+b.

        An empty batch still yields one (0, N) block, so callers get empty results of the right shape.
        """
        if extra is not None:
            extra = torch.as_tensor(extra, device=self.device)
            if extra.shape != (q.shape[0], len(self)):
                raise ValueError(f"extra must have shape ({q.shape[0]}, {len(self)}), got {tuple(extra.shape)}")
        block = max(1, BLOCK_ELEMENTS // len(self))
        ones = torch.ones(q.shape[0], 1, dtype=torch.float32, device=self.device)
        augmented = torch.cat([q, ones], 1)  # (B, D + 1)
        for start in range(0, max(q.shape[0], 1), block):
            scores = augmented[start : start + block] @ self._affine
            yield start, scores if extra is None else scores + extra[start : start + block].to(torch.float32)


def ranks_from_embeddings(photo_emb, photo_ids, sketch_emb, sketch_photo_ids) -> np.ndarray:
    """Ranks (S, L) of each sketch's photo among the gallery `photo_emb` (N, D), for queries (S, L, D).

    photo_ids (N,) names the gallery rows, sketch_photo_ids (S,) each sketch's true photo.
    """
    gallery = Gallery(torch.as_tensor(photo_emb), photo_ids)
    queries = torch.as_tensor(sketch_emb)
    s, levels, d = queries.shape
    target = gallery.index_of(list(sketch_photo_ids)).repeat_interleave(levels)
    return gallery.rank(queries.reshape(s * levels, d), target).view(s, levels).numpy()
