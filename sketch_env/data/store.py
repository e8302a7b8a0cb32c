"""The one on-disk format every stage reads: a data-set directory of Parquet tables.

Layout of a data set directory::

    manifest.json     {"schema_version": 2, "name": ..., "n_sketches": ..., "n_photos": ..., "source": ...}
    sketches.parquet  sketch_id, photo_id, split, drawer, canvas_width, canvas_height, x, y, pen
    photos.parquet    photo_id, split, image (encoded PNG/JPEG bytes)

Coordinates are stored normalised to the unit square [0, 1]^2 of the canvas (a non-square canvas is
scaled by its longer side and centred), y pointing down as on screen. ``pen`` is 1 on the last point
of every stroke, 0 elsewhere. ``drawer`` names who drew the sketch, as the source names them (a
string). Stored splits are "train" and
"test"; "val" is carved out of "train" by `select_split`. Writes go to a temporary sibling directory
that is renamed at the end (`sketch_env.atomic.replace_dir`), so a crash never leaves a
half-written data set, and a directory holding anything but a data set is never replaced unasked.

Reading checks a data set as an import does (`sketch_problem`, `photo_problem`, `dataset_problem`):
column types, one entry per point in x, y and pen, n_points, coordinates finite and on the unit
square, pen flags 0 or 1, stored splits, distinct ids, and every sketch's photo present in the same
split. A hand-edited Parquet file that breaks any of them is a DataError naming the file and the first
sketch or photo concerned, not a failure deep inside training.

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
# Real sketches have a few hundred points (Chair-V2 at most 519, Sketchy's pigs at most 1,722 once
# curves are flattened); far more is a malformed or hostile file, refused before it costs memory.
MAX_POINTS = 20_000
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


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def sketch_problem(sketches: SketchSet) -> str | None:
    """What makes stored `sketches` unusable, naming the first sketch concerned, or None.

    Each sketch: 2 to MAX_POINTS points, x and y finite and in [0, 1], pen flags 0 or 1 and 1 on its
    last point, a canvas of positive finite size, a stored split; sketch ids distinct.
    """
    ids = np.asarray(sketches.sketch_id, dtype=object)
    lengths = sketches.lengths()
    if len(ids) != len(lengths):
        return f"{len(ids)} sketch ids for {len(lengths)} sketches"
    if len(set(ids.tolist())) != len(ids):
        _, first, counts = np.unique(ids.astype(str), return_index=True, return_counts=True)
        return f"sketch id {ids[first[np.argmax(counts > 1)]]!r} appears {counts.max()} times; sketch ids must be distinct"
    for what, bad in (("no or one point", lengths < 2), (f"more than the {MAX_POINTS} points a sketch may have", lengths > MAX_POINTS)):
        if bad.any():
            return f"sketch {ids[_first(bad)]!r}: {what} ({int(lengths[_first(bad)])})"
    split = np.asarray(sketches.split, dtype=object)
    bad = ~np.isin(split, SPLITS)
    if bad.any():
        return f"sketch {ids[_first(bad)]!r}: split {split[_first(bad)]!r}; a data set stores the splits {SPLITS} only"
    canvas = np.stack([np.asarray(sketches.canvas_width, np.float64), np.asarray(sketches.canvas_height, np.float64)], 1)
    bad = ~(np.isfinite(canvas) & (canvas > 0)).all(axis=1)
    if bad.any():
        return f"sketch {ids[_first(bad)]!r}: canvas {canvas[_first(bad)].tolist()}; width and height must be > 0"
    points = np.asarray(sketches.points)
    owner = np.repeat(np.arange(len(ids)), lengths)
    xy, pen = points[:, :2], points[:, 2]
    checks = (
        (~np.isfinite(xy).all(axis=1), "non-finite coordinates"),
        (((xy < 0) | (xy > 1)).any(axis=1), "coordinates outside [0, 1] (the unit square of the canvas)"),
        ((pen != 0) & (pen != 1), "pen flags other than 0 or 1"),
    )
    for bad, what in checks:
        if bad.any():
            i = _first(bad)
            n = int(bad[owner == owner[i]].sum())
            return f"sketch {ids[owner[i]]!r}: {n} point(s) with {what} (first at index {i - sketches.offsets[owner[i]]}: {points[i].tolist()})"
    last = pen[sketches.offsets[1:] - 1] != 1
    if last.any():
        return f"sketch {ids[_first(last)]!r}: its last point does not end a stroke (pen 0, must be 1)"
    return None


def photo_problem(photos: PhotoSet) -> str | None:
    """What makes stored `photos` unusable (ids not distinct, a split not stored), or None."""
    ids = np.asarray(photos.photo_id, dtype=object)
    if len(set(ids.tolist())) != len(ids):
        _, first, counts = np.unique(ids.astype(str), return_index=True, return_counts=True)
        return f"photo id {ids[first[np.argmax(counts > 1)]]!r} appears {counts.max()} times; photo ids must be distinct"
    split = np.asarray(photos.split, dtype=object)
    bad = ~np.isin(split, SPLITS)
    if bad.any():
        return f"photo {ids[_first(bad)]!r}: split {split[_first(bad)]!r}; a data set stores the splits {SPLITS} only"
    return None


def dataset_problem(sketches: SketchSet, photos: PhotoSet) -> str | None:
    """Whether every sketch's photo is in the set, in the sketch's split; None if so."""
    split_of = dict(zip(photos.photo_id.tolist(), photos.split.tolist()))
    missing = [i for i, p in enumerate(sketches.photo_id) if p not in split_of]
    if missing:
        i = missing[0]
        return (f"{len(missing)} sketch(es) point to photos that are not in the set, e.g. sketch "
                f"{sketches.sketch_id[i]!r} to photo {sketches.photo_id[i]!r}")
    other = [i for i, (p, sp) in enumerate(zip(sketches.photo_id, sketches.split)) if split_of[p] != sp]
    if other:
        i = other[0]
        return (f"sketch {sketches.sketch_id[i]!r} is in split {sketches.split[i]!r} but its photo "
                f"{sketches.photo_id[i]!r} in {split_of[sketches.photo_id[i]]!r}; splits are by photo")
    return None


def save_dataset(
    out: str | Path, sketches: SketchSet, photos: PhotoSet, name: str, source: str, *, inputs=(), force: bool = False
) -> Path:
    """Write a data set directory atomically (temp dir + rename). Returns the directory.

    `out` may be new, empty or an earlier data set (see `sketch_env.atomic.check_output_dir`);
    anything else needs `force`, and a directory holding one of `inputs` (what the data was read
    from) is never replaced.
    """
    out = Path(out)
    problem = photo_problem(photos) or sketch_problem(sketches) or dataset_problem(sketches, photos)
    if problem:
        raise DataError(f"{out}: {problem}")

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
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{mf}: schema_version {manifest.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    return manifest


def _read_table(f: Path) -> pa.Table:
    # ParquetFile.read avoids pyarrow.dataset, whose first use imports pandas (~1 s cold).
    try:
        return pq.ParquetFile(f).read()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{f}: cannot read Parquet table ({e})") from None


def _numpy(arr, dtype) -> np.ndarray:
    """A null-free primitive Arrow array of exactly `dtype` as numpy, straight from its buffer (no pandas import)."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr) + arr.offset)[arr.offset :].copy()


