"""The one on-disk format every stage reads: a data-set directory of Parquet tables.

Layout of a data set directory::

    manifest.json     {"schema_version": 2, "name": ..., "n_sketches": ..., "n_photos": ..., "source": ...}
    sketches.parquet  sketch_id, photo_id, split, drawer, canvas_width, canvas_height, x, y, pen
    photos.parquet    photo_id, split, image (encoded PNG/JPEG bytes)

Coordinates are stored normalised to the unit square [0, 1]^2 of the canvas (a non-square canvas is
scaled by its longer side and centred), y pointing down as on screen. ``pen`` is 1 on the last point
of every stroke, 0 elsewhere. ``drawer`` names who drew the sketch, as the source names them (a
string since schema 2; schema 1 stored integers and is still read). Stored splits are "train" and
"test"; "val" is carved out of "train" by `select_split`. Writes go to a temporary sibling directory
that is renamed at the end (`sketch_env.atomic.replace_dir`), so a crash never leaves a
half-written data set, and a directory holding anything but a data set is never replaced unasked.

`data_fingerprint` identifies a whole data-set directory, `sketch_digests` and `photo_digests` each
sketch's points and each photo's bytes: what the phase-1 export is checked against.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sketch_env.atomic import OutputKind, read_json_object, replace_dir
from sketch_env.errors import DataError

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # schema 1: integer drawers
SPLITS = ("train", "test")  # the splits a data set stores
DATASET_FILES = ("manifest.json", "sketches.parquet", "photos.parquet")
DATASET = OutputKind("data set", ("manifest.json",), frozenset(DATASET_FILES))


@dataclass
class SketchSet:
    """A batch of variable-length sketches stored as one flat point array.

    points:  (P, 3) float32, columns x, y in [0, 1] and pen (1.0 on the last point of a stroke).
    offsets: (S + 1,) int64; sketch i is points[offsets[i]:offsets[i + 1]].
    The per-sketch columns are numpy arrays of length S (ids, splits and drawers are str objects).
    """

    points: np.ndarray
    offsets: np.ndarray
    sketch_id: np.ndarray
    photo_id: np.ndarray
    split: np.ndarray
    drawer: np.ndarray
    canvas_width: np.ndarray = field(default=None)
    canvas_height: np.ndarray = field(default=None)

    def __post_init__(self):
        n = len(self.offsets) - 1
        if self.canvas_width is None:
            self.canvas_width = np.full(n, 256.0, np.float32)
        if self.canvas_height is None:
            self.canvas_height = np.full(n, 256.0, np.float32)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sketch(self, i: int) -> np.ndarray:
        """The (n_i, 3) points of sketch i."""
        return self.points[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, index) -> "SketchSet":
        """The sketches at `index` (a boolean mask or integer indices), in that order."""
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index, np.int64)
        lengths = self.lengths()[index]
        offsets = np.zeros(len(index) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(index):
            gather = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in index])
        else:
            gather = np.zeros(0, np.int64)
        return SketchSet(
            points=self.points[gather],
            offsets=offsets,
            sketch_id=self.sketch_id[index],
            photo_id=self.photo_id[index],
            split=self.split[index],
            drawer=self.drawer[index],
            canvas_width=self.canvas_width[index],
            canvas_height=self.canvas_height[index],
        )

    @staticmethod
    def from_list(
        sketches: list[np.ndarray],
        sketch_id,
        photo_id,
        split,
        drawer,
        canvas_width=None,
        canvas_height=None,
    ) -> "SketchSet":
        """Build from a list of (n_i, 3) arrays (x, y in [0, 1], pen flag)."""
        lengths = np.array([len(s) for s in sketches], np.int64)
        offsets = np.zeros(len(sketches) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        points = (
            np.concatenate(sketches).astype(np.float32) if sketches else np.zeros((0, 3), np.float32)
        )
        n = len(sketches)
        return SketchSet(
            points=points,
            offsets=offsets,
            sketch_id=np.asarray(sketch_id, dtype=object),
            photo_id=np.asarray(photo_id, dtype=object),
            split=np.asarray(split, dtype=object),
            drawer=np.array([str(d) for d in drawer], dtype=object),
            canvas_width=None if canvas_width is None else np.asarray(canvas_width, np.float32).reshape(n),
            canvas_height=None if canvas_height is None else np.asarray(canvas_height, np.float32).reshape(n),
        )


@dataclass
class PhotoSet:
    """Photos of a data set: ids, splits and the encoded image bytes (decoded on demand).

    source: the file the photos were read from, named by decoding errors.
    """

    photo_id: np.ndarray
    split: np.ndarray
    image_bytes: list[bytes]
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.photo_id)

    def index_of(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.photo_id)}

    def decode(self, i: int, size: int | None = None) -> np.ndarray:
        """Photo i as an (H, W, 3) uint8 array, resized to size x size if given."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.image_bytes[i])) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                return np.asarray(im, np.uint8)
        # PIL reports an unknown format as an OSError, some corrupt files as SyntaxError or ValueError.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{self.source or 'photos'}: photo {self.photo_id[i]!r} is not a readable image ({e})") from None

    def decode_all(self, size: int) -> np.ndarray:
        """All photos as (N, size, size, 3) uint8."""
        out = np.empty((len(self), size, size, 3), np.uint8)
        for i in range(len(self)):
            out[i] = self.decode(i, size)
        return out

    def subset(self, index) -> "PhotoSet":
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index, np.int64)
        return PhotoSet(self.photo_id[index], self.split[index], [self.image_bytes[i] for i in index], self.source)


