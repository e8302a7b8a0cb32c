"""Sketchy database SVG sketches: the path parser and `import_sketchy`.

A Sketchy sketch is an SVG on a 640x480 canvas with one `<path>` per stroke in drawing order. The
real files use relative `m`, `c` and `l` commands with many short cubic curves (one per mouse sample);
the parser also reads absolute M/L/C, H/V (h/v), Z (z) and implicitly repeated coordinates. Each
subpath (moveto) is one stroke; cubic curves are flattened to points in one vectorised pass per file.

SVG files come from anywhere, so the XML is read with expat directly and a document that declares
entities is refused before any is expanded (a Sketchy SVG never needs them; nested internal entities
turn a few hundred bytes into hundreds of megabytes). External entities and DTDs are never loaded,
and the drawing commands are capped at `validate.MAX_POINTS` before curves are flattened.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from xml.parsers import expat

import numpy as np

from sketch_env.data.store import SPLITS, DataError
from sketch_env.data.validate import MAX_POINTS, FoundSketch, ImportSummary, OnError, import_sketches

# Real Sketchy files are at most a few hundred kB; refuse anything far larger before parsing it.
MAX_SVG_BYTES = 16 * 2**20
# A cubic curve becomes one point per CURVE_STEP canvas pixels of its control polygon, between 1 and
# MAX_CURVE_POINTS: Sketchy's short mouse-sample curves stay one point each, long curves stay smooth.
CURVE_STEP = 4.0
MAX_CURVE_POINTS = 8

_COMMAND = re.compile(r"([MmLlHhVvCcZzSsQqTtAa])([^MmLlHhVvCcZzSsQqTtAa]*)")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_ARITY = {"m": 2, "l": 2, "h": 1, "v": 1, "c": 6, "z": 0}


def _path_segments(d: str, where: str, stroke0: int, starts: list, segments: list) -> int:
    """Parse one path's `d` attribute, appending to `starts` and `segments`; returns the next stroke id.

    starts:   one (x, y) per subpath (stroke), in absolute canvas pixels.
    segments: one (stroke, p0x, p0y, c1x, c1y, c2x, c2y, p3x, p3y, is_curve) per drawing command; a
              line is stored as a cubic whose control points are its end points.
    """
    if d.strip() and not _COMMAND.match(d.strip()):
        raise DataError(f"{where}: path data must start with a command, got {d.strip()[:20]!r}")
    stroke = stroke0 - 1
    cx = cy = sx = sy = 0.0
    for letter, args in _COMMAND.findall(d):
        op = letter.lower()
        if op not in _ARITY:
            raise DataError(f"{where}: path command {letter!r} is not supported (only M, L, H, V, C, Z and lower case)")
        if _NUMBER.sub(" ", args).strip(" ,\t\r\n"):
            raise DataError(f"{where}: cannot read the numbers after path command {letter!r}: {args.strip()[:40]!r}")
        nums = [float(v) for v in _NUMBER.findall(args)]
        arity = _ARITY[op]
        if op == "z":
            if nums:
                raise DataError(f"{where}: path command {letter!r} takes no numbers, got {len(nums)}")
            if stroke < stroke0:
                raise DataError(f"{where}: path data must start with a moveto (M or m)")
            if (cx, cy) != (sx, sy):
                segments.append((stroke, cx, cy, cx, cy, sx, sy, sx, sy, False))
            cx, cy = sx, sy
            continue
        if not nums or len(nums) % arity:
            raise DataError(f"{where}: path command {letter!r} needs a multiple of {arity} numbers, got {len(nums)}")
        for j in range(0, len(nums), arity):
            a = nums[j : j + arity]
            ox, oy = (cx, cy) if letter.islower() else (0.0, 0.0)
            if op == "m" and j == 0:
                stroke += 1
                cx, cy = sx, sy = ox + a[0], oy + a[1]
                starts.append((sx, sy))
                continue
            if stroke < stroke0:
                raise DataError(f"{where}: path data must start with a moveto (M or m)")
            if op in ("m", "l"):  # coordinates repeated after a moveto are line-tos
                px, py = ox + a[0], oy + a[1]
                segments.append((stroke, cx, cy, cx, cy, px, py, px, py, False))
            elif op == "h":
                px, py = ox + a[0], cy
                segments.append((stroke, cx, cy, cx, cy, px, py, px, py, False))
            elif op == "v":
                px, py = cx, oy + a[0]
                segments.append((stroke, cx, cy, cx, cy, px, py, px, py, False))
            else:
                px, py = ox + a[4], oy + a[5]
                segments.append((stroke, cx, cy, ox + a[0], oy + a[1], ox + a[2], oy + a[3], px, py, True))
            cx, cy = px, py
        if len(segments) + len(starts) > MAX_POINTS:
            raise DataError(f"{where}: more than the {MAX_POINTS} points a sketch may have")
    return stroke + 1


def _flatten(starts: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Strokes as one (n, 3) array of x, y, pen: each stroke's start point, then its segments' points.

    starts: (S, 2); segments: (G, 10) as in `_path_segments`. Curve j gives n_j points B(k / n_j),
    k = 1..n_j, lines give their end point; all curves are evaluated in one batch.
    """
    stroke = segments[:, 0].astype(np.int64)
    p0, c1, c2, p3 = segments[:, 1:3], segments[:, 3:5], segments[:, 5:7], segments[:, 7:9]
    polygon = (
        np.linalg.norm(c1 - p0, axis=1) + np.linalg.norm(c2 - c1, axis=1) + np.linalg.norm(p3 - c2, axis=1)
    )
    n = np.where(segments[:, 9] > 0, np.clip(np.ceil(polygon / CURVE_STEP), 1, MAX_CURVE_POINTS), 1).astype(np.int64)
    seg = np.repeat(np.arange(len(segments)), n)
    first = np.cumsum(n) - n
    t = ((np.arange(len(seg)) - first[seg] + 1) / n[seg])[:, None]
    u = 1.0 - t
    curve_xy = u**3 * p0[seg] + 3 * u**2 * t * c1[seg] + 3 * u * t**2 * c2[seg] + t**3 * p3[seg]
    # Stable sort by stroke puts each stroke's start point (listed first) before its segments' points.
    xy = np.concatenate([starts, curve_xy])
    owner = np.concatenate([np.arange(len(starts)), stroke[seg]])
    order = np.argsort(owner, kind="stable")
    points = np.zeros((len(xy), 3))
    points[:, :2] = xy[order]
    points[np.cumsum(np.bincount(owner, minlength=len(starts))) - 1, 2] = 1.0
    return points


