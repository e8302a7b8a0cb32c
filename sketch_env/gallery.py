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
        # (D + 1, N): rows -2 e^T and ||e||^2, see the module docstring.
        self._affine = torch.cat([-2.0 * emb.T, (emb * emb).sum(1)[None]]).contiguous()

    def __len__(self) -> int:
        return self.embeddings.shape[0]

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

    def topk(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[torch.LongTensor, torch.Tensor]:
        """The k nearest photos of each query, nearest first.

        queries: (B, D). Returns indices (B, k) long and squared distances (B, k) float32.
        Equal distances come in no particular order.
        """
        indices, distances, _ = self.ranked_topk(queries, k)
        return indices, distances

    def ranked_topk(self, queries: torch.Tensor | np.ndarray, k: int,
                    extra: torch.Tensor | None = None) -> tuple[torch.LongTensor, torch.Tensor, torch.LongTensor]:
        """`topk` and the rank each of the k photos would have as the query's target: (B, k) long.

        Read from the same k scores: every photo strictly closer than the j-th is among the first j,
        so its rank is 1 + the number of the k scores below its own (ties in the query's favour),
        exactly what `rank` gives, without ranking the k photos against the whole gallery again.
        extra (B, N): added to the squared distances (as in `rank`); the distances returned include it.
        """
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (the gallery size), got {k}")
        q = self._queries(queries)
        indices, distances, ranks = [], [], []
        for start, scores in self._score_blocks(q, extra):
            values, idx = torch.topk(scores, k, dim=1, largest=False, sorted=True)
            indices.append(idx)
            distances.append((values + (q[start : start + len(idx)] ** 2).sum(1, keepdim=True)).clamp_min_(0.0))
            ranks.append((values[:, None, :] < values[:, :, None]).sum(2) + 1)
        return torch.cat(indices), torch.cat(distances), torch.cat(ranks)

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
