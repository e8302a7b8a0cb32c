"""The on-the-fly SBIR coordinate pickle (QMUL Chair-V2 / Shoe-V2) and `import_qmul`.

The public on-the-fly code distributes sketches as a pickled dict {'/train/NAME_DRAWER': (N, 3) array
of x, y on a 256x256 canvas and a pen-lift flag}. Loading a pickle can run arbitrary code, so the file is
read through `sketch_env.safe_pickle.load_numpy_pickle`, which resolves only the globals that rebuild
numpy arrays and plain containers and refuses any other by name before anything runs.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np

from sketch_env.data.store import DataError
from sketch_env.data.validate import FoundSketch, ImportSummary, OnError, import_sketches
from sketch_env.safe_pickle import load_numpy_pickle

CANVAS = 256.0

# '/SPLIT/NAME_DRAWER': NAME is everything before the last underscore, DRAWER any non-empty rest.
_KEY = re.compile(r"^/(train|test)/(.+)_([^_]+)$")


def read_coordinate_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """Read a coordinate pickle safely: {key: (N, 3) array}. Values are returned as they are stored."""
    data = load_numpy_pickle(path, "coordinate pickle")
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
