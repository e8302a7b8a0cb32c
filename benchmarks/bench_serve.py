"""`darp serve` under load: end-to-end latency measured by concurrent drawing clients.

Each client draws data-set sketches stroke by stroke as the page does: after every stroke it POSTs
all strokes so far (on a 512 x 512 canvas, with the sketch's photo as the target) to /api/query.
Every client shifts its drawings by its own sub-pixel offset, so no two clients send the same
strokes (the server's cache only helps a drawer with its own earlier strokes). Two paces:

- "1/s": a person drawing one stroke per second; requests go out on that schedule whether or not
  the last answer has come (the page does not wait either), so queueing shows in the latency
  instead of slowing the clients down;
- "max": each client sends its next stroke as soon as the last answer arrives (closed loop), which
  measures how many strokes per second the server can answer.

For each number of clients (1, 5, 20, 50) and pace it prints requests/s and the client-side p50,
p95 and p99 latency (from sending the request to the parsed answer) next to the server's own
figure (`latency_ms` in the answer: from the request reaching the app to the answer). The last
row adds clients that replay long drawings the server has never seen (200 strokes each, a cache
miss every time) beside 20 paced drawers, and reports the drawers' latency.

    python benchmarks/bench_serve.py --url http://127.0.0.1:8000/           # a running darp serve
    python benchmarks/bench_serve.py --data DIR --run RUN [--split all]      # starts darp serve itself
    python benchmarks/bench_serve.py                                          # tiny runs in a temp dir

Aim (issue 17): 20 drawers at one stroke per second, p95 <= 150 ms end to end, on 2 cores with a
10,000-photo gallery: `darp data generate --photos 10000 --sketches-per-photo 1`, a phase-1 and a
DARP run with tiny budgets, then `--data DIR --run RUN --split all`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SIDE = 512  # the page's canvas
CLIENTS = (1, 5, 20, 50)
PACES = ("1/s", "max")
LONG_STROKES = 200  # strokes of the uncached long drawings of the last row
REQUEST_TIMEOUT_S = 30.0  # a request still unanswered after this counts as an error (ReadTimeout)


@dataclass
class Cell:
    """What one load level measured."""

    name: str
    latency_ms: list[float] = field(default_factory=list)  # client side, successful requests
    server_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def row(self) -> dict:
        lat, srv = np.array(self.latency_ms), np.array(self.server_ms)
        pct = lambda x, q: float(np.percentile(x, q)) if len(x) else float("nan")  # noqa: E731
        return {
            "load": self.name, "requests": len(lat), "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors), "req_per_s": len(lat) / self.seconds if self.seconds else 0.0,
            "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
            "server_p50_ms": pct(srv, 50), "server_p95_ms": pct(srv, 95),
        }


class Drawings:
    """Data-set sketches as the page sends them: strokes in canvas pixels, and each one's photo."""

    def __init__(self, sketches: list[tuple[list[np.ndarray], str]]):
        self.sketches = sketches

    def strokes(self, client: int, round_: int) -> tuple[list[np.ndarray], str]:
        strokes, photo = self.sketches[(client * 7 + round_) % len(self.sketches)]
        shift = 0.01 * (1 + client) + 1e-4 * round_  # unique per client and round, far below a pixel
        return [s + shift for s in strokes], photo


