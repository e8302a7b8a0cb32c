"""`darp serve`: live on-the-fly retrieval in the browser, on Ray Serve.

A person draws on the page (tune_runs/static/); after every stroke the page sends all strokes so
far and the server answers with the top-10 photos, where the policy looked, and the rank of a target
photo the person picked. The app is a plain Starlette (ASGI) app inside one Ray Serve deployment,
so the same deployment scales out to more replicas on a cluster (`--num-replicas`).

How a drawing becomes a DARP episode (`LiveRetriever`): the partial sketch after stroke k + 1 (the
first k + 1 strokes) is episode level min(k, 16); at each level the policy takes the run's G glimpses
on that partial sketch, rendered as `darp evaluate`'s environment renders it, with the phase-1
network's embedding of the same partial sketch, carrying its recurrent state from level to level;
the query after a level's last glimpse is ranked against the gallery (`sketch_env.gallery`). A
drawing with more than 17 strokes stays at level 16. `LiveRetriever.episode` takes any cut of the
point sequence into partial sketches: with `render.level_cut_points` it is exactly the episode
`darp evaluate` steps, which is how the tests tie the live path to the evaluation.

Every answer depends only on the strokes sent (no sessions): the state after each partial sketch
is cached under a hash of the points up to it, so a new stroke costs one level (G policy steps and
one phase-1 embedding); a replica that has not seen the earlier strokes replays them.

    darp serve --data runs/data/chairv2 --run runs/darp [--port 8000] [--split val]

Endpoints: GET / (the page), GET /photos/{photo_id} (PNG thumbnail), GET /api/gallery (photo and
sketch ids), POST /api/query {"strokes": [[[x, y], ...], ...], "canvas": [w, h], "target": id?},
POST /api/replay {"sketch_id": id} (a data-set sketch's strokes, x and y in [0, 1]). Bad requests
get a 4xx with {"error": message}.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from ray.rllib.core.columns import Columns

from policies.embedding import load_embedding_net
from policies.rollout import initial_state
from sketch_env.data import DataError, Dataset, encode_png, load_dataset, read_manifest, select_split
from sketch_env.data.validate import OUTSIDE_MARGIN, normalise_sketch
from sketch_env.embeddings import load_embedding_export
from sketch_env.env import EnvConfig
from sketch_env.gallery import Gallery
from sketch_env.glimpse import GlimpseSensor, integral_image
from sketch_env.render import N_LEVELS, render_points
from tune_runs.cli import arg
from tune_runs.rl_eval import load_module, read_run

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 1 << 20
MAX_CANVAS = 10_000.0  # largest canvas side in pixels a request may claim
TOP_K = 10
THUMBNAIL_SIZE = 128
THUMBNAIL_CACHE = 1024  # PNG thumbnails kept in memory (about 20 KB each)
APP_NAME = "darp-live"


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
    num_replicas: int = arg(1, "Ray Serve replicas of the deployment")
    cache_size: int = arg(4096, "recurrent states each replica keeps for incremental queries")


class BadRequest(Exception):
    """A request the server refuses: HTTP `status` (4xx) and a message for the person or program."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class LevelResult:
    """The policy after one partial sketch: what the next level starts from and what it found.

    state: recurrent state after the level's last glimpse (tensors of batch 1); location: (1, 2)
    where the next glimpse looks; query: (D,) the query after the last glimpse; seen: (G, 2) the
    centres of this level's glimpses, in the sensor's [-1, 1] coordinates.
    """

    state: dict
    location: torch.Tensor
    query: torch.Tensor
    seen: np.ndarray


