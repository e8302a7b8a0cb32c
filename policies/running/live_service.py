"""The engine of `darp serve` (tune_runs/serve.py: what the page shows, the endpoints, the load it takes): the live
app on Ray Serve.

`serve_until_interrupted` checks what a replica will load (`check`, `check_port`: one-line errors before Ray
starts), starts Ray (`start_ray`), deploys `LiveDeployment` (`deploy`: each replica loads the run, the data set and
`policies.running.live_app.build_app` once) and serves until SIGINT or SIGTERM, then shuts Serve and Ray down
(`stop_ray`); `start` checks, starts and deploys without blocking. In a replica, `Batcher` answers the drawers in
flight through shared batched rounds of `policies.darp.rollout.LiveRetrieval` (Ray Serve's `@serve.batch`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from ray import serve

from policies.darp.rollout import STOP_AT, Drawing, LiveRetrieval
from policies.running.live_app import build_app, shard_images
from policies.running.trained import live_retrieval, load_module, read_darp_run
from sketch_env.data import load_dataset, read_manifest, select_split
from sketch_env.errors import ConfigError, DataError
from sketch_env.options import arg

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
    num_replicas: int = arg(1, "Ray Serve replicas of the deployment (each holds its own cache; 1 suits 2 cores)")
    cache_size: int = arg(4096, "recurrent states each replica keeps for incremental queries")
    max_batch: int = arg(64, "most drawers one batched policy level or ranking pass serves")
    batch_wait_ms: float = arg(2.0, "how long a batch waits for more drawers once the first one is in")
    max_ongoing_requests: int = arg(256, "requests a replica takes at once (more wait in the proxy)")
    stop_confidence: float = arg(STOP_AT, "the page says \"you can stop\" (and marks the stroke) once the run's "
                                          "calibrated P(top-1 right) reaches this (RUN/calibration.json)")
    gallery: Path | None = arg(None, "serve the photos of these Parquet shards (darp embed-photos) instead of the split's; "
                                     "above the exact-search crossover their saved index serves the top 10")


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


def serve_until_interrupted(cfg: ServeConfig) -> None:
    """Check, start Ray, deploy and serve until SIGINT (Ctrl-C) or SIGTERM, then shut Serve and Ray down."""
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
