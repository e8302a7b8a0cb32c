"""The phase-1 embedding export: what every later stage reads instead of re-running the CNN.

Layout of ``RUN_DIR/embeddings/`` (written atomically: temp directory + rename)::

    photos.parquet    photo_id, split, embedding fixed_size_list<float32>[D], image_digest
    sketches.parquet  sketch_id, photo_id, split, embedding fixed_size_list<float32>[17 * D], points_digest
                      (row-major (level, dim): the embedding of each of the 17 partial sketches)
    meta.json         {"schema_version", "n_photos", "n_sketches", "dim", "n_levels", "meta": {...}}

Embeddings are L2-normalised float32 (the network's output). Every sketch's photo is in the export,
so a gallery built from `photo_embedding` always holds each sketch's target.

An export is only right for the strokes and photos it was computed from. The digest columns
(`sketch_env.data.sketch_digests` / `photo_digests` of what was embedded) let every reader check
that, item by item: `sketch_embeddings_for` and `gallery_for` look a data set's sketches and
photos up by id and re-embed the changed ones with a function the caller gives (the phase-1
network lives in `policies`), or stop with a DataError naming them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sketch_env.atomic import read_json_object, replace_dir
from sketch_env.data.store import DataError, PhotoSet, SketchSet, photo_digests, sketch_digests
from sketch_env.gallery import Gallery
from sketch_env.render import N_LEVELS

# What re-embeds changed items: (n, 17, D) embeddings of n sketches, (n, D) of n photos.
SketchEmbedder = Callable[[SketchSet], "np.ndarray | torch.Tensor"]
PhotoEmbedder = Callable[[PhotoSet], "np.ndarray | torch.Tensor"]

EXPORT_DIR = "embeddings"
SCHEMA_VERSION = 1
SKETCH_DIGEST, PHOTO_DIGEST = "points_digest", "image_digest"


@dataclass
class EmbeddingExport:
    """Photo embeddings (N, D) and the embeddings of every sketch at each completion level (S, 17, D).

    String columns are numpy object arrays; arrays are coerced on construction and checked for
    consistent shapes, distinct ids, and sketches whose photo is missing (ValueError).
    sketch_digest (S,) / photo_digest (N,): `sketch_digests` / `photo_digests` of what was embedded.
    """

    photo_id: np.ndarray
    photo_split: np.ndarray
    photo_embedding: np.ndarray
    sketch_id: np.ndarray
    sketch_photo_id: np.ndarray
    sketch_split: np.ndarray
    sketch_embedding: np.ndarray
    sketch_digest: np.ndarray
    photo_digest: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.photo_id = np.asarray(self.photo_id, dtype=object)
        self.photo_split = np.asarray(self.photo_split, dtype=object)
        self.photo_embedding = np.asarray(self.photo_embedding, dtype=np.float32)
        self.sketch_id = np.asarray(self.sketch_id, dtype=object)
        self.sketch_photo_id = np.asarray(self.sketch_photo_id, dtype=object)
        self.sketch_split = np.asarray(self.sketch_split, dtype=object)
        self.sketch_embedding = np.asarray(self.sketch_embedding, dtype=np.float32)
        problem = _photo_problem(self.photo_id, self.photo_split, self.photo_embedding) or _sketch_problem(
            self.sketch_id, self.sketch_photo_id, self.sketch_split, self.sketch_embedding, self.photo_id, self.dim
        )
        if problem:
            raise ValueError(problem)
        for name, n in (("sketch_digest", len(self.sketch_id)), ("photo_digest", len(self.photo_id))):
            setattr(self, name, np.asarray(getattr(self, name), dtype=object))
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {getattr(self, name).shape}")

    @property
    def dim(self) -> int:
        return self.photo_embedding.shape[1]

    def photo_index(self) -> dict[str, int]:
        """photo id -> row of `photo_embedding`."""
        return {p: i for i, p in enumerate(self.photo_id)}

    def sketch_index(self) -> dict[str, int]:
        """sketch id -> row of `sketch_embedding`."""
        return {s: i for i, s in enumerate(self.sketch_id)}

    def subset_sketches(self, mask_or_index) -> EmbeddingExport:
        """The sketches at a boolean mask or integer indices (in that order); all photos are kept."""
        index = _as_index(mask_or_index, len(self.sketch_id), "sketch")
        return EmbeddingExport(
            self.photo_id,
            self.photo_split,
            self.photo_embedding,
            self.sketch_id[index],
            self.sketch_photo_id[index],
            self.sketch_split[index],
            self.sketch_embedding[index],
            self.sketch_digest[index],
            self.photo_digest,
            dict(self.meta),
        )

    def subset_photos(self, mask_or_index) -> EmbeddingExport:
        """The photos at a boolean mask or integer indices, and only the sketches of those photos."""
        index = _as_index(mask_or_index, len(self.photo_id), "photo")
        kept = np.isin(self.sketch_photo_id, self.photo_id[index])
        return EmbeddingExport(
            self.photo_id[index],
            self.photo_split[index],
            self.photo_embedding[index],
            self.sketch_id[kept],
            self.sketch_photo_id[kept],
            self.sketch_split[kept],
            self.sketch_embedding[kept],
            self.sketch_digest[kept],
            self.photo_digest[index],
            dict(self.meta),
        )


def save_embedding_export(run_dir: str | Path, export: EmbeddingExport) -> Path:
    """Write `export` to run_dir/embeddings/ atomically; returns that directory."""
    out = Path(run_dir) / EXPORT_DIR
    n, d = export.photo_embedding.shape
    s = export.sketch_embedding.shape[0]
    photos = {
        "photo_id": pa.array(export.photo_id, pa.string()),
        "split": pa.array(export.photo_split, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(export.photo_embedding.reshape(-1), d),
        PHOTO_DIGEST: pa.array(export.photo_digest, pa.string()),
    }
    sketches = {
        "sketch_id": pa.array(export.sketch_id, pa.string()),
        "photo_id": pa.array(export.sketch_photo_id, pa.string()),
        "split": pa.array(export.sketch_split, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(export.sketch_embedding.reshape(-1), N_LEVELS * d),
        SKETCH_DIGEST: pa.array(export.sketch_digest, pa.string()),
    }
    meta = {
        "schema_version": SCHEMA_VERSION,
        "n_photos": n,
        "n_sketches": s,
        "dim": d,
        "n_levels": N_LEVELS,
        "meta": export.meta,
    }
    meta_text = json.dumps(meta, indent=2) + "\n"  # before the temp dir: a non-JSON meta fails cleanly

    def write(tmp: Path) -> None:
        # Dictionary-encoding the float embeddings and digests only costs time (they hardly repeat).
        pq.write_table(pa.table(photos), tmp / "photos.parquet", use_dictionary=["photo_id", "split"])
        pq.write_table(pa.table(sketches), tmp / "sketches.parquet", use_dictionary=["sketch_id", "photo_id", "split"])
        (tmp / "meta.json").write_text(meta_text)

    return replace_dir(out, write)


def load_embedding_export(run_dir: str | Path) -> EmbeddingExport:
    """Read run_dir/embeddings/ (as written by `save_embedding_export`).

    Raises DataError naming the file when a file is missing, unreadable, or disagrees with the others.
    """
    folder = Path(run_dir) / EXPORT_DIR
    meta_file = folder / "meta.json"
    meta = read_json_object(meta_file, f"{meta_file}: missing; run `darp pretrain` to export embeddings into {run_dir}")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{meta_file}: schema_version {meta.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    for key, least in (("n_photos", 0), ("n_sketches", 0), ("dim", 1), ("n_levels", 1)):
        if not isinstance(meta.get(key), int) or meta[key] < least:
            raise DataError(f"{meta_file}: {key!r} must be an integer >= {least}, got {meta.get(key)!r}")
    if not isinstance(meta.get("meta"), dict):
        raise DataError(f"{meta_file}: 'meta' must be an object, got {meta.get('meta')!r}")
    if meta["n_levels"] != N_LEVELS:
        raise DataError(f"{meta_file}: n_levels {meta['n_levels']}, this code uses {N_LEVELS} completion levels")
    d = meta["dim"]
    photo_file, sketch_file = folder / "photos.parquet", folder / "sketches.parquet"
    photos = _read_table(photo_file, ("photo_id", "split", PHOTO_DIGEST), d, meta["n_photos"])
    sketches = _read_table(sketch_file, ("sketch_id", "photo_id", "split", SKETCH_DIGEST), N_LEVELS * d, meta["n_sketches"])
    n, s = meta["n_photos"], meta["n_sketches"]
    photo_embedding = photos["embedding"].reshape(n, d)
    problem = _photo_problem(photos["photo_id"], photos["split"], photo_embedding)
    if problem:
        raise DataError(f"{photo_file}: {problem}")
    try:
        return EmbeddingExport(
            photo_id=photos["photo_id"],
            photo_split=photos["split"],
            photo_embedding=photo_embedding,
            sketch_id=sketches["sketch_id"],
            sketch_photo_id=sketches["photo_id"],
            sketch_split=sketches["split"],
            sketch_embedding=sketches["embedding"].reshape(s, N_LEVELS, d),
            meta=meta["meta"],
            sketch_digest=sketches[SKETCH_DIGEST],
            photo_digest=photos[PHOTO_DIGEST],
        )
    except ValueError as e:  # the photos are checked above, so the sketches disagree with them
        raise DataError(f"{sketch_file}: {e}") from None


def sketch_embeddings_for(
    export: EmbeddingExport,
    sketches: SketchSet,
    export_dir: str | Path,
    data_dir: str | Path | None = None,
    embed: SketchEmbedder | None = None,
) -> torch.Tensor:
    """(S, 17, D) float32 phase-1 embeddings of `sketches`, looked up in `export` by id and checked
    against their strokes.

    export_dir: the run directory the export came from (named in errors).
    data_dir:   the data set the sketches were read from (named in errors; None for sketches made or
                changed in memory).
    embed:      re-embeds the sketches whose strokes differ from what the export embedded
                (e.g. `functools.partial(policies.phase1.embedding.embed_sketches, PHASE1_RUN)`); without
                it they are a DataError that names them.
    DataError as well when a sketch is not in the export, or the export pairs it with another photo.
    """
    rows = _rows(export.sketch_index(), sketches.sketch_id, "sketch", export_dir)
    paired = export.sketch_photo_id[rows]
    mismatch = np.flatnonzero(paired != sketches.photo_id)
    if len(mismatch):
        i = mismatch[0]
        raise DataError(
            f"{export_dir}: the embedding export pairs sketch {sketches.sketch_id[i]!r} with photo {paired[i]!r} "
            f"but {data_dir or 'the data'} pairs it with {sketches.photo_id[i]!r} ({len(mismatch)} such sketches): "
            "was the export made from another data set?"
        )
    out = torch.from_numpy(export.sketch_embedding[rows])
    changed = np.flatnonzero(export.sketch_digest[rows] != sketch_digests(sketches))
    if len(changed):
        if embed is None:
            raise DataError(_stale(export_dir, data_dir, "sketch", sketches.sketch_id[changed]))
        out[changed] = _embedded(embed(sketches.subset(changed)), (len(changed), N_LEVELS, export.dim), "sketch")
    return out


def gallery_for(
    export: EmbeddingExport,
    photos: PhotoSet,
    export_dir: str | Path,
    data_dir: str | Path | None = None,
    embed: PhotoEmbedder | None = None,
) -> Gallery:
    """The gallery of `photos` (in their order), embeddings looked up in `export` by id and checked
    against the photos' bytes as `sketch_embeddings_for` checks sketches (`embed` re-embeds changed
    photos: (n, D)). DataError naming the photos that are missing, or changed without `embed`."""
    rows = _rows(export.photo_index(), photos.photo_id, "photo", export_dir)
    embeddings = torch.from_numpy(export.photo_embedding[rows])
    changed = np.flatnonzero(export.photo_digest[rows] != photo_digests(photos))
    if len(changed):
        if embed is None:
            raise DataError(_stale(export_dir, data_dir, "photo", photos.photo_id[changed]))
        embeddings[changed] = _embedded(embed(photos.subset(changed)), (len(changed), export.dim), "photo")
    return Gallery(embeddings, photos.photo_id)


def _rows(index: dict[str, int], wanted, what: str, export_dir) -> np.ndarray:
    """Row of each id of `wanted` in the export (`index`: id -> row); DataError naming the missing ones."""
    missing = [key for key in wanted if key not in index]
    if missing:
        raise DataError(
            f"{export_dir}: the embedding export has no {what} embedding for {len(missing)} {what}(s), "
            f"e.g. {missing[:3]}; export the embeddings again from this data set"
        )
    return np.array([index[key] for key in wanted], np.int64)


def _stale(export_dir, data_dir, what: str, ids) -> str:
    where = data_dir or "the data"
    fix = (
        f"Export them again (`darp pretrain --data {data_dir or 'DATA'} --run-dir {export_dir}`: a finished run only "
        f"re-exports), or evaluate with `darp evaluate`, which re-embeds changed {what}s with the phase-1 network."
    )
    content = "other strokes" if what == "sketch" else "another image"
    return (
        f"{export_dir}: {len(ids)} {what}(s) of {where} have {content} than the embedding export was "
        f"computed from (e.g. {list(ids[:3])}); their old embeddings would rank them wrongly. {fix}"
    )


def _embedded(values, shape: tuple[int, ...], what: str) -> torch.Tensor:
    out = torch.as_tensor(np.asarray(values, np.float32) if not isinstance(values, torch.Tensor) else values).float()
    if tuple(out.shape) != shape:
        raise ValueError(f"re-embedding {what}s gave shape {tuple(out.shape)}, expected {shape}")
    return out


def _read_table(path: Path, string_columns: tuple[str, ...], width: int, n_rows: int) -> dict[str, np.ndarray]:
    """The string columns (object arrays) and the flat float32 embedding of one Parquet file, checked."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet table ({e})") from None
    missing = [c for c in (*string_columns, "embedding") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; has {table.column_names}")
    if table.num_rows != n_rows:
        raise DataError(f"{path}: {table.num_rows} rows, meta.json says {n_rows}")
    out = {}
    for name in string_columns:
        column = table.column(name)
        if not pa.types.is_string(column.type) or column.null_count:
            raise DataError(f"{path}: column {name!r} must be non-null strings, got {column.type} with {column.null_count} nulls")
        out[name] = column.to_numpy().astype(object)
    embedding = table.column("embedding")
    want = pa.list_(pa.float32(), width)
    if embedding.type != want or embedding.null_count:
        raise DataError(
            f"{path}: column 'embedding' must be non-null {want} (dim from meta.json), "
            f"got {embedding.type} with {embedding.null_count} nulls"
        )
    flat = embedding.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if flat.size != n_rows * width:
        raise DataError(f"{path}: column 'embedding' holds {flat.size} values, expected {n_rows} x {width}")
    out["embedding"] = np.asarray(flat, np.float32)
    return out


def _as_index(mask_or_index, n: int, what: str) -> np.ndarray:
    """Integer indices from a boolean mask of length n or from integer indices."""
    index = np.asarray(mask_or_index)
    if index.dtype == bool:
        if index.shape != (n,):
            raise ValueError(f"{what} mask must have shape ({n},), got {index.shape}")
        return np.flatnonzero(index)
    if index.size == 0:
        return np.zeros(0, np.int64)
    if index.ndim != 1 or index.dtype.kind not in "iu":
        raise ValueError(f"{what} index must be a boolean mask or 1-d integers, got {index.dtype} {index.shape}")
    return index.astype(np.int64)


def _repeated(ids: np.ndarray) -> list:
    return sorted(k for k, c in Counter(ids).items() if c > 1)


def _photo_problem(photo_id: np.ndarray, photo_split: np.ndarray, embedding: np.ndarray) -> str | None:
    """What is wrong with the photo arrays, or None."""
    if embedding.ndim != 2 or embedding.shape[1] == 0:
        return f"photo_embedding must have shape (N, D) with D >= 1, got {embedding.shape}"
    n = embedding.shape[0]
    if photo_id.shape != (n,) or photo_split.shape != (n,):
        return f"photo_id {photo_id.shape} and photo_split {photo_split.shape} must have shape ({n},) like photo_embedding"
    repeated = _repeated(photo_id)
    if repeated:
        return f"photo ids must be distinct; repeated: {repeated[:5]}"
    return None


def _sketch_problem(
    sketch_id: np.ndarray,
    sketch_photo_id: np.ndarray,
    sketch_split: np.ndarray,
    embedding: np.ndarray,
    photo_id: np.ndarray,
    dim: int,
) -> str | None:
    """What is wrong with the sketch arrays, given valid photo ids and embedding size `dim`, or None."""
    if embedding.ndim != 3 or embedding.shape[1:] != (N_LEVELS, dim):
        return f"sketch_embedding must have shape (S, {N_LEVELS}, {dim}) (D of the photos), got {embedding.shape}"
    s = embedding.shape[0]
    for name, column in (("sketch_id", sketch_id), ("sketch_photo_id", sketch_photo_id), ("sketch_split", sketch_split)):
        if column.shape != (s,):
            return f"{name} must have shape ({s},) like sketch_embedding, got {column.shape}"
    repeated = _repeated(sketch_id)
    if repeated:
        return f"sketch ids must be distinct; repeated: {repeated[:5]}"
    unknown = sorted(set(sketch_photo_id) - set(photo_id))
    if unknown:
        return f"{len(unknown)} photo ids of sketches are not among the exported photos, e.g. {unknown[:3]}"
    return None
