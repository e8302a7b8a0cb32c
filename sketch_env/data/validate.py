"""The import pipeline every importer shares: checks, normalisation, the summary and the one import loop.

An importer (`qmul.py`, `sketchy.py`) only names what it found: one `FoundSketch` per sketch (its
id, photo, split, drawer and how to read its points in canvas pixels). `import_sketches` does the
rest for all of them: checks the output directory first, reads the photos (`collect_photos`),
reads each sketch, asks `check_sketch` whether it is usable, and either skips a bad one (recording
why in an `ImportSummary`) or stops with a `DataError`, as the user chose with `on_error`. A sketch
whose photo is missing or unreadable is treated the same way. Everything is checked before
anything is written, so a failed import leaves no output.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from sketch_env.atomic import check_output_dir
from sketch_env.data.store import DATASET, MAX_POINTS, DataError, PhotoSet, SketchSet, encode_png, save_dataset

OnError = Literal["skip", "fail"]

# How far (as a share of the canvas side) a point may lie beyond an edge before the sketch is refused;
# points within this margin are clipped onto the canvas by `normalise_sketch`.
OUTSIDE_MARGIN = 0.1


def check_sketch(points: np.ndarray, canvas_w: float, canvas_h: float, name: str) -> str | None:
    """Why the (n, 3) sketch `points` (x, y in canvas pixels, pen flag) cannot be used, or None.

    `name` only appears in the reason so that the caller can print it as it is.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        return f"sketch {name}: expected an (n, 3) array of x, y, pen, got shape {points.shape}"
    if not np.issubdtype(points.dtype, np.number) or np.issubdtype(points.dtype, np.complexfloating):
        return f"sketch {name}: expected real numbers, got dtype {points.dtype}"
    if len(points) == 0:
        return f"sketch {name}: empty (no points)"
    if len(points) == 1:
        return f"sketch {name}: only one point"
    if len(points) > MAX_POINTS:
        return f"sketch {name}: {len(points)} points, more than the {MAX_POINTS} a sketch may have"
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        return f"sketch {name}: {int(bad.sum())} points with non-finite coordinates (first at index {int(np.argmax(bad))})"
    pen = points[:, 2]
    bad = (pen != 0) & (pen != 1)
    if bad.any():
        return f"sketch {name}: pen flags must be 0 or 1, found {np.unique(pen[bad])[:5].tolist()}"
    x, y = points[:, 0], points[:, 1]
    lo_x, hi_x = -OUTSIDE_MARGIN * canvas_w, (1 + OUTSIDE_MARGIN) * canvas_w
    lo_y, hi_y = -OUTSIDE_MARGIN * canvas_h, (1 + OUTSIDE_MARGIN) * canvas_h
    outside = (x < lo_x) | (x > hi_x) | (y < lo_y) | (y > hi_y)
    if outside.any():
        return (
            f"sketch {name}: {int(outside.sum())} points lie more than {OUTSIDE_MARGIN:.0%} beyond the "
            f"{canvas_w:g}x{canvas_h:g} canvas (x in [{x.min():.1f}, {x.max():.1f}], y in [{y.min():.1f}, {y.max():.1f}])"
        )
    return None


def normalise_sketch(points: np.ndarray, canvas_w: float, canvas_h: float) -> np.ndarray:
    """Canvas-pixel (n, 3) points -> (n, 3) float32 with x, y in [0, 1] and pen 1 on the last point.

    Both axes are divided by the longer canvas side and the shorter axis is centred, so shapes keep
    their aspect ratio (the convention of `store.py`). Points slightly off the canvas are clipped.
    """
    points = np.asarray(points, np.float64)
    side = max(canvas_w, canvas_h)
    xy = (points[:, :2] + [(side - canvas_w) / 2, (side - canvas_h) / 2]) / side
    out = np.empty((len(points), 3), np.float32)
    out[:, :2] = np.clip(xy, 0.0, 1.0)
    out[:, 2] = points[:, 2]
    out[-1, 2] = 1.0
    return out


@dataclass
class ImportSummary:
    """What an import did: how many sketches and photos it kept and which sketches it skipped, and why.

    With `on_error="fail"` the first rejected sketch raises a `DataError` instead of being recorded.
    """

    n_imported: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_photos: int = 0
    on_error: OnError = "skip"

    def __post_init__(self):
        if self.on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {self.on_error!r}")

    def reject(self, file, name: str, reason: str) -> None:
        """Skip sketch `name` read from `file` (or raise, if on_error is "fail").

        `reason` names the sketch itself (as `check_sketch`'s reasons do); `file` is prepended.
        """
        if self.on_error == "fail":
            raise DataError(f"{file}: {reason} (use --on-error skip to import the rest and report it)")
        self.skipped.append((name, f"{file}: {reason}"))

    def format(self, max_reasons: int = 20) -> str:
        """A few lines for the terminal: counts, then up to `max_reasons` skipped sketches."""
        lines = [f"imported {self.n_imported} sketches of {self.n_photos} photos, skipped {len(self.skipped)}"]
        lines += [f"  skipped {reason}" for _, reason in self.skipped[:max_reasons]]
        if len(self.skipped) > max_reasons:
            lines.append(f"  ... and {len(self.skipped) - max_reasons} more")
        return "\n".join(lines)


PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_photo(path: Path) -> bytes:
    """The encoded bytes of one photo: PNG/JPEG as they are, any other readable format re-encoded as PNG.

    The image is fully decoded once, so a truncated or corrupt file raises a `DataError` naming it.
    """
    from PIL import Image

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format in ("PNG", "JPEG"):
                return data
            return encode_png(np.asarray(im.convert("RGB")))
    # PIL reports an unknown format as an OSError, some corrupt files as SyntaxError or ValueError.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the photo ({e})") from None


def collect_photos(split_of: dict[str, str], photos_dir: str | Path) -> tuple[PhotoSet, dict[str, str]]:
    """Read the photos named in `split_of` (photo name -> split) from `photos_dir`.

    A photo is the file NAME.png, NAME.jpg or NAME.jpeg. Returns the readable photos (sorted by name,
    each with its split) and, for every name that is missing or unreadable, the reason.
    """
    photos_dir = Path(photos_dir)
    if not photos_dir.is_dir():
        raise DataError(f"{photos_dir}: photo directory not found")
    # NAME.png is preferred over NAME.jpg over NAME.jpeg when several exist.
    found = sorted(
        (PHOTO_SUFFIXES.index(f.suffix.lower()), f) for f in photos_dir.iterdir() if f.suffix.lower() in PHOTO_SUFFIXES
    )
    files: dict[str, Path] = {}
    for _, f in found:
        files.setdefault(f.stem, f)
    names, splits, images, problems = [], [], [], {}
    for name in sorted(split_of):
        if name not in files:
            problems[name] = f"photo {name}.png/.jpg not found in {photos_dir}"
            continue
        try:
            images.append(read_photo(files[name]))
        except DataError as e:
            problems[name] = str(e)
            continue
        names.append(name)
        splits.append(split_of[name])
    return PhotoSet(np.asarray(names, dtype=object), np.asarray(splits, dtype=object), images), problems


@dataclass
class FoundSketch:
    """One sketch an importer found, before it is read.

    label:  how reasons name it (the pickle key, the file name); file: where it comes from.
    read:   returns ((n, 3) x, y in canvas pixels and pen flag, canvas_w, canvas_h); may raise DataError.
    """

    label: str
    file: Path
    sketch_id: str
    photo: str
    split: str
    drawer: str
    read: Callable[[], tuple[np.ndarray, float, float]]


def import_sketches(
    found: list[FoundSketch],
    summary: ImportSummary,
    photos_dir: str | Path,
    out: str | Path,
    origin: Path,
    name: str,
    source: str,
    *,
    inputs=(),
    force: bool = False,
) -> ImportSummary:
    """Import the sketches of `found` (read from `origin`) and their photos into the data-set directory `out`.

    `summary` may already hold sketches the importer rejected while naming them. Every photo named
    by a found sketch is imported with that sketch's split, even if all its sketches are skipped,
    so the gallery stays complete. `out` is checked before anything is read (`check_output_dir`:
    new, empty or an earlier data set, unless `force`; never a directory holding one of `inputs`).
    """
    check_output_dir(out, DATASET, inputs=inputs, force=force, replace=True)
    photos, photo_problems = collect_photos({s.photo: s.split for s in found}, photos_dir)
    kept: list[tuple[FoundSketch, np.ndarray, float, float]] = []
    for s in found:
        if s.photo in photo_problems:
            summary.reject(s.file, s.label, f"sketch {s.label}: {photo_problems[s.photo]}")
            continue
        try:
            points, canvas_w, canvas_h = s.read()
        except DataError as e:
            summary.reject(s.file, s.label, f"sketch {s.label}: {str(e).removeprefix(f'{s.file}: ')}")
            continue
        reason = check_sketch(points, canvas_w, canvas_h, s.label)
        if reason is not None:
            summary.reject(s.file, s.label, reason)
            continue
        kept.append((s, normalise_sketch(points, canvas_w, canvas_h), canvas_w, canvas_h))
    if not kept:
        raise DataError(f"{origin}: no usable sketches\n{summary.format()}")
    sketches = SketchSet.from_list(
        [points for _, points, _, _ in kept],
        [s.sketch_id for s, *_ in kept],
        [s.photo for s, *_ in kept],
        [s.split for s, *_ in kept],
        [s.drawer for s, *_ in kept],
        [w for *_, w, _ in kept],
        [h for *_, h in kept],
    )
    save_dataset(out, sketches, photos, name=name, source=source, inputs=inputs, force=force)
    summary.n_imported = len(kept)
    summary.n_photos = len(photos)
    return summary
