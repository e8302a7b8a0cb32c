"""The on-the-fly SBIR coordinate pickle (QMUL Chair-V2 / Shoe-V2) and `import_qmul`.

The public on-the-fly code distributes sketches as a pickled dict {'/train/NAME_k': (N, 3) array of
x, y on a 256x256 canvas and a pen-lift flag}. Loading a pickle can run arbitrary code, so the file is
read through `sketch_env.safe_pickle.load_numpy_pickle`, which resolves only the globals that rebuild
numpy arrays and plain containers and refuses any other by name before anything runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sketch_env.data.store import DataError, SketchSet, save_dataset
from sketch_env.data.validate import ImportSummary, OnError, check_sketch, collect_photos, normalise_sketch
from sketch_env.safe_pickle import load_numpy_pickle

CANVAS = 256.0

_KEY = re.compile(r"^/(train|test)/(.+)_(\d+)$")


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
) -> ImportSummary:
    """Import a coordinate pickle and its photo directory into the data-set directory `out`.

    Key '/SPLIT/NAME_k' is sketch NAME_k of photo NAME (file NAME.png or NAME.jpg in `photos_dir`) by
    drawer k, in SPLIT. `split` ("train", "test" or "all") chooses which keys to import. Every photo
    named by a selected key is imported with that key's split, even if all its sketches are skipped,
    so the gallery stays complete. Bad sketches are skipped and reported, or raise (`on_error`).
    """
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r} for a coordinate pickle: use train, test or all")
    coords = Path(coords)
    summary = ImportSummary(on_error=on_error)
    data = read_coordinate_pickle(coords)

    selected: list[tuple[str, str, str, str]] = []  # (key, split, photo, drawer)
    split_of: dict[str, str] = {}
    for key in data:
        m = _KEY.match(key)
        if m is None:
            summary.reject(coords, key, f"sketch {key}: key is not of the form '/train/NAME_k' or '/test/NAME_k'")
            continue
        key_split, photo, drawer = m.group(1), m.group(2), m.group(3)
        if split not in ("all", key_split):
            continue
        if split_of.setdefault(photo, key_split) != key_split:
            raise DataError(f"{coords}: photo {photo} has sketches in both the train and the test split")
        selected.append((key, key_split, photo, drawer))

    if not selected and not summary.skipped:
        raise DataError(f"{coords}: no sketches in split {split!r}; its keys look like {list(data)[:3]}")
    photos, photo_problems = collect_photos(split_of, photos_dir)
    sketches, ids, photo_ids, splits, drawers = [], [], [], [], []
    for key, key_split, photo, drawer in selected:
        if photo in photo_problems:
            summary.reject(coords, key, f"sketch {key}: {photo_problems[photo]}")
            continue
        points = data[key]
        if not isinstance(points, np.ndarray):
            summary.reject(coords, key, f"sketch {key}: expected a numpy array, got {type(points).__name__}")
            continue
        reason = check_sketch(points, CANVAS, CANVAS, key)
        if reason is not None:
            summary.reject(coords, key, reason)
            continue
        sketches.append(normalise_sketch(points, CANVAS, CANVAS))
        ids.append(f"{photo}_{drawer}")
        photo_ids.append(photo)
        splits.append(key_split)
        drawers.append(int(drawer))
    if not sketches:
        raise DataError(f"{coords}: no usable sketches in split {split!r}\n{summary.format()}")
    n = len(sketches)
    sketch_set = SketchSet.from_list(sketches, ids, photo_ids, splits, drawers, np.full(n, CANVAS), np.full(n, CANVAS))
    save_dataset(out, sketch_set, photos, name=coords.name, source=f"qmul:{coords}")
    summary.n_imported = n
    summary.n_photos = len(photos)
    return summary