class _Columns:
    """The columns of one Parquet table, each checked for its type and for missing values as it is read;
    DataError naming the file and the column otherwise."""

    def __init__(self, f: Path, table: pa.Table, names: tuple[str, ...], what: str):
        self.f, self.t = f, table
        missing = [n for n in names if n not in table.column_names]
        if missing:
            raise DataError(f"{f}: not a {what} table of schema {SCHEMA_VERSION} (no column {missing[0]!r}; has {table.column_names})")

    def column(self, name: str, ok, expected: str, combine: bool = True):
        arr = self.t.column(name)
        arr = arr.combine_chunks() if combine else arr
        if not ok(arr.type):
            raise DataError(f"{self.f}: column {name!r} must hold {expected}, got {arr.type}")
        if arr.null_count:
            raise DataError(f"{self.f}: column {name!r} has {arr.null_count} missing value(s)")
        return arr

    def strings(self, name: str) -> np.ndarray:
        arr = self.column(name, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "text")
        return np.array(arr.to_pylist(), dtype=object)

    def numbers(self, name: str, dtype, integers: bool = False) -> np.ndarray:
        ok = pa.types.is_integer if integers else (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t))
        arr = self.column(name, ok, "integers" if integers else "numbers")
        return arr.to_numpy(zero_copy_only=False).astype(dtype)

    def point_lists(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(offsets (S + 1,), flat float32 values) of a list<number> column (no per-point Python)."""
        arr = self.column(name, lambda t: pa.types.is_list(t) and (pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)),
                          "lists of numbers")
        offsets = _numpy(arr.offsets, np.int32).astype(np.int64)
        values = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
        if values.null_count:
            raise DataError(f"{self.f}: column {name!r} has {values.null_count} missing point value(s)")
        return offsets - offsets[0], values.to_numpy(zero_copy_only=False).astype(np.float32)


SKETCH_COLUMNS = ("sketch_id", "photo_id", "split", "drawer", "canvas_width", "canvas_height", "n_points", "x", "y", "pen")


def load_sketches(path: str | Path) -> SketchSet:
    """Read sketches.parquet of a data set directory, checked (`sketch_problem`); fast: flat Arrow
    buffers, no per-point Python."""
    path = Path(path)
    read_manifest(path)
    f = path / "sketches.parquet"
    c = _Columns(f, _read_table(f), SKETCH_COLUMNS, "sketches")
    offsets, x = c.point_lists("x")
    columns = [x]
    for name in ("y", "pen"):
        other, values = c.point_lists(name)
        if not np.array_equal(other, offsets):
            i = _first(np.diff(other) != np.diff(offsets)) if len(other) == len(offsets) else 0
            raise DataError(f"{f}: columns 'x' and {name!r} hold different numbers of points (first in row {i})")
        columns.append(values)
    n_points = c.numbers("n_points", np.int64, integers=True)
    sketches = SketchSet(
        points=np.stack(columns, axis=1),
        offsets=offsets,
        sketch_id=c.strings("sketch_id"),
        photo_id=c.strings("photo_id"),
        split=c.strings("split"),
        drawer=c.strings("drawer"),
        canvas_width=c.numbers("canvas_width", np.float32),
        canvas_height=c.numbers("canvas_height", np.float32),
    )
    wrong = n_points != sketches.lengths()
    if wrong.any():
        i = _first(wrong)
        raise DataError(f"{f}: sketch {sketches.sketch_id[i]!r}: n_points says {n_points[i]}, x holds {sketches.lengths()[i]} points")
    problem = sketch_problem(sketches)
    if problem:
        raise DataError(f"{f}: {problem}")
    return sketches


def load_photos(path: str | Path) -> PhotoSet:
    """Read photos.parquet of a data set directory, checked (`photo_problem`); images stay encoded."""
    path = Path(path)
    f = path / "photos.parquet"
    c = _Columns(f, _read_table(f), ("photo_id", "split", "image"), "photos")
    image = c.column("image", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "encoded images (binary)",
                     combine=False)
    photos = PhotoSet(photo_id=c.strings("photo_id"), split=c.strings("split"), image_bytes=image.to_pylist(), source=f)
    problem = photo_problem(photos)
    if problem:
        raise DataError(f"{f}: {problem}")
    return photos


def load_dataset(path: str | Path) -> Dataset:
    """Load a data set directory written by `save_dataset`, checked as an import checks it (module docstring)."""
    path = Path(path)
    manifest = read_manifest(path)
    sketches, photos = load_sketches(path), load_photos(path)
    problem = dataset_problem(sketches, photos)
    if problem:
        raise DataError(f"{path}: {problem}")
    return Dataset(sketches, photos, manifest, path)


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