class LiveRetriever:
    """Partial sketches -> DARP queries ranked against a gallery (see the module docstring).

    module:        a trained DARP RLModule (eval mode); embedding_net: its phase-1 EmbeddingNet;
    gallery:       the photos queries are ranked against; env_config: the run's environment
                   (glimpse geometry, image size, n_glimpses); cache_size: LevelResults kept.
    Thread-safe: queries are served one at a time.
    """

    def __init__(self, module, embedding_net, gallery: Gallery, env_config: EnvConfig, cache_size: int = 4096):
        self.module = module.eval()
        self.net = embedding_net.eval()
        self.gallery = gallery
        self.config = env_config
        self.sensor = GlimpseSensor(env_config.glimpse_size, env_config.n_patches, env_config.patch_scale)
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, LevelResult] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def from_run(run_dir: str | Path, split: Dataset, cache_size: int = 4096) -> LiveRetriever:
        """The retriever of DARP run `run_dir` over the photos of `split` (a `select_split` result).

        The gallery holds the phase-1 export's embeddings of the split's photos, as in `darp evaluate`.
        """
        run = read_darp_run(run_dir)
        if len(split.photos) == 0:
            raise DataError(f"{split.path}: the chosen split has no photos to retrieve")
        export = load_embedding_export(run["embedding"])
        rows = export.photo_index()
        missing = [p for p in split.photos.photo_id if p not in rows]
        if missing:
            raise DataError(
                f"{run['embedding']}: the embedding export has no embedding for {len(missing)} photo(s) of "
                f"{split.path}, e.g. {missing[:3]}; serve the data set the run was trained on"
            )
        gallery = Gallery(export.photo_embedding[[rows[p] for p in split.photos.photo_id]], split.photos.photo_id)
        net, _ = load_embedding_net(run["embedding"])
        env_config = EnvConfig(n_glimpses=run["config"]["n_glimpses"])  # the glimpse geometry of rl_eval.make_env
        return LiveRetriever(load_module(run_dir), net, gallery, env_config, cache_size)

    def query(self, points: np.ndarray, target: str | None = None) -> dict:
        """Rank the gallery for a drawing, one level per stroke.

        points: (P, 3) x, y in [0, 1] (y down) and pen (1 on the last point of each stroke; the last
        point ends a stroke whatever its flag). target: a gallery photo id, or None.
        Returns {"top": [(photo_id, rank, squared distance)] x min(10, N), "glimpses": (G, 2) centres
        and "glimpse_sides": (n_patches,) patch sides, both in the points' [0, 1] units, "level",
        "n_strokes", "target_rank" (int or None) and "target_ranks" (one per stroke, or None)}.
        """
        points = np.asarray(points, np.float32)
        if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
            raise ValueError(f"points must have shape (P, 3) with P >= 1, got {points.shape}")
        ends = np.flatnonzero(points[:-1, 2] == 1) + 1
        cuts = np.append(ends, len(points))
        target_row = None if target is None else self.gallery.index_of([target])
        with self._lock:
            levels = self.episode(points, cuts)
            queries = torch.stack([lv.query for lv in levels])
            k = min(TOP_K, len(self.gallery))
            top, distance = self.gallery.topk(queries[-1:], k)
            top_rank = self.gallery.rank(queries[-1:].expand(k, -1), top[0])
            target_ranks = None
            if target_row is not None:
                target_ranks = self.gallery.rank(queries, target_row.expand(len(levels))).tolist()
        pixel = 1.0 / (self.config.image_size - 1)  # one pixel in [0, 1] units: x maps to x * (size - 1)
        sides = self.config.glimpse_size * self.config.patch_scale ** np.arange(self.config.n_patches)
        return {
            "top": [(self.gallery.photo_ids[i], int(r), float(d)) for i, r, d in zip(top[0].tolist(), top_rank, distance[0])],
            "glimpses": self.sensor_to_unit(levels[-1].seen),
            "glimpse_sides": sides * pixel,
            "level": min(len(levels) - 1, N_LEVELS - 1),
            "n_strokes": len(levels),
            "target_rank": None if target_ranks is None else target_ranks[-1],
            "target_ranks": target_ranks,
        }

    def sensor_to_unit(self, locations: np.ndarray) -> np.ndarray:
        """Sensor locations (..., 2) in [-1, 1] (image edges) -> sketch coordinates in [0, 1].

        The image's edges lie half a pixel beyond the centres of its outer pixels, which are where
        x = 0 and x = 1 are drawn (`render`), so -1 maps to -0.5 / (size - 1).
        """
        size = self.config.image_size
        return ((np.asarray(locations, np.float64) + 1.0) / 2.0 * size - 0.5) / (size - 1)

    def episode(self, points: np.ndarray, cuts: np.ndarray) -> list[LevelResult]:
        """Step the policy through partial sketches points[:cuts[0]], points[:cuts[1]], ...

        points: (P, 3) as in `query`; cuts: (L,) increasing point counts in [1, P]. Partial sketch i
        is level min(i, 16). Call with the lock held (or from one thread). Results come from the
        cache when the same points and cuts were seen before.
        """
        cuts = np.asarray(cuts, np.int64)
        if cuts.ndim != 1 or len(cuts) == 0 or cuts[0] < 1 or cuts[-1] > len(points) or np.any(np.diff(cuts) < 1):
            raise ValueError(f"cuts must be increasing point counts in [1, {len(points)}], got {cuts.tolist()}")
        points = np.ascontiguousarray(points, np.float32)
        levels: list[LevelResult] = []
        key, start = b"", 0
        for i, cut in enumerate(cuts.tolist()):
            key = hashlib.sha256(key + cut.to_bytes(8, "little") + points[start:cut].tobytes()).digest()
            start = cut
            result = self._cache.get(key)
            if result is None:
                result = self.advance(levels[-1] if levels else None, points[:cut], min(i, N_LEVELS - 1))
                self._cache[key] = result
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            levels.append(result)
        return levels

    @torch.inference_mode()
    def advance(self, previous: LevelResult | None, partial: np.ndarray, level: int) -> LevelResult:
        """The policy's G steps on one partial sketch (points (n, 3)) at `level`, from `previous`
        (None: the episode's start). Observations are built as `EpisodeBatch.observation` builds them."""
        image = torch.from_numpy(render_points(partial, self.config.image_size))
        sketch = torch.from_numpy(render_points(partial, self.net.config.image_size))
        embedding = self.net.embed_sketches(sketch[None, None]).clamp(-1.0, 1.0)  # (1, D), in the Box
        integral = integral_image(image[None])
        if previous is None:
            state, location = initial_state(self.module, 1), torch.zeros(1, 2)
        else:
            state, location = previous.state, previous.location
        seen = np.zeros((self.config.n_glimpses, 2), np.float32)
        for g in range(self.config.n_glimpses):
            seen[g] = location[0].numpy()
            obs = {
                "glimpse": self.sensor.from_integral(integral, location).clamp_(0.0, 1.0),
                "location": location,
                "level": torch.tensor([level]),
                "glimpse_index": torch.tensor([g]),
                "sketch_embedding": embedding,
            }
            # = forward_inference, without its switch to eval mode at every call (a tenth of a stroke)
            out = self.module._forward_inference(
                {Columns.OBS: {k: v.unsqueeze(1) for k, v in obs.items()}, Columns.STATE_IN: state}
            )
            state = out[Columns.STATE_OUT]
            location = out[Columns.ACTIONS]["location"][:, 0].clamp(-1.0, 1.0)
            query = out[Columns.ACTIONS]["query"][0, 0].clamp(-1.0, 1.0)
        return LevelResult(state, location, query, seen)


