"""Approximate nearest-neighbour index for large galleries (faiss), behind `sketch_env.gallery.Gallery`.

Exact search reads every photo for every query: about 9 ms per query at 1M photos and 100 ms at
10M on 2 cores. Above `EXACT_UP_TO` photos (the crossover measured by benchmarks/bench_gallery.py)
a `GalleryIndex` proposes `candidates` photos per query and `Gallery.topk` re-ranks them exactly, so
the k photos served and their distances are exact whenever the candidates hold them (recall@10
against exact search is what the benchmark measures). `Gallery.rank`, which every metric and reward
reads, never uses the index.

Kinds (`IndexConfig.kind`), measured at 1M and 10M photos in the README:
- "ivfpq" (the default): an inverted file of `nlist` k-means cells, each photo stored as a product-
  quantised code of `pq_m` bytes; `nprobe` cells are scanned per query. 16-24 bytes a photo, so it
  adds under 10% to the gallery's own memory; the exact re-rank reads the candidates' embeddings.
- "ivfflat": the same inverted file storing full vectors (a second copy of the gallery).
- "hnsw": a graph over full vectors (`hnsw_m` links a photo; a second copy plus the graph, and a
  build far slower than k-means).

Index files are faiss's own binary format, read by faiss's reader (no pickle), in a directory
written atomically (`save_index`: index.faiss + index.json). index.json records the gallery the
index was built for (size, dimension and a digest of its embeddings): `load_index` refuses an index
of another gallery with a DataError naming the file, so a stale index never serves wrong photos.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sketch_env.atomic import read_json_object, replace_dir
from sketch_env.errors import DataError

# Galleries up to this many photos are searched exactly even when an index is offered: below it the
# exact pass is as fast as the index (benchmarks/bench_gallery.py --ann --sizes 50000 100000 200000 500000,
# README "Large galleries").
EXACT_UP_TO = 200_000

IndexKind = Literal["ivfpq", "ivfflat", "hnsw"]
INDEX_FILE, INDEX_META = "index.faiss", "index.json"
INDEX_SCHEMA = 1
_ADD_BLOCK = 1 << 18  # photos added per call: bounds the temporary residuals faiss computes


@dataclass(frozen=True)
class IndexConfig:
    """How an approximate index is built and searched.

    nlist 0: chosen from the gallery size (`default_nlist`). train_size 0: 64 photos per cell (at
    most the gallery). candidates: photos per query re-ranked exactly by the gallery (at least k).
    """

    kind: IndexKind = "ivfpq"
    nlist: int = 0
    nprobe: int = 64
    pq_m: int = 16
    candidates: int = 256
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 128
    train_size: int = 0
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.kind not in ("ivfpq", "ivfflat", "hnsw"):
            problems.append(f"kind must be ivfpq, ivfflat or hnsw, got {self.kind!r}")
        for name in ("nprobe", "pq_m", "candidates", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("nlist", "train_size"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:
            raise ValueError("index config: " + "; ".join(problems))

    def describe(self, n: int) -> str:
        """The faiss-style name of this index for a gallery of n photos (what tables print)."""
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m},Flat efSearch={self.ef_search}"
        codes = f"PQ{self.pq_m}" if self.kind == "ivfpq" else "Flat"
        return f"IVF{self.nlist or default_nlist(n)},{codes} nprobe={self.nprobe}"


def default_nlist(n: int) -> int:
    """Inverted-file cells for n photos: about 4 sqrt(n) (the usual balance between scanning cells and
    comparing a query with every centroid), a power of two in [16, 4096]. Capped at 4096 because the
    build assigns every photo to a cell (n x nlist x D multiply-adds: minutes on 2 cores at 10M with
    4096, four times that with 16384), while scanning 48 cells of 2.4k codes at 10M photos stays
    far inside the latency budget (README, "Large galleries")."""
    return int(min(4096, max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


def embeddings_digest(embeddings: np.ndarray) -> str:
    """blake2b of the (N, D) float32 embeddings' bytes: tells whether an index was built for them."""
    emb = np.ascontiguousarray(embeddings, np.float32)
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(emb.shape, np.int64).tobytes())
    flat = emb.reshape(-1)
    step = 1 << 24
    for start in range(0, flat.size, step):
        h.update(flat[start : start + step].tobytes())
    return h.hexdigest()


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency of the project
        raise DataError("approximate search needs faiss-cpu (pip install faiss-cpu); it is a dependency of darp-sbir") from None
    return faiss


class GalleryIndex:
    """A faiss index over a gallery's embeddings: `search` proposes candidate rows for exact re-ranking.

    Build with `build_index`, read with `load_index`. n and dim are the gallery's; digest is
    `embeddings_digest` of the embeddings it was built from.
    """

    def __init__(self, index, config: IndexConfig, n: int, dim: int, digest: str, build_s: float = 0.0):
        self.index = index
        self.config = config
        self.n, self.dim, self.digest = n, dim, digest
        self.build_s = build_s
        self._set_search_params()

    def _set_search_params(self) -> None:
        faiss = _faiss()
        if self.config.kind == "hnsw":
            self.index.hnsw.efSearch = self.config.ef_search
        else:
            faiss.extract_index_ivf(self.index).nprobe = self.config.nprobe

    def search(self, queries: np.ndarray, n_candidates: int) -> np.ndarray:
        """(B, n_candidates) int64 gallery rows proposed for each query (B, D), best guess first;
        -1 where the index found fewer."""
        q = np.ascontiguousarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (B, {self.dim}), got {q.shape}")
        if self.config.kind == "hnsw" and self.index.hnsw.efSearch < n_candidates:
            self.index.hnsw.efSearch = n_candidates  # HNSW returns at most efSearch results
        _, rows = self.index.search(q, n_candidates)
        return rows

    def memory_bytes(self) -> int:
        """Bytes the index holds (its serialised size: codes or vectors, ids, centroids, graph)."""
        return int(_faiss().serialize_index(self.index).size)

    def describe(self) -> str:
        return self.config.describe(self.n)