def long_drawing(seed: int) -> list[np.ndarray]:
    """LONG_STROKES two-point strokes at random, never sent before (a cache miss on every replica)."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(20, SIDE - 20, (2, 2)) for _ in range(LONG_STROKES)]


def body(strokes: list[np.ndarray], target: str | None) -> bytes:
    return json.dumps({"strokes": [np.round(s, 3).tolist() for s in strokes], "canvas": [SIDE, SIDE],
                       "target": target}).encode()


async def post(client, url: str, payload: bytes, cell: Cell | None) -> None:
    start = time.perf_counter()
    try:
        response = await client.post(url, content=payload, headers={"Content-Type": "application/json"})
        answer = response.json()
    except Exception as e:  # timeouts, refused connections, broken bodies: all count as errors
        if cell is not None:
            cell.error(type(e).__name__)
        return
    elapsed = 1000 * (time.perf_counter() - start)
    if cell is None:
        return
    if response.status_code != 200:
        cell.error(f"HTTP {response.status_code}")
        return
    cell.latency_ms.append(elapsed)
    cell.server_ms.append(float(answer.get("latency_ms", float("nan"))))


async def drawer(client, url: str, drawings: Drawings, number: int, pace: str, until: float, cell: Cell) -> None:
    """One client drawing sketch after sketch until `until` (time.perf_counter)."""
    rng = np.random.default_rng(number)
    in_flight: set[asyncio.Task] = set()
    next_send = time.perf_counter() + (rng.uniform(0, 1.0) if pace == "1/s" else 0.0)
    round_ = 0
    while True:
        strokes, photo = drawings.strokes(number, round_)
        round_ += 1
        for k in range(1, len(strokes) + 1):
            if pace == "1/s":
                await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
                if time.perf_counter() >= until:
                    await asyncio.gather(*in_flight)
                    return
                task = asyncio.create_task(post(client, url, body(strokes[:k], photo), cell))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                next_send += 1.0
            else:
                if time.perf_counter() >= until:
                    return
                await post(client, url, body(strokes[:k], photo), cell)


async def replayer(client, url: str, number: int, until: float) -> None:
    """A client sending whole long drawings the server has not seen, back to back."""
    k = 0
    while time.perf_counter() < until:
        await post(client, url, body(long_drawing(1000 * number + k), None), None)
        k += 1


async def measure(url: str, drawings: Drawings, clients: int, pace: str, seconds: float, replayers: int = 0) -> Cell:
    import httpx

    name = f"{clients} x {pace}" + (f" + {replayers} long uncached" if replayers else "")
    cell = Cell(name)
    limits = httpx.Limits(max_connections=4 * (clients + replayers) + 10, max_keepalive_connections=4 * (clients + replayers) + 10)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        start = time.perf_counter()
        until = start + seconds
        jobs = [drawer(client, url + "api/query", drawings, i, pace, until, cell) for i in range(clients)]
        jobs += [replayer(client, url + "api/query", i, until) for i in range(replayers)]
        await asyncio.gather(*jobs)
        cell.seconds = time.perf_counter() - start
    return cell


def fetch_drawings(url: str, n: int) -> tuple[Drawings, int]:
    """n data-set sketches of 3 strokes or more from the server (its replay endpoint), and the gallery size."""
    with urllib.request.urlopen(url + "api/gallery", timeout=60) as response:
        listing = json.loads(response.read())
    chosen = [s for s in listing["sketches"] if s["n_strokes"] >= 3][:n] or listing["sketches"][:n]
    sketches = []
    for s in chosen:
        request = urllib.request.Request(url + "api/replay", data=json.dumps({"sketch_id": s["sketch_id"]}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            replay = json.loads(response.read())
        sketches.append(([np.asarray(st, np.float64) * SIDE for st in replay["strokes"]], replay["photo_id"]))
    return Drawings(sketches), len(listing["photo_ids"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: str, run: str, split: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`darp serve` in a child process; returns it and its URL once the gallery answers."""
    port = free_port()
    command = [sys.executable, "-m", "tune_runs.cli", "serve", "--data", data, "--run", run, "--split", split,
               "--port", str(port), *extra]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"darp serve exited with code {server.returncode}: {' '.join(command)}")
        try:
            with urllib.request.urlopen(url + "api/gallery", timeout=5):
                return server, url
        except OSError:
            time.sleep(1.0)
    server.send_signal(signal.SIGTERM)
    raise SystemExit(f"darp serve did not answer within 600 s: {' '.join(command)}")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def tiny_runs(root: Path, photos: int) -> tuple[str, str]:
    """A generated data set and a phase-1 + DARP run with tiny budgets (latency does not depend on training)."""
    darp = [sys.executable, "-m", "tune_runs.cli"]
    data, phase1, run = root / "data", root / "phase1", root / "darp"
    for command in (
        ["data", "generate", "--out", str(data), "--photos", str(photos), "--sketches-per-photo", "1"],
        ["pretrain", "--data", str(data), "--run-dir", str(phase1), "--epochs", "1", "--time-budget-s", "10"],
        ["train", "--data", str(data), "--embedding", str(phase1), "--run-dir", str(run), "--iterations", "1",
         "--num-envs-per-env-runner", "4", "--episodes-per-batch", "8", "--val-interval", "0"],
    ):
        subprocess.run(darp + command, check=True, stdout=subprocess.DEVNULL)
    return str(data), str(run)


def print_table(rows: list[dict], gallery: int) -> None:
    print(f"\nend to end, measured by the clients (gallery of {gallery} photos, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f})")
    head = f"{'load':34s}{'req':>6s}{'err':>5s}{'req/s':>7s}{'p50':>8s}{'p95':>8s}{'p99':>8s}{'server p50':>12s}{'p95':>7s}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['load']:34s}{r['requests']:6d}{r['errors']:5d}{r['req_per_s']:7.1f}{r['p50_ms']:8.0f}{r['p95_ms']:8.0f}"
              f"{r['p99_ms']:8.0f}{r['server_p50_ms']:12.0f}{r['server_p95_ms']:7.0f}")
    print("latencies in ms; server = the answer's latency_ms (inside the app, without the HTTP proxy and the network)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running darp serve (e.g. http://127.0.0.1:8000/)")
    parser.add_argument("--data", help="data set to serve (with --run: starts darp serve)")
    parser.add_argument("--run", help="DARP run to serve")
    parser.add_argument("--split", default="all", help="gallery split (darp serve --split)")
    parser.add_argument("--serve-args", default="", help="more darp serve flags, e.g. '--num-replicas 2'")
    parser.add_argument("--photos", type=int, default=1000, help="photos of the generated data set when neither --url nor --run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each load level")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    parser.add_argument("--paces", nargs="+", default=list(PACES), choices=PACES)
    parser.add_argument("--long-replayers", type=int, default=4, help="clients replaying long uncached drawings in the last row (0: skip it)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    server, tmp = None, None
    try:
        url = args.url
        if url is None:
            if args.run is None:
                tmp = tempfile.TemporaryDirectory(prefix="bench_serve-")
                print(f"making a {args.photos}-photo data set and tiny runs in {tmp.name} ...", flush=True)
                args.data, args.run = tiny_runs(Path(tmp.name), args.photos)
            server, url = start_server(args.data, args.run, args.split, args.serve_args.split())
        url = url if url.endswith("/") else url + "/"
        drawings, gallery = fetch_drawings(url, 40)
        asyncio.run(measure(url, drawings, 2, "max", 3.0))  # warm-up
        rows = []
        for pace in args.paces:
            for clients in args.clients:
                rows.append(asyncio.run(measure(url, drawings, clients, pace, args.seconds)).row())
                print(f"  {rows[-1]['load']}: p95 {rows[-1]['p95_ms']:.0f} ms, {rows[-1]['req_per_s']:.1f} req/s", flush=True)
        if args.long_replayers:
            rows.append(asyncio.run(measure(url, drawings, 20, "1/s", args.seconds, args.long_replayers)).row())
        print_table(rows, gallery)
        if args.json:
            Path(args.json).write_text(json.dumps({"gallery": gallery, "rows": rows}, indent=1))
    finally:
        if server is not None:
            stop_server(server)
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