@dataclass
class Dataset:
    """A loaded data-set directory."""

    sketches: SketchSet
    photos: PhotoSet
    manifest: dict
    path: Path | None = None

    def split(self, name: str) -> "Dataset":
        """The sketches and photos of one split (photos are split with their sketches)."""
        if name == "all":
            return self
        known = sorted(set(self.sketches.split) | set(self.photos.split))
        if name not in known:
            raise DataError(f"{self.path}: no split named {name!r}; the data set has {known}")
        return Dataset(
            self.sketches.subset(self.sketches.split == name),
            self.photos.subset(self.photos.split == name),
            self.manifest,
            self.path,
        )


def encode_png(image: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def _sketch_table(s: SketchSet) -> pa.Table:
    lengths = s.lengths()
    offsets32 = pa.array(s.offsets.astype(np.int32))

    def lists(col, typ):
        return pa.ListArray.from_arrays(offsets32, pa.array(col, type=typ))

    return pa.table(
        {
            "sketch_id": pa.array(list(s.sketch_id), pa.string()),
            "photo_id": pa.array(list(s.photo_id), pa.string()),
            "split": pa.array(list(s.split), pa.string()),
            "drawer": pa.array([str(d) for d in s.drawer], pa.string()),
            "canvas_width": pa.array(s.canvas_width.astype(np.float32)),
            "canvas_height": pa.array(s.canvas_height.astype(np.float32)),
            "n_points": pa.array(lengths.astype(np.int32)),
            "x": lists(s.points[:, 0], pa.float32()),
            "y": lists(s.points[:, 1], pa.float32()),
            "pen": lists(s.points[:, 2].astype(np.int8), pa.int8()),
        }
    )


def save_dataset(
    out: str | Path, sketches: SketchSet, photos: PhotoSet, name: str, source: str, *, inputs=(), force: bool = False
) -> Path:
    """Write a data set directory atomically (temp dir + rename). Returns the directory.

    `out` may be new, empty or an earlier data set (see `sketch_env.atomic.check_output_dir`);
    anything else needs `force`, and a directory holding one of `inputs` (what the data was read
    from) is never replaced.
    """
    out = Path(out)
    missing = sorted(set(sketches.photo_id) - set(photos.photo_id))
    if missing:
        raise DataError(f"{out}: {len(missing)} sketches point to photos that are not in the set, e.g. {missing[:3]}")
    unknown = sorted(set(sketches.split) - set(SPLITS)) + sorted(set(photos.split) - set(SPLITS))
    if unknown:
        raise DataError(f"{out}: a data set stores the splits {SPLITS} only, got {unknown[:3]}")

    def write(tmp: Path) -> None:
        pq.write_table(_sketch_table(sketches), tmp / "sketches.parquet")
        pq.write_table(
            pa.table(
                {
                    "photo_id": pa.array(list(photos.photo_id), pa.string()),
                    "split": pa.array(list(photos.split), pa.string()),
                    "image": pa.array(photos.image_bytes, pa.binary()),
                }
            ),
            tmp / "photos.parquet",
        )
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "source": source,
            "n_sketches": len(sketches),
            "n_photos": len(photos),
            "splits": {sp: int((sketches.split == sp).sum()) for sp in sorted(set(sketches.split))},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

    return replace_dir(out, write, DATASET, inputs=inputs, force=force)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mf = path / "manifest.json"
    manifest = read_json_object(mf, f"{path}: not a data set directory (no manifest.json); create one with "
                                    "`darp data generate` or `darp data import-qmul`")
    if manifest.get("schema_version") not in READABLE_SCHEMAS:
        raise DataError(f"{mf}: schema_version {manifest.get('schema_version')!r}, this code reads {READABLE_SCHEMAS}")
    return manifest


def _read_table(f: Path) -> pa.Table:
    # ParquetFile.read avoids pyarrow.dataset, whose first use imports pandas (~1 s cold).
    try:
        return pq.ParquetFile(f).read()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{f}: cannot read Parquet table ({e})") from None


def _numpy(arr, dtype) -> np.ndarray:
    """A null-free primitive Arrow array as numpy, straight from its buffer (no pandas import)."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if arr.null_count:
        raise DataError(f"unexpected missing values in a {arr.type} column")
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr) + arr.offset)[arr.offset :].copy()


def _list_numpy(col, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (S+1,), flat values) of a list<primitive> column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = _numpy(arr.offsets, np.int32).astype(np.int64)
    values = _numpy(arr.values, dtype)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def load_sketches(path: str | Path) -> SketchSet:
    """Read sketches.parquet of a data set directory (fast: flat Arrow buffers, no per-point Python)."""
    path = Path(path)
    read_manifest(path)
    f = path / "sketches.parquet"
    t = _read_table(f)
    try:
        offsets, x = _list_numpy(t.column("x"), np.float32)
        _, y = _list_numpy(t.column("y"), np.float32)
        _, pen = _list_numpy(t.column("pen"), np.int8)
        return SketchSet(
            points=np.stack([x, y, pen.astype(np.float32)], axis=1),
            offsets=offsets,
            sketch_id=np.asarray(t.column("sketch_id").to_pylist(), dtype=object),
            photo_id=np.asarray(t.column("photo_id").to_pylist(), dtype=object),
            split=np.asarray(t.column("split").to_pylist(), dtype=object),
            drawer=np.array([str(d) for d in t.column("drawer").to_pylist()], dtype=object),
            canvas_width=_numpy(t.column("canvas_width"), np.float32),
            canvas_height=_numpy(t.column("canvas_height"), np.float32),
        )
    except (KeyError, ValueError, pa.ArrowException) as e:
        raise DataError(f"{f}: not a sketches table of schema {SCHEMA_VERSION} ({e})") from None


def load_photos(path: str | Path) -> PhotoSet:
    path = Path(path)
    f = path / "photos.parquet"
    t = _read_table(f)
    try:
        return PhotoSet(
            photo_id=np.asarray(t.column("photo_id").to_pylist(), dtype=object),
            split=np.asarray(t.column("split").to_pylist(), dtype=object),
            image_bytes=t.column("image").to_pylist(),
            source=f,
        )
    except (KeyError, pa.ArrowException) as e:
        raise DataError(f"{f}: not a photos table of schema {SCHEMA_VERSION} ({e})") from None


def load_dataset(path: str | Path) -> Dataset:
    """Load a data set directory written by `save_dataset`."""
    path = Path(path)
    manifest = read_manifest(path)
    return Dataset(load_sketches(path), load_photos(path), manifest, path)


def data_fingerprint(data_dir: str | Path) -> str:
    """sha256 over a data set directory's three files: tells whether an export was made from it."""
    h = hashlib.sha256()
    for name in ("manifest.json", "sketches.parquet", "photos.parquet"):
        try:
            with open(Path(data_dir) / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:
            raise DataError(f"{Path(data_dir) / name}: cannot read ({e.strerror})") from None
    return h.hexdigest()


def sketch_digests(sketches: SketchSet) -> np.ndarray:
    """(S,) hex digests of each sketch's points (x, y, pen as float32): equal digests, equal strokes."""
    points = np.ascontiguousarray(sketches.points, np.float32)
    return np.array(
        [hashlib.blake2b(points[a:b].tobytes(), digest_size=16).hexdigest() for a, b in zip(sketches.offsets[:-1], sketches.offsets[1:])],
        dtype=object,
    )


def photo_digests(photos: PhotoSet) -> np.ndarray:
    """(N,) hex digests of each photo's encoded bytes."""
    return np.array([hashlib.blake2b(b, digest_size=16).hexdigest() for b in photos.image_bytes], dtype=object)


def holdout_by_photo(ds: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split a data set by photo (never by sketch): returns (rest, held_out).

    A fixed share `fraction` of the photos, chosen by a seeded permutation of the sorted photo
    ids, goes to `held_out` together with every sketch of those photos.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    ids = np.array(sorted(set(ds.photos.photo_id)), dtype=object)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_out = max(1, int(round(fraction * len(ids))))
    held = set(ids[perm[:n_out]])
    sk_mask = np.array([p in held for p in ds.sketches.photo_id], bool)
    ph_mask = np.array([p in held for p in ds.photos.photo_id], bool)
    rest = Dataset(ds.sketches.subset(~sk_mask), ds.photos.subset(~ph_mask), ds.manifest, ds.path)
    out = Dataset(ds.sketches.subset(sk_mask), ds.photos.subset(ph_mask), ds.manifest, ds.path)
    return rest, out


VAL_FRACTION = 0.2
VAL_SEED = 0


def select_split(ds: Dataset, name: str, val_fraction: float = VAL_FRACTION, seed: int = VAL_SEED) -> Dataset:
    """The project's one definition of the evaluation splits, all by photo.

    - "train": the data set's train split minus the validation photos,
    - "val":   `val_fraction` of the train split's photos (seeded, see `holdout_by_photo`),
    - "test":  the data set's test split (absent for the Chair-V2 training data we have),
    - "train+val": the whole train split, "all": everything.
    """
    if name == "all":
        return ds
    if name in ("train", "val", "train+val"):
        train = ds.split("train")
        if name == "train+val":
            return train
        rest, held = holdout_by_photo(train, val_fraction, seed)
        return rest if name == "train" else held
    if name == "test":
        return ds.split("test")
    raise DataError(f"unknown split {name!r}: use train, val, test, train+val or all")
