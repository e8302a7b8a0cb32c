"""`darp serve`: live on-the-fly retrieval in the browser, on Ray Serve (the HTTP side).

A person draws on the page (policies/running/static/); after every stroke the page sends all strokes so
far and the server answers with the top-10 photos, where the policy looked, and the rank of a target
photo the person picked. The retrieval itself is `policies.darp.rollout.LiveRetrieval` (one level per
new stroke, cached by stroke prefix, so answers depend only on the strokes sent); this module parses
and checks requests, batches concurrent drawers, and deploys the app on Ray Serve.

Under load (`Batcher`, Ray Serve's `@serve.batch`) the requests in flight share batched rounds: one
policy level (rendering, the phase-1 embedding and the G glimpses of every drawer's new partial
sketch in one pass), then one ranking pass for the drawings it finished. A request whose strokes the
replica has not seen (a long drawing sent at once, or a replica that has not seen the earlier
strokes) is replayed one level per round beside everyone else's new strokes, so it costs the others
one row of a batch, not a stall; `--max-strokes` and `--max-points` bound a request (413 beyond).
Each replica keeps its own cache; `--num-replicas` adds replicas where cores allow (a drawer's next
stroke may then reach a replica that replays the earlier ones).

    darp serve --data runs/data/chairv2 --run runs/darp [--port 8000] [--split val]

Endpoints: GET / (the page), GET /photos/{photo_id} (PNG thumbnail), GET /api/gallery (photo and
sketch ids), POST /api/query {"strokes": [[[x, y], ...], ...], "canvas": [w, h], "target": id?} (the answer also
carries the run's calibrated confidence after each stroke and the stroke where it says "you can stop"),
POST /api/replay {"sketch_id": id} (a data-set sketch's strokes, x and y in [0, 1]). Bad requests
get a 4xx with {"error": message}. SIGINT (Ctrl-C) or SIGTERM stops Serve and Ray.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from ray import serve

from policies.darp.rollout import STOP_AT, Drawing, LiveRetrieval
from sketch_env.data import DataError, Dataset, encode_png, load_dataset, read_manifest, select_split
from sketch_env.data.validate import OUTSIDE_MARGIN, normalise_sketch
from sketch_env.errors import ConfigError
from sketch_env.geometry import join_strokes, split_strokes, unit_to_canvas
from sketch_env.options import arg
from policies.running.trained import live_retrieval, load_module, read_darp_run

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 1 << 20
MAX_CANVAS = 10_000.0  # largest canvas side in pixels a request may claim
THUMBNAIL_SIZE = 128
THUMBNAIL_CACHE = 1024  # PNG thumbnails kept in memory (about 20 KB each)
MAX_LISTED = 2000  # gallery photos /api/gallery lists (the page's picker) for a gallery of shards
APP_NAME = "darp-live"

Answer = Callable[[np.ndarray, "str | None"], Awaitable[dict]]


@dataclass
class ServeConfig:
    """Live on-the-fly retrieval in the browser: draw, and watch the ranking update stroke by stroke."""

    data: Path = arg(help="data set directory (gallery photos and the sketches the replay mode plays)")
    run: Path = arg(help="DARP run directory (darp train); its phase-1 run gives the embeddings")
    split: Literal["train", "val", "test", "train+val", "all"] = arg("val", "split whose photos are the gallery")
    host: str = arg("127.0.0.1", "address the HTTP proxy listens on")
    port: int = arg(8000, "HTTP port")
    max_strokes: int = arg(200, "most strokes one request may hold")
    max_points: int = arg(5000, "most points (all strokes together) one request may hold")
    num_threads: int = arg(1, "torch CPU threads (and Ray CPUs) of each replica")
    num_replicas: int = arg(1, "Ray Serve replicas of the deployment (each holds its own cache; 1 suits 2 cores)")
    cache_size: int = arg(4096, "recurrent states each replica keeps for incremental queries")
    max_batch: int = arg(64, "most drawers one batched policy level or ranking pass serves")
    batch_wait_ms: float = arg(2.0, "how long a batch waits for more drawers once the first one is in")
    max_ongoing_requests: int = arg(256, "requests a replica takes at once (more wait in the proxy)")
    stop_confidence: float = arg(STOP_AT, "the page says \"you can stop\" (and marks the stroke) once the run's "
                                          "calibrated P(top-1 right) reaches this (RUN/calibration.json)")
    gallery: Path | None = arg(None, "serve the photos of these Parquet shards (darp embed-photos) instead of the split's; "
                                     "above the exact-search crossover their saved index serves the top 10")


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


class Batcher:
    """Answers concurrent drawings through shared batches (Ray Serve's `@serve.batch`).

    `query` runs in the replica's event loop: it finds the drawing's cached levels, then takes one
    place per uncached stroke in a batched round (`LiveRetrieval.step`: one policy level for every
    drawing in the round, then one ranking pass for those it finished). A round runs in the event
    loop (Serve runs it apart from the replica's own loop, which keeps receiving requests); the
    requests that arrive meanwhile make up the next round.
    """

    def __init__(self, retrieval: LiveRetrieval, max_batch: int = 64, batch_wait_ms: float = 2.0):
        self.retrieval = retrieval
        self._running: dict[bytes, asyncio.Future] = {}  # levels being computed, by cache key

        async def step(drawings: list[Drawing]) -> list[dict | None]:
            # in the replica's event loop, not a worker thread: a thread computing rounds holds the
            # GIL so much that requests reach the batch queue one per round (measured: batches of 1)
            return retrieval.step(drawings)

        # batched here, not as a decorated method: serve.batch keeps one queue per decorated function
        self._step = serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_ms / 1000)(step)

    async def query(self, points: np.ndarray, target: str | None) -> dict:
        """The answer for one drawing (see `LiveRetrieval.answer`).

        A level that another request is computing right now (the page sends the next stroke before
        the last answer is back) is waited for, not computed twice.
        """
        drawing = self.retrieval.start(points, target)
        while True:
            key = drawing.keys[len(drawing.levels)] if drawing.pending else None
            if key in self._running:
                level = await asyncio.shield(self._running[key])
                if level is not None:  # None: that request failed; compute it here
                    drawing.levels.append(level)
                continue
            if key is None:
                return await self._step(drawing)
            n = len(drawing.levels)
            self._running[key] = computed = asyncio.get_running_loop().create_future()
            try:
                answer = await self._step(drawing)
            finally:
                del self._running[key]
                computed.set_result(drawing.levels[n] if len(drawing.levels) > n else None)
            if answer is not None:
                return answer


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


@serve.deployment(name=APP_NAME)
@serve.ingress()
class LiveDeployment:
    """One replica: the run, the data set, the batcher and the app, loaded once when the replica starts."""

    def __init__(self, cfg: ServeConfig):
        import torch

        torch.set_num_threads(cfg.num_threads)
        split = select_split(load_dataset(cfg.data), cfg.split)
        retrieval = live_retrieval(cfg.run, split, cfg.cache_size, cfg.stop_confidence, cfg.gallery)
        batcher = Batcher(retrieval, cfg.max_batch, cfg.batch_wait_ms)
        images = shard_images(cfg.gallery) if cfg.gallery is not None else None
        self._app = build_app(retrieval, split, batcher.query, cfg.max_strokes, cfg.max_points, images)

    def __serve_build_asgi_app__(self):
        return self._app


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


def check_port(host: str, port: int) -> None:
    """DataError naming the port when the server could not listen on host:port (another server has it,
    or the address is not this machine's): said here, not by a Ray Serve traceback after Ray started."""
    import socket

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in [1, 65535], got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):  # SO_REUSEADDR, as the proxy listens
            pass
    except OSError as e:
        raise DataError(f"--host {host} --port {port}: cannot listen there ({os.strerror(e.errno) if e.errno else e}); "
                        "is another server running on it? choose another --port") from None


def check(cfg: ServeConfig) -> None:
    """Load what a replica will load, in this process, so that a bad data set or run fails here with
    a one-line error naming the file (before Ray starts) rather than inside a replica."""
    from policies.phase1.embedding import load_embedding_net

    from policies.running.runs import load_run_confidence

    if not 0.0 < cfg.stop_confidence <= 1.0:
        raise ConfigError(f"--stop-confidence must be in (0, 1], got {cfg.stop_confidence}")

    counts = (cfg.max_strokes, cfg.max_points, cfg.num_threads, cfg.num_replicas, cfg.cache_size, cfg.max_batch,
              cfg.max_ongoing_requests)
    if min(counts) < 1 or not cfg.batch_wait_ms >= 0:
        raise ConfigError("--max-strokes, --max-points, --num-threads, --num-replicas, --cache-size, --max-batch and "
                          f"--max-ongoing-requests must be >= 1 and --batch-wait-ms >= 0, got {counts} and {cfg.batch_wait_ms}")
    check_port(cfg.host, cfg.port)
    read_manifest(cfg.data)
    run = read_darp_run(cfg.run)
    if cfg.gallery is not None:
        from sketch_env.photo_shards import load_photo_shards_meta

        load_photo_shards_meta(cfg.gallery)
    load_module(cfg.run)
    load_run_confidence(cfg.run)
    try:
        load_embedding_net(run["embedding"])
    except FileNotFoundError as e:
        raise DataError(str(e)) from None


def deploy(cfg: ServeConfig) -> str:
    """Deploy the app on the running Ray instance and return its URL; does not block."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    deployment = LiveDeployment.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_threads},
    )
    serve.run(deployment.bind(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}/"


def start(cfg: ServeConfig) -> str:
    """Check the inputs, start Ray if it is not up and deploy: the app's URL (does not block)."""
    check(cfg)
    start_ray()
    return deploy(cfg)


def start_ray() -> bool:
    """Start a local Ray instance for the server unless one is up (`policies.running.ray_session.init_ray`, no
    dashboard); True if started here.

    Ray runs its workers 15 nice levels below the driver by default, which on a busy machine makes
    the replica the first process the kernel starves: the server's workers keep the driver's
    priority instead. ray.init installs its own SIGTERM handler, which ends the process without
    shutting Ray down (its agents outlive it); the handler that was there before comes back.
    """
    from policies.running.ray_session import init_ray

    os.environ.setdefault("RAY_worker_niceness", "0")
    handler = signal.getsignal(signal.SIGTERM)
    started = init_ray()
    signal.signal(signal.SIGTERM, handler)
    return started


def stop_ray() -> None:
    """Shut Serve and the Ray instance down; Ray processes that outlive the shutdown are killed
    (`policies.running.ray_session.shutdown_ray`)."""
    import ray

    from policies.running.ray_session import shutdown_ray

    if ray.is_initialized():
        serve.shutdown()
        shutdown_ray()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(cfg: ServeConfig) -> int:
    """Serve until SIGINT (Ctrl-C) or SIGTERM, then shut Serve and Ray down."""
    check(cfg)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = False
    try:
        started = start_ray()
        url = deploy(cfg)
        print(f"darp serve: open {url} in a browser (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("darp serve: stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        if started:
            stop_ray()
    return 0