def build_index(embeddings: np.ndarray, config: IndexConfig = IndexConfig(), threads: int | None = None,
                log=None) -> GalleryIndex:
    """Build the index `config` describes over (N, D) float32 embeddings (rows = gallery rows).

    IVF kinds train k-means (and the product quantiser) on `train_size` photos drawn with `seed`,
    then add every photo in blocks. threads: faiss's OpenMP threads (None: leave as is).
    """
    faiss = _faiss()
    emb = np.ascontiguousarray(embeddings, np.float32)
    n, d = emb.shape
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_L2)
        index.hnsw.efConstruction = config.ef_construction
    else:
        nlist = min(config.nlist or default_nlist(n), n)
        if config.kind == "ivfpq" and d % config.pq_m:
            raise ValueError(f"pq_m ({config.pq_m}) must divide the embedding dimension {d}")
        config = dataclasses.replace(config, nlist=nlist)
        codes = f"PQ{config.pq_m}" if config.kind == "ivfpq" else "Flat"
        index = faiss.index_factory(d, f"IVF{nlist},{codes}", faiss.METRIC_L2)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = config.seed
        ivf.cp.max_points_per_centroid = 1 << 30  # we choose the training sample ourselves
        train_n = min(n, config.train_size or 64 * nlist)
        sample = np.sort(np.random.default_rng(config.seed).choice(n, train_n, replace=False)) if train_n < n else slice(None)
        if log:
            log(f"training {config.describe(n)} on {train_n} of {n} photos")
        index.train(np.ascontiguousarray(emb[sample]))
    for start in range(0, n, _ADD_BLOCK):
        index.add(emb[start : start + _ADD_BLOCK])
        if log and n > _ADD_BLOCK:
            log(f"  added {min(start + _ADD_BLOCK, n)} / {n} photos")
    return GalleryIndex(index, config, n, d, embeddings_digest(emb), time.perf_counter() - started)


def save_index(directory: str | Path, index: GalleryIndex) -> Path:
    """Write `index` to directory/ (index.faiss + index.json) atomically; returns the directory."""
    faiss = _faiss()
    meta = {
        "schema_version": INDEX_SCHEMA,
        "n": index.n,
        "dim": index.dim,
        "embeddings_digest": index.digest,
        "config": dataclasses.asdict(index.config),
        "build_s": round(index.build_s, 2),
        "faiss_version": faiss.__version__,
    }

    def write(tmp: Path) -> None:
        faiss.write_index(index.index, str(tmp / INDEX_FILE))
        (tmp / INDEX_META).write_text(json.dumps(meta, indent=2) + "\n")

    return replace_dir(directory, write)


def load_index(directory: str | Path, embeddings: np.ndarray | None = None, digest: str | None = None) -> GalleryIndex:
    """The index saved in `directory`, checked against the gallery it will serve.

    embeddings (or their `embeddings_digest`, cheaper when known): the gallery's; an index built for
    other embeddings is a DataError naming the directory, as are missing or unreadable files.
    """
    faiss = _faiss()
    folder = Path(directory)
    meta_file, index_file = folder / INDEX_META, folder / INDEX_FILE
    meta = read_json_object(meta_file, f"{meta_file}: missing; no index was saved in {folder}")
    if meta.get("schema_version") != INDEX_SCHEMA:
        raise DataError(f"{meta_file}: schema_version {meta.get('schema_version')!r}, this code reads {INDEX_SCHEMA}")
    try:
        config = IndexConfig(**meta["config"])
        n, dim, stored = int(meta["n"]), int(meta["dim"]), str(meta["embeddings_digest"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{meta_file}: not an index description ({e})") from None
    if embeddings is not None:
        if tuple(np.shape(embeddings)) != (n, dim):
            raise DataError(f"{folder}: the index was built for {n} x {dim} embeddings, the gallery has "
                            f"{'x'.join(map(str, np.shape(embeddings)))}; build it again")
        digest = embeddings_digest(embeddings)
    if digest is not None and digest != stored:
        raise DataError(f"{folder}: the index was built for other embeddings than the gallery's; build it again")
    if not index_file.is_file():
        raise DataError(f"{index_file}: missing")
    try:
        index = faiss.read_index(str(index_file))
    except RuntimeError as e:
        raise DataError(f"{index_file}: not a readable faiss index ({str(e).splitlines()[0]})") from None
    if index.ntotal != n or index.d != dim:
        raise DataError(f"{index_file}: holds {index.ntotal} x {index.d} vectors, {meta_file} says {n} x {dim}")
    return GalleryIndex(index, config, n, dim, stored, float(meta.get("build_s", 0.0)))