def _length(value: str | None, what: str, where: str) -> float:
    try:
        return float(re.sub(r"px$", "", (value or "").strip()))
    except ValueError:
        raise DataError(f"{where}: the <svg> element needs a numeric {what} attribute, got {value!r}") from None


class _EntityDeclared(Exception):
    pass


def _refuse_entity(name, *args) -> None:
    raise _EntityDeclared(name)


def _read_elements(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Every element of an XML file in document order: (local tag name, attributes); root first.

    Read with expat: an entity declaration (internal or external) stops the parse before it is
    used, and no external DTD or entity is ever fetched.
    """
    elements: list[tuple[str, dict[str, str]]] = []
    parser = expat.ParserCreate(namespace_separator="}")
    parser.EntityDeclHandler = _refuse_entity
    parser.UnparsedEntityDeclHandler = _refuse_entity
    parser.StartElementHandler = lambda tag, attrs: elements.append((tag.rsplit("}", 1)[-1], attrs))
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except _EntityDeclared as e:
        raise DataError(f"{path}: the document declares the entity {e.args[0]!r}; SVG sketches with entity declarations are refused") from None
    except expat.ExpatError as e:
        raise DataError(f"{path}: not well-formed XML ({e})") from None
    if not elements:
        raise DataError(f"{path}: not well-formed XML (no element)")
    return elements


def parse_sketchy_svg(path: str | Path) -> tuple[np.ndarray, float, float]:
    """Read one Sketchy SVG: ((n, 3) points x, y in canvas pixels and pen flag, canvas_w, canvas_h).

    Every `<path>` is a stroke (every subpath, if a path has several movetos), in document order.
    """
    path = Path(path)
    size = path.stat().st_size if path.is_file() else None
    if size is None:
        raise DataError(f"{path}: SVG file not found")
    if size > MAX_SVG_BYTES:
        raise DataError(f"{path}: {size} bytes, more than the {MAX_SVG_BYTES} an SVG sketch may have")
    elements = _read_elements(path)
    tag, root = elements[0]
    if tag != "svg":
        raise DataError(f"{path}: the root element is <{tag}>, expected <svg>")
    canvas_w = _length(root.get("width"), "width", path)
    canvas_h = _length(root.get("height"), "height", path)
    if any(attrs.get("transform") for _, attrs in elements):
        raise DataError(f"{path}: transform attributes are not supported in sketch SVGs")
    starts: list[tuple[float, float]] = []
    segments: list[tuple] = []
    n_strokes = 0
    for i, (_, attrs) in enumerate(e for e in elements if e[0] == "path"):
        n_strokes = _path_segments(attrs.get("d", ""), f"{path}: <path> {i + 1}", n_strokes, starts, segments)
    if not starts:
        return np.zeros((0, 3)), canvas_w, canvas_h
    return _flatten(np.array(starts, np.float64), np.array(segments, np.float64).reshape(-1, 10)), canvas_w, canvas_h


def import_sketchy(
    svg_dir: str | Path,
    photos_dir: str | Path,
    out: str | Path,
    split: str = "train",
    on_error: OnError = "skip",
    force: bool = False,
) -> ImportSummary:
    """Import the Sketchy SVGs of `svg_dir` and their photos into the data-set directory `out`.

    File PHOTO-DRAWER.svg is sketch PHOTO-DRAWER of photo PHOTO (PHOTO.jpg or .png in `photos_dir`)
    by drawer DRAWER (everything after the last '-', non-empty). All sketches and their photos go to
    `split`, "train" or "test" (the stored splits; "val" is carved out of "train" when read). Bad
    sketches are skipped and reported, or raise. `out` is checked before anything is read
    (`import_sketches`: `force` to replace other work, never the inputs).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: a data set stores {SPLITS} (val is 20% of train, chosen when read)")
    svg_dir = Path(svg_dir)
    if not svg_dir.is_dir():
        raise DataError(f"{svg_dir}: SVG directory not found")
    files = sorted(svg_dir.glob("*.svg"))
    if not files:
        raise DataError(f"{svg_dir}: no .svg files")
    summary = ImportSummary(on_error=on_error)
    found: list[FoundSketch] = []
    for f in files:
        photo, _, drawer = f.stem.rpartition("-")
        if not photo or not drawer:
            summary.reject(f, f.stem, f"sketch {f.stem}: file name is not of the form PHOTO-DRAWER.svg")
            continue
        found.append(FoundSketch(f.stem, f, f.stem, photo, split, drawer, partial(parse_sketchy_svg, f)))
    return import_sketches(found, summary, photos_dir, out, svg_dir, name=svg_dir.parent.name or svg_dir.name,
                           source=f"sketchy:{svg_dir}", inputs=(svg_dir, photos_dir), force=force)