def read_darp_run(run_dir: str | Path) -> dict:
    """run.json of a DARP run (`darp train`); DataError naming the directory for any other run."""
    run = read_run(run_dir)
    if run.get("kind") != "darp" or "embedding" not in run:
        raise DataError(f"{run_dir}: not a DARP run (run.json kind {run.get('kind')!r}); serve a run of `darp train`")
    return run


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
    xy = np.concatenate(arrays)
    if not np.isfinite(xy).all():
        raise BadRequest(400, "stroke coordinates must be finite numbers")
    margin = OUTSIDE_MARGIN * np.array([w, h])
    if (xy < -margin).any() or (xy > np.array([w, h]) + margin).any():
        raise BadRequest(
            400, f"points lie more than {OUTSIDE_MARGIN:.0%} beyond the {w:g}x{h:g} canvas "
            f"(x in [{xy[:, 0].min():g}, {xy[:, 0].max():g}], y in [{xy[:, 1].min():g}, {xy[:, 1].max():g}])"
        )
    pen = np.zeros(len(xy))
    pen[np.cumsum([len(a) for a in arrays]) - 1] = 1.0
    return normalise_sketch(np.column_stack([xy, pen]), w, h)


def _canvas(canvas) -> tuple[float, float]:
    numbers = isinstance(canvas, list) and len(canvas) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in canvas
    )
    if not numbers or not all(0 < v <= MAX_CANVAS for v in canvas):  # NaN fails the comparison too
        raise BadRequest(400, f"'canvas' must be [width, height] in pixels, each in (0, {MAX_CANVAS:g}], got {canvas!r:.80}")
    return float(canvas[0]), float(canvas[1])


def unit_to_canvas(xy: np.ndarray, w: float, h: float) -> np.ndarray:
    """Points (..., 2) in [0, 1] -> canvas pixels of a w x h canvas (the inverse of `normalise_sketch`)."""
    side = max(w, h)
    return np.asarray(xy, np.float64) * side - np.array([(side - w) / 2, (side - h) / 2])


