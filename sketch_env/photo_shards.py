"""Photo embeddings as Parquet shards: a gallery embedded apart from any data set (`darp embed-photos`).

Layout of a shards directory (written whole and atomically: `sketch_env.atomic.replace_dir`)::

    photo_shards.json           {"schema_version", "n_photos", "dim", "shards": [{"file", "rows"}],
                                 "network": {"run", "digest", "config"}, "source": {"kind", "path"}, ...}
    shards/part-00000.parquet   photo_id, embedding fixed_size_list<float32>[D], image_digest, source
    index/                      optional approximate index (sketch_env.gallery_index: index.faiss + index.json)

`image_digest` is what the phase-1 export records (`sketch_env.data.photo_digests`: blake2b of the
encoded image bytes), so a photo that is also in a data set can be checked against it; `source`
names where the image was read (a path relative to the source directory, or a Parquet row).
"network" names the phase-1 run that embedded the photos and the digest of its `embedding_net.pt`:
readers compare it with the network that embeds their queries (`check_network`), since embeddings
of two networks cannot be compared.

`gallery_from_shards` is how `darp evaluate --gallery` and `darp serve --gallery` read them: the
gallery is every photo of the shards; the photos of a data set that the shards hold are checked
against its bytes (a changed one is a DataError naming it), and its sketches' photos must be there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sketch_env.atomic import OutputKind, read_json_object
from sketch_env.errors import DataError

SHARDS_META = "photo_shards.json"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
SCHEMA_VERSION = 1
NET_FILE = "embedding_net.pt"  # policies.phase1.embedding.NET_FILE (sketch_env imports nothing from policies)
SHARDS_KIND = OutputKind("photo-embedding shards", (SHARDS_META,), frozenset({SHARDS_META, SHARDS_DIR, INDEX_DIR}))


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def shard_table(photo_id, embedding: np.ndarray, image_digest, source) -> pa.Table:
    """One shard's table: ids, (n, D) float32 embeddings, digests, sources."""
    emb = np.ascontiguousarray(embedding, np.float32)
    return pa.table({
        "photo_id": pa.array(list(photo_id), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
        "image_digest": pa.array(list(image_digest), pa.string()),
        "source": pa.array(list(source), pa.string()),
    })


@dataclass
class PhotoShards:
    """Every photo of a shards directory: ids (N,) object, embeddings (N, D) float32, digests and sources."""

    path: Path
    photo_id: np.ndarray
    embedding: np.ndarray
    image_digest: np.ndarray
    source: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.photo_id)

    @property
    def dim(self) -> int:
        return self.embedding.shape[1]

    def check_network(self, run_dir: str | Path) -> None:
        """DataError unless these photos were embedded by the phase-1 network of `run_dir`."""
        ours = file_digest(Path(run_dir) / NET_FILE)
        theirs = self.meta.get("network", {}).get("digest")
        if ours != theirs:
            raise DataError(
                f"{self.path}: embedded by the phase-1 network of {self.meta.get('network', {}).get('run')!r}, not by "
                f"{run_dir}'s ({NET_FILE} differs); queries and photos of two networks cannot be compared. "
                f"Embed the photos again: darp embed-photos --embedding {run_dir} ..."
            )


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes; DataError naming it when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return h.hexdigest()


def load_photo_shards_meta(directory: str | Path) -> dict:
    """photo_shards.json of a shards directory (DataError naming it when missing or of another schema)."""
    folder = Path(directory)
    meta_file = folder / SHARDS_META
    meta = read_json_object(meta_file, f"{folder}: no {SHARDS_META}; not photo embeddings written by `darp embed-photos`")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{meta_file}: schema_version {meta.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    return meta


def load_photo_shards(directory: str | Path) -> PhotoShards:
    """Read a shards directory written by `darp embed-photos`, checked (DataError naming the file)."""
    folder = Path(directory)
    meta_file = folder / SHARDS_META
    meta = load_photo_shards_meta(folder)
    try:
        n, dim = int(meta["n_photos"]), int(meta["dim"])
        shards = [(str(s["file"]), int(s["rows"])) for s in meta["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{meta_file}: not a shards description ({e})") from None
    if sum(rows for _, rows in shards) != n or dim < 1:
        raise DataError(f"{meta_file}: the shards' rows add up to {sum(r for _, r in shards)}, n_photos says {n}")
    embedding = np.empty((n, dim), np.float32)
    ids, digests, sources = [], [], []
    start = 0
    want = pa.list_(pa.float32(), dim)
    for name, rows in shards:
        path = folder / SHARDS_DIR / name
        if Path(name).name != name or not path.is_file():
            raise DataError(f"{path}: missing (listed in {meta_file})")
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read Parquet table ({e})") from None
        missing = [c for c in ("photo_id", "embedding", "image_digest", "source") if c not in table.column_names]
        if missing or table.num_rows != rows:
            raise DataError(f"{path}: {table.num_rows} rows and columns {table.column_names}; "
                            f"{meta_file} says {rows} rows (missing {missing})")
        column = table.column("embedding")
        if column.type != want or column.null_count:
            raise DataError(f"{path}: column 'embedding' must be non-null {want}, got {column.type}")
        for c in ("photo_id", "image_digest", "source"):
            if not pa.types.is_string(table.column(c).type) or table.column(c).null_count:
                raise DataError(f"{path}: column {c!r} must be non-null strings")
        flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
        embedding[start : start + rows] = flat.reshape(rows, dim)
        ids += table.column("photo_id").to_pylist()
        digests += table.column("image_digest").to_pylist()
        sources += table.column("source").to_pylist()
        start += rows
    if not np.isfinite(embedding).all():
        raise DataError(f"{folder}: embeddings hold NaN or infinite values")
    photo_id = np.asarray(ids, dtype=object)
    if len(set(ids)) != n:
        seen, repeated = set(), []
        for p in ids:
            if p in seen:
                repeated.append(p)
            seen.add(p)
        raise DataError(f"{folder}: photo ids must be distinct; repeated: {repeated[:5]}")
    return PhotoShards(folder, photo_id, embedding, np.asarray(digests, dtype=object), np.asarray(sources, dtype=object), meta)


def gallery_from_shards(shards: PhotoShards, photos=None, data_dir: str | Path | None = None, require=()):
    """The Gallery of every photo in `shards`, with the checks a reader needs.

    photos:  a data set's PhotoSet whose photos, where the shards hold them, must have the same bytes
             (image digests) as what was embedded; a changed one is a DataError naming it.
    require: photo ids that must be in the gallery (the targets of the sketches evaluated).
    """
    from sketch_env.data import photo_digests
    from sketch_env.gallery import Gallery

    row = {p: i for i, p in enumerate(shards.photo_id)}
    missing = sorted({p for p in require if p not in row})
    if missing:
        raise DataError(f"{shards.path}: {len(missing)} photo(s) the sketches are of are not in the gallery, "
                        f"e.g. {missing[:3]}; embed them too (darp embed-photos over a source that holds them)")
    if photos is not None and len(photos):
        held = np.array([p in row for p in photos.photo_id], bool)
        if held.any():
            ours = photo_digests(photos.subset(held))
            theirs = shards.image_digest[[row[p] for p in photos.photo_id[held]]]
            changed = photos.photo_id[held][ours != theirs]
            if len(changed):
                raise DataError(f"{shards.path}: {len(changed)} photo(s) of {data_dir or 'the data set'} have another image "
                                f"than the one embedded (e.g. {list(changed[:3])}); embed the photos again")
    return Gallery(shards.embedding, shards.photo_id)
