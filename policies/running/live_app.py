"""The web app of live retrieval (`darp serve`): the page (static/), its photos and the JSON API, in Starlette.

`build_app` serves the page, thumbnails (`shard_images` for photos of a gallery of shards the data set does not
hold), the gallery listing, replays of data-set sketches and the queries: `strokes_to_points` checks a request's
strokes and scales them as data sets store sketches; the answer comes from a function it is given (the Ray Serve
deployment passes `policies.running.live_service.Batcher.query`; by default `LiveRetrieval.query` in a worker
thread). A refused request is a `BadRequest`: a 4xx with {"error": message}. Nothing here needs Ray Serve (tests
drive the app with Starlette's TestClient).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from policies.darp.rollout import LiveRetrieval
from sketch_env.data import Dataset, encode_png
from sketch_env.data.validate import OUTSIDE_MARGIN, normalise_sketch
from sketch_env.geometry import join_strokes, split_strokes, unit_to_canvas

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 1 << 20
MAX_CANVAS = 10_000.0  # largest canvas side in pixels a request may claim
THUMBNAIL_SIZE = 128
THUMBNAIL_CACHE = 1024  # PNG thumbnails kept in memory (about 20 KB each)
MAX_LISTED = 2000  # gallery photos /api/gallery lists (the page's picker) for a gallery of shards

Answer = Callable[[np.ndarray, "str | None"], Awaitable[dict]]


class BadRequest(Exception):
    """A request the server refuses: HTTP `status` (4xx) and a message for the person or program."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def strokes_to_points(strokes, canvas, max_strokes: int, max_points: int) -> np.ndarray:
    """JSON strokes [[[x, y], ...], ...] on a w x h canvas (pixels, y down) -> (P, 3) points in [0, 1].

    The canvas is scaled by its longer side and centred, as data sets store sketches
    (`normalise_sketch`); points slightly off the canvas are clipped onto it. Raises BadRequest.
    """
    w, h = _canvas(canvas)
    if not isinstance(strokes, list) or not strokes:
        raise BadRequest(400, "'strokes' must be a non-empty list of strokes, each a list of [x, y] points")
    if len(strokes) > max_strokes:
        raise BadRequest(413, f"{len(strokes)} strokes in one request; this server takes at most {max_strokes}")
    arrays = []
    total = 0
    for i, stroke in enumerate(strokes):
        if not isinstance(stroke, list) or not stroke:
            raise BadRequest(400, f"stroke {i} must be a non-empty list of [x, y] points")
        total += len(stroke)
        if total > max_points:
            raise BadRequest(413, f"more than {max_points} points in one request; this server takes at most {max_points}")
        try:
            xy = np.array(stroke)
        except ValueError:
            xy = np.zeros(0)  # ragged: reported below
        if xy.ndim != 2 or xy.shape[1] != 2 or xy.dtype.kind not in "if":
            raise BadRequest(400, f"stroke {i} must be a list of [x, y] number pairs, e.g. [[10, 20], [12, 25]]")
        arrays.append(xy.astype(np.float64))
    points = join_strokes(arrays)
    xy = points[:, :2]
    if not np.isfinite(xy).all():
        raise BadRequest(400, "stroke coordinates must be finite numbers")
    margin = OUTSIDE_MARGIN * np.array([w, h])
    if (xy < -margin).any() or (xy > np.array([w, h]) + margin).any():
        raise BadRequest(
            400, f"points lie more than {OUTSIDE_MARGIN:.0%} beyond the {w:g}x{h:g} canvas "
            f"(x in [{xy[:, 0].min():g}, {xy[:, 0].max():g}], y in [{xy[:, 1].min():g}, {xy[:, 1].max():g}])"
        )
    return normalise_sketch(points, w, h)


def _canvas(canvas) -> tuple[float, float]:
    numbers = isinstance(canvas, list) and len(canvas) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in canvas
    )
    if not numbers or not all(0 < v <= MAX_CANVAS for v in canvas):  # NaN fails the comparison too
        raise BadRequest(400, f"'canvas' must be [width, height] in pixels, each in (0, {MAX_CANVAS:g}], got {canvas!r:.80}")
    return float(canvas[0]), float(canvas[1])