def build_app(retriever: LiveRetriever, split: Dataset, max_strokes: int = 200, max_points: int = 5000):
    """The Starlette app of the page and the API, over `retriever` and the sketches/photos of `split`."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    photo_row = split.photos.index_of()
    sketch_row = {s: i for i, s in enumerate(split.sketches.sketch_id)}
    strokes = np.add.reduceat(split.sketches.points[:, 2], split.sketches.offsets[:-1]) if len(split.sketches) else []
    listing = {
        "photo_ids": [str(p) for p in retriever.gallery.photo_ids],
        "sketches": [{"sketch_id": str(s), "photo_id": str(p), "n_strokes": int(n)}
                     for s, p, n in zip(split.sketches.sketch_id, split.sketches.photo_id, strokes)],
        "n_glimpses": retriever.config.n_glimpses,
    }

    @functools.lru_cache(maxsize=THUMBNAIL_CACHE)
    def thumbnail(row: int) -> bytes:
        return encode_png(split.photos.decode(row, THUMBNAIL_SIZE))

    async def index(request: Request):
        return FileResponse(STATIC_DIR / "index.html")

    async def gallery(request: Request):
        return JSONResponse(listing)

    async def photo(request: Request):
        photo_id = request.path_params["photo_id"]
        if photo_id not in photo_row:
            raise BadRequest(404, f"no photo {photo_id!r} in the gallery")
        png = await run_in_threadpool(thumbnail, photo_row[photo_id])
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def query(request: Request):
        started = time.perf_counter()
        body = await _json_object(request)
        points = strokes_to_points(body.get("strokes"), body.get("canvas"), max_strokes, max_points)
        target = body.get("target")
        if target is not None and (not isinstance(target, str) or target not in photo_row):
            raise BadRequest(422, f"unknown target photo {target!r}: pick one of the {len(photo_row)} gallery photos")
        result = await run_in_threadpool(retriever.query, points, target)
        w, h = _canvas(body["canvas"])
        side = max(w, h)
        return JSONResponse({
            "top10": [{"photo_id": str(p), "rank": r, "distance": d} for p, r, d in result["top"]],
            "glimpses": unit_to_canvas(result["glimpses"], w, h).round(2).tolist(),
            "glimpse_sides": (np.asarray(result["glimpse_sides"]) * side).round(2).tolist(),
            "target": target,
            "target_rank": result["target_rank"],
            "target_ranks": result["target_ranks"],
            "level": result["level"],
            "n_strokes": result["n_strokes"],
            "n_points": len(points),
            "gallery_size": len(retriever.gallery),
            "latency_ms": round(1000 * (time.perf_counter() - started), 2),
        })

    async def replay(request: Request):
        body = await _json_object(request)
        sketch_id = body.get("sketch_id")
        if not isinstance(sketch_id, str) or sketch_id not in sketch_row:
            raise BadRequest(404, f"no sketch {sketch_id!r} in this split ({len(sketch_row)} sketches; see /api/gallery)")
        i = sketch_row[sketch_id]
        points = split.sketches.sketch(i)
        ends = np.flatnonzero(points[:, 2] == 1) + 1
        strokes = [s[:, :2].tolist() for s in np.split(points, ends[:-1])]
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
    if not isinstance(payload, dict):
        raise BadRequest(400, f"request body must be a JSON object, got {type(payload).__name__}")
    return payload


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def load_app(cfg: ServeConfig):
    """Load the run and the data set of `cfg` and build the app (in each Serve replica)."""
    torch.set_num_threads(cfg.num_threads)
    split = select_split(load_dataset(cfg.data), cfg.split)
    retriever = LiveRetriever.from_run(cfg.run, split, cfg.cache_size)
    return build_app(retriever, split, cfg.max_strokes, cfg.max_points)


def _deployment():
    """The Ray Serve deployment class (imported here so that only `darp serve` needs ray[serve])."""
    from ray import serve

    @serve.deployment(name=APP_NAME)
    @serve.ingress()
    class LiveDeployment:
        """One replica: the retriever and the app, built once when the replica starts."""

        def __init__(self, cfg: ServeConfig):
            self._app = load_app(cfg)

        def __serve_build_asgi_app__(self):
            return self._app

    return LiveDeployment


def start(cfg: ServeConfig) -> str:
    """Deploy the app on Ray Serve (starting Ray if needed) and return its URL; does not block."""
    import ray
    from ray import serve

    read_darp_run(cfg.run)  # fail here, with the file named, rather than inside a replica
    read_manifest(cfg.data)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    deployment = _deployment().options(num_replicas=cfg.num_replicas, ray_actor_options={"num_cpus": cfg.num_threads})
    serve.run(deployment.bind(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}/"


def run(cfg: ServeConfig) -> int:
    """Serve until Ctrl-C, then shut Serve and Ray down."""
    import ray
    from ray import serve

    try:
        url = start(cfg)
        print(f"darp serve: open {url} in a browser (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("darp serve: stopping")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    return 0
