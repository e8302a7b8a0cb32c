"""The on-the-fly SBIR coordinate pickle (QMUL Chair-V2 / Shoe-V2) and `import_qmul`.

The public on-the-fly code distributes sketches as a pickled dict {'/train/NAME_DRAWER': (N, 3) array
of x, y on a 256x256 canvas and a pen-lift flag}. Loading a pickle can run arbitrary code, so the file is
read through `_NumpyOnlyUnpickler`, which resolves only the globals that rebuild numpy arrays and plain
containers and refuses any other by name before anything runs.
"""

from __future__ import annotations

import pickle
import re
from functools import partial
from pathlib import Path

import numpy as np

from sketch_env.data.store import DataError
from sketch_env.data.validate import FoundSketch, ImportSummary, OnError, import_sketches

CANVAS = 256.0

# The functions numpy's own pickles name, taken from numpy itself so that both module spellings
# (numpy.core before 2.0, numpy._core since) resolve without importing the deprecated alias.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 rebuilds arrays from a buffer
_SCALAR = np.float64(0).__reduce__()[0]


def _latin1_encode(text: str, encoding: str) -> bytes:
    """How pickle protocols 0-2 store bytes (`_codecs.encode(text, "latin1")`), with no other codec."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed with 'latin1', got {encoding!r}")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    # Containers, under their Python 3 and (in protocol 0-2 pickles) Python 2 module names.
    **{(module, c.__name__): c for module in ("builtins", "__builtin__") for c in (dict, list, tuple, set, frozenset)},
}

# '/SPLIT/NAME_DRAWER': NAME is everything before the last underscore, DRAWER any non-empty rest.
_KEY = re.compile(r"^/(train|test)/(.+)_([^_]+)$")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays, numpy scalars and builtin containers."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path}: refusing to load the pickle: it asks for the global {module}.{name}, "
                "but a coordinate file may only hold numpy arrays and plain containers"
            ) from None


def read_coordinate_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """Read a coordinate pickle safely: {key: (N, 3) array}. Values are returned as they are stored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: coordinate file not found")
    with open(path, "rb") as f:
        try:
            data = _NumpyOnlyUnpickler(f, path).load()
        except DataError:
            raise
        except Exception as e:  # a corrupt pickle can fail with almost any exception type
            raise DataError(f"{path}: not a readable coordinate pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a pickled dict of sketches, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise DataError(f"{path}: keys must be strings like '/train/NAME_k', got {bad[:3]!r}")
    return data


def import_qmul(
    coords: str | Path,
    photos_dir: str | Path,
    out: str | Path,
    split: str = "all",
    on_error: OnError = "skip",
    force: bool = False,
) -> ImportSummary:
    """Import a coordinate pickle and its photo directory into the data-set directory `out`.

    Key '/SPLIT/NAME_DRAWER' is sketch NAME_DRAWER of photo NAME (file NAME.png or NAME.jpg in
    `photos_dir`) by drawer DRAWER, in SPLIT. As in the reference loaders, NAME is everything before
    the last underscore and any non-empty DRAWER names the drawer (real files hold both numbers and
    codes like 'A7QX2KD9PLMZ3'). `split` ("train", "test" or "all") chooses which keys to import.
    Bad sketches are skipped and reported, or raise (`on_error`). `out` is checked before the
    photos are read (`import_sketches`: `force` to replace other work, never the inputs).
    """
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r} for a coordinate pickle: use train, test or all")
    coords = Path(coords)
    summary = ImportSummary(on_error=on_error)
    data = read_coordinate_pickle(coords)

    found: list[FoundSketch] = []
    split_of: dict[str, str] = {}
    for key in data:
        m = _KEY.match(key)
        if m is None:
            summary.reject(coords, key, f"sketch {key}: key is not of the form '/train/NAME_DRAWER' or '/test/NAME_DRAWER'")
            continue
        key_split, photo, drawer = m.group(1), m.group(2), m.group(3)
        if split not in ("all", key_split):
            continue
        if split_of.setdefault(photo, key_split) != key_split:
            raise DataError(f"{coords}: photo {photo} has sketches in both the train and the test split")
        found.append(FoundSketch(key, coords, f"{photo}_{drawer}", photo, key_split, drawer, partial(_points, data[key], coords)))

    if not found and not summary.skipped:
        raise DataError(f"{coords}: no sketches in split {split!r}; its keys look like {list(data)[:3]}")
    return import_sketches(found, summary, photos_dir, out, coords, name=coords.name, source=f"qmul:{coords}",
                           inputs=(coords, photos_dir), force=force)


def _points(value, coords: Path) -> tuple[np.ndarray, float, float]:
    """A pickle value as (points, canvas_w, canvas_h) on the 256 x 256 canvas."""
    if not isinstance(value, np.ndarray):
        raise DataError(f"{coords}: expected a numpy array, got {type(value).__name__}")
    return value, CANVAS, CANVAS