def build_app(retrieval: LiveRetrieval, split: Dataset, answer: Answer | None = None,
              max_strokes: int = 200, max_points: int = 5000, images: Callable[[str], bytes | None] | None = None):
    """The Starlette app of the page and the API over the sketches/photos of `split`.

    answer: how a checked drawing is answered, (points (P, 3), target or None) -> `LiveRetrieval.answer`'s
    dict; default `retrieval.query` in a worker thread (`Batcher.query` batches concurrent requests).
    images: the encoded image of a gallery photo that `split` does not hold (a gallery of shards:
    `shard_images`), or None where there is none.
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    if answer is None:
        answer = functools.partial(run_in_threadpool, retrieval.query)
    photo_row = split.photos.index_of()
    sketch_row = {s: i for i, s in enumerate(split.sketches.sketch_id)}
    strokes = np.add.reduceat(split.sketches.points[:, 2], split.sketches.offsets[:-1]) if len(split.sketches) else []
    gallery_ids = retrieval.gallery.photo_ids
    if len(gallery_ids) > MAX_LISTED:  # a gallery of shards: the split's photos it holds first
        held = [p for p in split.photos.photo_id if p in retrieval.gallery][:MAX_LISTED]
        seen = set(held)
        gallery_ids = held + [p for p in gallery_ids[:MAX_LISTED] if p not in seen][: MAX_LISTED - len(held)]
    listing = {
        "photo_ids": [str(p) for p in gallery_ids],
        "sketches": [{"sketch_id": str(s), "photo_id": str(p), "n_strokes": int(n)}
                     for s, p, n in zip(split.sketches.sketch_id, split.sketches.photo_id, strokes)],
        "n_glimpses": retrieval.config.n_glimpses,
    }

    @functools.lru_cache(maxsize=THUMBNAIL_CACHE)
    def thumbnail(row: int) -> bytes:
        return encode_png(split.photos.decode(row, THUMBNAIL_SIZE))

    @functools.lru_cache(maxsize=THUMBNAIL_CACHE)
    def other_thumbnail(photo_id: str) -> bytes | None:
        from sketch_env.data import PhotoSet

        data = images(photo_id) if images is not None else None
        if data is None:
            return None
        return encode_png(PhotoSet(np.array([photo_id], dtype=object), np.array(["?"], dtype=object), [data]).decode(0, THUMBNAIL_SIZE))

    async def index(request: Request):
        return FileResponse(STATIC_DIR / "index.html")

    async def gallery(request: Request):
        return JSONResponse(listing)

    async def photo(request: Request):
        photo_id = request.path_params["photo_id"]
        if photo_id in photo_row:
            png = await run_in_threadpool(thumbnail, photo_row[photo_id])
        elif images is not None and photo_id in retrieval.gallery:
            png = await run_in_threadpool(other_thumbnail, photo_id)
            if png is None:
                raise BadRequest(404, f"photo {photo_id!r} is in the gallery but its image cannot be reached here")
        else:
            raise BadRequest(404, f"no photo {photo_id!r} in the gallery")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def query(request: Request):
        started = time.perf_counter()
        body = await _json_object(request)
        points = strokes_to_points(body.get("strokes"), body.get("canvas"), max_strokes, max_points)
        target = body.get("target")
        if target is not None and (not isinstance(target, str) or target not in photo_row):
            raise BadRequest(422, f"unknown target photo {target!r}: pick one of the {len(photo_row)} gallery photos")
        result = await answer(points, target)
        w, h = _canvas(body["canvas"])
        return JSONResponse({
            "top10": [{"photo_id": str(p), "rank": r, "distance": d} for p, r, d in result["top"]],
            "glimpses": unit_to_canvas(result["glimpses"], w, h).round(2).tolist(),
            "glimpse_sides": (np.asarray(result["glimpse_sides"]) * max(w, h)).round(2).tolist(),
            "target": target,
            "target_rank": result["target_rank"],
            "target_ranks": result["target_ranks"],
            "level": result["level"],
            "n_strokes": result["n_strokes"],
            "confidence": None if result["confidence"] is None else
            {"top1": round(result["confidence"][0], 4), "top5": round(result["confidence"][1], 4)},
            "confidences": None if result["confidences"] is None else [round(p, 4) for p in result["confidences"]],
            "stop_stroke": result["stop_stroke"],
            "stop_at": retrieval.stop_at,
            "n_points": len(points),
            "gallery_size": len(retrieval.gallery),
            "latency_ms": round(1000 * (time.perf_counter() - started), 2),
        })

    async def replay(request: Request):
        body = await _json_object(request)
        sketch_id = body.get("sketch_id")
        if not isinstance(sketch_id, str) or sketch_id not in sketch_row:
            raise BadRequest(404, f"no sketch {sketch_id!r} in this split ({len(sketch_row)} sketches; see /api/gallery)")
        i = sketch_row[sketch_id]
        strokes = [s.tolist() for s in split_strokes(split.sketches.sketch(i))]
        return JSONResponse({"sketch_id": sketch_id, "photo_id": str(split.sketches.photo_id[i]), "strokes": strokes})

    async def refused(request: Request, exc: BadRequest):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"}, status_code=exc.status_code)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/photos/{photo_id:path}", photo),
            Route("/api/gallery", gallery),
            Route("/api/query", query, methods=["POST"]),
            Route("/api/replay", replay, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={BadRequest: refused, HTTPException: http_error},
    )


async def _json_object(request) -> dict:
    """The request body as a JSON object, refusing bodies over MAX_BODY_BYTES before reading them whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(413, f"request body of {int(declared)} bytes; the limit is {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(413, f"request body over the limit of {MAX_BODY_BYTES} bytes")
    try:
        payload = json.loads(bytes(body), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"request body is not valid JSON ({e})") from None
    except RecursionError:
        raise BadRequest(400, "request body nests JSON arrays or objects too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, f"request body must be a JSON object, got {type(payload).__name__}")
    return payload


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def shard_images(gallery_dir: str | Path) -> Callable[[str], bytes | None]:
    """photo id -> its encoded image, for the shards of `darp embed-photos` made from a directory of
    image files that this machine reaches (None for other photos, or other sources)."""
    import pyarrow.parquet as pq

    from sketch_env.photo_shards import SHARDS_DIR, load_photo_shards_meta

    meta = load_photo_shards_meta(gallery_dir)
    root = Path(meta.get("source", {}).get("path", ""))
    if meta.get("source", {}).get("kind") != "directory" or not root.is_dir():
        return lambda photo_id: None
    sources = {}
    for shard in meta["shards"]:
        table = pq.read_table(Path(gallery_dir) / SHARDS_DIR / shard["file"], columns=["photo_id", "source"])
        sources.update(zip(table.column("photo_id").to_pylist(), table.column("source").to_pylist()))
    base = root.resolve()

    def read(photo_id: str) -> bytes | None:
        if photo_id not in sources:
            return None
        path = (base / sources[photo_id]).resolve()
        return path.read_bytes() if base in path.parents and path.is_file() else None

    return read
