"""The phase-1 embedding export: what every later stage reads instead of re-running the CNN.

Layout of ``RUN_DIR/embeddings/`` (written atomically: temp directory + rename)::

    photos.parquet    photo_id, split, embedding fixed_size_list<float32>[D]
    sketches.parquet  sketch_id, photo_id, split, embedding fixed_size_list<float32>[17 * D]
                      (row-major (level, dim): the embedding of each of the 17 partial sketches)
    meta.json         {"schema_version", "n_photos", "n_sketches", "dim", "n_levels", "meta": {...}}

Embeddings are L2-normalised float32 (the network's output). Every sketch's photo is in the export,
so a gallery built from `photo_embedding` always holds each sketch's target.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sketch_env.atomic import replace_dir
from sketch_env.data.store import DataError
from sketch_env.render import N_LEVELS

EXPORT_DIR = "embeddings"
SCHEMA_VERSION = 1


@dataclass
class EmbeddingExport:
    """Photo embeddings (N, D) and the embeddings of every sketch at each completion level (S, 17, D).

    String columns are numpy object arrays; arrays are coerced on construction and checked for
    consistent shapes, distinct ids, and sketches whose photo is missing (ValueError).
    """

    photo_id: np.ndarray
    photo_split: np.ndarray
    photo_embedding: np.ndarray
    sketch_id: np.ndarray
    sketch_photo_id: np.ndarray
    sketch_split: np.ndarray
    sketch_embedding: np.ndarray
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
            dict(self.meta),
        )


def save_embedding_export(run_dir: str | Path, export: EmbeddingExport) -> Path:
    """Write `export` to run_dir/embeddings/ atomically; returns that directory."""
    out = Path(run_dir) / EXPORT_DIR
    n, d = export.photo_embedding.shape
    s = export.sketch_embedding.shape[0]
    photos = pa.table(
        {
            "photo_id": pa.array(export.photo_id, pa.string()),
            "split": pa.array(export.photo_split, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(export.photo_embedding.reshape(-1), d),
        }
    )
    sketches = pa.table(
        {
            "sketch_id": pa.array(export.sketch_id, pa.string()),
            "photo_id": pa.array(export.sketch_photo_id, pa.string()),
            "split": pa.array(export.sketch_split, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(export.sketch_embedding.reshape(-1), N_LEVELS * d),
        }
    )
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
        # Dictionary-encoding the float embeddings only costs time (they hardly repeat).
        pq.write_table(photos, tmp / "photos.parquet", use_dictionary=["photo_id", "split"])
        pq.write_table(sketches, tmp / "sketches.parquet", use_dictionary=["sketch_id", "photo_id", "split"])
        (tmp / "meta.json").write_text(meta_text)

    return replace_dir(out, write)


def load_embedding_export(run_dir: str | Path) -> EmbeddingExport:
    """Read run_dir/embeddings/ (as written by `save_embedding_export`).

    Raises DataError naming the file when a file is missing, unreadable, or disagrees with the others.
    """
    folder = Path(run_dir) / EXPORT_DIR
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        raise DataError(f"{meta_file}: missing; run `darp pretrain` to export embeddings into {run_dir}")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        found = meta.get("schema_version") if isinstance(meta, dict) else meta
        raise DataError(f"{meta_file}: schema_version {found!r}, this code reads {SCHEMA_VERSION}")
    for key, least in (("n_photos", 0), ("n_sketches", 0), ("dim", 1), ("n_levels", 1)):
        if not isinstance(meta.get(key), int) or meta[key] < least:
            raise DataError(f"{meta_file}: {key!r} must be an integer >= {least}, got {meta.get(key)!r}")
    if not isinstance(meta.get("meta"), dict):
        raise DataError(f"{meta_file}: 'meta' must be an object, got {meta.get('meta')!r}")
    if meta["n_levels"] != N_LEVELS:
        raise DataError(f"{meta_file}: n_levels {meta['n_levels']}, this code uses {N_LEVELS} completion levels")
    d = meta["dim"]
    photo_file, sketch_file = folder / "photos.parquet", folder / "sketches.parquet"
    photos = _read_table(photo_file, ("photo_id", "split"), d, meta["n_photos"])
    sketches = _read_table(sketch_file, ("sketch_id", "photo_id", "split"), N_LEVELS * d, meta["n_sketches"])
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
        )
    except ValueError as e:  # the photos are checked above, so the sketches disagree with them
        raise DataError(f"{sketch_file}: {e}") from None


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
