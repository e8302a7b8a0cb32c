"""`darp serve`'s engine and app: the live path against `darp evaluate`, the cache, batching, bad requests.

A tiny phase-1 network (`darp pretrain`, a few seconds) and a tiny DARP run (`darp train`, one
iteration) on a small generated data set are shared by every test of this module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from policies.darp.rollout import LivePolicy, LiveRetrieval
from sketch_env.data import load_dataset, select_split
from sketch_env.data.generate import generate_dataset
from sketch_env.geometry import split_strokes, unit_to_canvas
from sketch_env.render import N_LEVELS, level_cut_points
from tests.rl_fixtures import free_port, make_serve_runs
from policies.running.trained import live_retrieval
from policies.running.live_app import BadRequest, build_app, strokes_to_points

pytestmark = pytest.mark.slow

CANVAS = [512, 512]


def sketch_strokes(points: np.ndarray, side: float) -> list[list[list[float]]]:
    """(P, 3) points in [0, 1] -> JSON strokes in pixels of a side x side canvas."""
    return [(s.astype(np.float64) * side).tolist() for s in split_strokes(points)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("serve")
    data = generate_dataset(root / "data", n_photos=30, sketches_per_photo=2, seed=0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        darp = make_serve_runs(root, data)
    finally:
        ray.shutdown()
    split = select_split(load_dataset(data), "val")
    return data, darp, split


@pytest.fixture(scope="module")
def retriever(setup):
    _, darp, split = setup
    return live_retrieval(darp, split)


@pytest.fixture(scope="module")
def client(setup, retriever):
    from starlette.testclient import TestClient

    _, _, split = setup
    with TestClient(build_app(retriever, split, max_strokes=50, max_points=400)) as c:
        yield c


def test_episode_at_the_evaluation_cuts_is_darp_evaluate(setup, retriever):
    """Cut like `darp evaluate` (17 completion levels), the live path gives its ranks at every level."""
    from policies.running.trained import evaluate_policy_run

    data, darp, split = setup
    evaluated = evaluate_policy_run(darp, data, "val")
    assert list(evaluated["sketch_id"]) == list(split.sketches.sketch_id)
    assert evaluated["n_photos"] == len(retriever.gallery) == len(split.photos)
    live = np.zeros_like(evaluated["ranks"])
    for i in range(len(split.sketches)):
        points = split.sketches.sketch(i)
        levels = retriever.policy.episode(points, level_cut_points(len(points)))
        target = retriever.gallery.index_of([split.sketches.photo_id[i]]).expand(N_LEVELS)
        live[i] = retriever.gallery.rank(torch.stack([lv.query for lv in levels]), target).numpy()
    np.testing.assert_array_equal(live, evaluated["ranks"])
    assert len(np.unique(live)) > 1, "a test over constant ranks could not tell the paths apart"


def test_stroke_by_stroke_costs_one_level_per_stroke_and_equals_a_replay(setup, retriever, monkeypatch):
    _, darp, split = setup
    points = split.sketches.sketch(0)
    photo = split.sketches.photo_id[0]
    ends = np.flatnonzero(points[:, 2] == 1) + 1
    assert len(ends) >= 3
    calls = []
    advance = LivePolicy.advance
    monkeypatch.setattr(LivePolicy, "advance", lambda self, steps: calls.append(len(steps)) or advance(self, steps))
    fresh = LiveRetrieval(retriever.policy, retriever.gallery)
    answers = [fresh.query(points[:end], photo) for end in ends]
    assert calls == [1] * len(ends), "each new stroke must cost one level, earlier ones come from the cache"
    replayed = LiveRetrieval(retriever.policy, retriever.gallery).query(points, photo)
    assert replayed["target_ranks"] == answers[-1]["target_ranks"]
    assert [a["target_rank"] for a in answers] == answers[-1]["target_ranks"]
    assert replayed["top"] == answers[-1]["top"]
    np.testing.assert_array_equal(replayed["glimpses"], answers[-1]["glimpses"])


def test_query_answer(setup, retriever):
    _, _, split = setup
    points = split.sketches.sketch(1)
    n_strokes = int(points[:, 2].sum())
    answer = retriever.query(points, split.sketches.photo_id[1])
    n = len(retriever.gallery)
    assert answer["n_strokes"] == n_strokes and answer["level"] == min(n_strokes - 1, N_LEVELS - 1)
    assert len(answer["top"]) == min(10, n)
    distances = [d for _, _, d in answer["top"]]
    assert distances == sorted(distances)
    ranks = [r for _, r, _ in answer["top"]]
    assert ranks[0] == 1 and ranks == sorted(ranks)
    by_photo = {p: r for p, r, _ in answer["top"]}
    if split.sketches.photo_id[1] in by_photo:
        assert by_photo[split.sketches.photo_id[1]] == answer["target_rank"]
    assert 1 <= answer["target_rank"] <= n and len(answer["target_ranks"]) == n_strokes
    assert answer["glimpses"].shape == (retriever.config.n_glimpses, 2)
    assert np.all(answer["glimpses"] > -0.1) and np.all(answer["glimpses"] < 1.1)
    assert retriever.query(points)["target_rank"] is None


def test_more_than_17_strokes_stay_at_level_16(retriever):
    rng = np.random.default_rng(0)
    points = np.column_stack([rng.uniform(0.1, 0.9, (40, 2)), np.tile([0, 1], 20)]).astype(np.float32)
    answer = retriever.query(points, retriever.gallery.photo_ids[0])
    assert answer["n_strokes"] == 20 and answer["level"] == 16 and len(answer["target_ranks"]) == 20


def test_strokes_to_points_normalises_like_the_data_sets():
    points = strokes_to_points([[[0, 0], [400, 100]], [[200, 50]]], [400, 200], 10, 10)
    np.testing.assert_allclose(points, [[0, 0.25, 0], [1, 0.5, 1], [0.5, 0.375, 1]])
    np.testing.assert_allclose(unit_to_canvas(points[:, :2], 400, 200), [[0, 0], [400, 100], [200, 50]])
    with pytest.raises(BadRequest, match="stroke 1"):
        strokes_to_points([[[0, 0]], [[1, "a"]]], [400, 200], 10, 10)


# ---- the HTTP app ---------------------------------------------------------------------------------


def test_page_gallery_and_photos(client, setup):
    _, _, split = setup
    page = client.get("/")
    assert page.status_code == 200 and '<canvas id="canvas"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    info = client.get("/api/gallery").json()
    assert info["photo_ids"] == list(split.photos.photo_id)
    assert [s["sketch_id"] for s in info["sketches"]] == list(split.sketches.sketch_id)
    photo = client.get(f"/photos/{info['photo_ids'][0]}")
    assert photo.status_code == 200 and photo.content[:8] == b"\x89PNG\r\n\x1a\n"
    missing = client.get("/photos/no-such-photo")
    assert missing.status_code == 404 and "no-such-photo" in missing.json()["error"]
    assert client.get("/no/such/page").status_code == 404


def test_query_over_http_matches_the_retriever(client, setup, retriever):
    _, _, split = setup
    points = split.sketches.sketch(2)
    target = split.sketches.photo_id[2]
    strokes = sketch_strokes(points, 512)
    answer = client.post("/api/query", json={"strokes": strokes, "canvas": CANVAS, "target": target})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    direct = retriever.query(strokes_to_points(strokes, CANVAS, 50, 400), target)
    assert body["target_rank"] == direct["target_rank"] and body["target_ranks"] == direct["target_ranks"]
    assert [t["photo_id"] for t in body["top10"]] == [p for p, _, _ in direct["top"]]
    assert body["n_strokes"] == int(points[:, 2].sum()) and body["n_points"] == len(points)
    np.testing.assert_allclose(body["glimpses"], direct["glimpses"] * 512, atol=0.01)
    assert len(body["glimpse_sides"]) == retriever.config.n_patches and body["latency_ms"] > 0


def test_serve_a_gallery_of_shards_with_an_index(setup, retriever, tmp_path, monkeypatch):
    """`darp serve --gallery`: the data set's photos plus distractors read from a directory of images,
    the top 10 through an index above the (lowered) crossover, thumbnails from the source directory."""
    import pyarrow.parquet as pq
    from starlette.testclient import TestClient

    from policies.phase1.embedding import embed_photos, load_embedding_net
    from sketch_env import gallery_index
    from sketch_env.atomic import atomic_write_json
    from sketch_env.data import PhotoSet, encode_png, photo_digests
    from sketch_env.photo_shards import SHARDS_DIR, SHARDS_META, file_digest, shard_table
    from policies.running import live_app
    from policies.running.trained import read_darp_run

    data, darp, split = setup
    phase1 = read_darp_run(darp)["embedding"]
    net, _ = load_embedding_net(phase1)
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    extra_ids = [f"distractor{i:03d}" for i in range(300)]
    extra = [encode_png(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in extra_ids]
    for pid, image in zip(extra_ids, extra):
        (images / f"{pid}.png").write_bytes(image)
    photos = PhotoSet(np.array(list(split.photos.photo_id) + extra_ids, dtype=object), np.array(["x"] * (len(split.photos) + 300), dtype=object),
                      list(split.photos.image_bytes) + extra)
    out = tmp_path / "shards"
    (out / SHARDS_DIR).mkdir(parents=True)
    pq.write_table(shard_table(photos.photo_id, embed_photos(net, photos).numpy(), photo_digests(photos),
                               [f"{p}.png" for p in photos.photo_id]), out / SHARDS_DIR / "part-00000.parquet")
    atomic_write_json(out / SHARDS_META, {
        "schema_version": 1, "n_photos": len(photos), "dim": net.config.embedding_dim,
        "shards": [{"file": "part-00000.parquet", "rows": len(photos)}],
        "network": {"run": str(phase1), "digest": file_digest(Path(phase1) / "embedding_net.pt")},
        "source": {"kind": "directory", "path": str(images)}})
    monkeypatch.setattr(gallery_index, "EXACT_UP_TO", 100)
    monkeypatch.setattr(live_app, "MAX_LISTED", 50)
    sharded = live_retrieval(darp, split, gallery_dir=out)
    assert len(sharded.gallery) == len(split.photos) + 300 and sharded.gallery.index is not None
    points = split.sketches.sketch(0)
    answer = sharded.query(points, split.sketches.photo_id[0])
    sharded.gallery.use_index(None)
    exact = sharded.query(points, split.sketches.photo_id[0])
    assert answer["target_ranks"] == exact["target_ranks"]  # ranks never use the index
    assert len(answer["top"]) == 10 and set(p for p, _, _ in answer["top"]) <= set(photos.photo_id)
    with TestClient(build_app(sharded, split, images=live_app.shard_images(out))) as c:
        info = c.get("/api/gallery").json()
        assert len(info["photo_ids"]) == 50 and info["photo_ids"][: len(split.photos)] == list(split.photos.photo_id)
        thumb = c.get("/photos/distractor007")
        assert thumb.status_code == 200 and thumb.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert c.get("/photos/../../etc/passwd").status_code == 404
    # darp evaluate --gallery of the RL run: exact ranks among the 306 photos, the split's as the targets
    from policies.running.evaluate import EvaluateConfig
    from policies.running.evaluate import evaluate_run as evaluate

    metrics = evaluate(EvaluateConfig(data=data, run=darp, split="val", out=tmp_path / "eval", gallery=out))
    assert metrics["n_photos"] == len(photos) and metrics["n_sketches"] == len(split.sketches)
    plain = evaluate(EvaluateConfig(data=data, run=darp, split="val", out=tmp_path / "eval_plain"))
    assert metrics["auir"] <= plain["auir"] + 1e-6  # 300 more photos can only push the targets down


def test_replay_returns_the_data_set_sketch(client, setup):
    _, _, split = setup
    sketch = client.post("/api/replay", json={"sketch_id": split.sketches.sketch_id[0]}).json()
    assert sketch["photo_id"] == split.sketches.photo_id[0]
    points = split.sketches.sketch(0)
    assert len(sketch["strokes"]) == int(points[:, 2].sum())
    np.testing.assert_allclose(np.concatenate(sketch["strokes"]), points[:, :2], atol=1e-6)
    missing = client.post("/api/replay", json={"sketch_id": "nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


GOOD = [[[10.0, 10.0], [100.0, 120.0]], [[200.0, 40.0], [220.0, 300.0]]]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"strokes": [[[1, NaN]]], "canvas": [512, 512]}', 400, "NaN"),
        (b'{"strokes": [[[1, 1e400]]], "canvas": [512, 512]}', 400, "finite"),
        ({"canvas": CANVAS}, 400, "'strokes'"),
        ({"strokes": [], "canvas": CANVAS}, 400, "non-empty"),
        ({"strokes": [[]], "canvas": CANVAS}, 400, "stroke 0"),
        ({"strokes": [[[1, 2], [3]]], "canvas": CANVAS}, 400, "stroke 0"),
        ({"strokes": [[[1, 2, 3]]], "canvas": CANVAS}, 400, "stroke 0"),
        ({"strokes": [[[1, 2]], [["a", "b"]]], "canvas": CANVAS}, 400, "stroke 1"),
        ({"strokes": [[[1, None]]], "canvas": CANVAS}, 400, "stroke 0"),
        ({"strokes": GOOD, "canvas": [512]}, 400, "'canvas'"),
        ({"strokes": GOOD, "canvas": [0, 512]}, 400, "'canvas'"),
        ({"strokes": GOOD}, 400, "'canvas'"),
        (b'{"strokes": [[[1, 1]]], "canvas": [' + b"9" * 500 + b", 5]}", 400, "'canvas'"),
        ({"strokes": [[[5000, 10]]], "canvas": CANVAS}, 400, "beyond"),
        ({"strokes": [[[1, 1]] * 401], "canvas": CANVAS}, 413, "400 points"),
        ({"strokes": [[[1, 1]]] * 51, "canvas": CANVAS}, 413, "51 strokes"),
        ({"strokes": GOOD, "canvas": CANVAS, "target": "no-such-photo"}, 422, "no-such-photo"),
        ({"strokes": GOOD, "canvas": CANVAS, "target": 7}, 422, "unknown target"),
        (b'{"pad": "' + b"x" * (1 << 20) + b'"}', 413, "limit"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "too deeply"),
        (b'{"strokes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "too deeply"),
    ],
)
def test_bad_queries_get_a_clear_4xx_and_the_server_keeps_serving(client, body, status, message):
    if isinstance(body, bytes):
        response = client.post("/api/query", content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post("/api/query", content=json.dumps(body))
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert client.post("/api/query", json={"strokes": GOOD, "canvas": CANVAS}).status_code == 200


def test_body_over_the_limit_is_refused_while_streaming(client):
    def chunks():
        for _ in range(40):
            yield b" " * 65536

    response = client.post("/api/query", content=chunks())  # no Content-Length: chunked upload
    assert response.status_code == 413 and "limit" in response.json()["error"]


# ---- stopping `darp serve` ------------------------------------------------------------------------


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` in the process table: pid -> its start time (to tell a reused pid)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = started_at(child)
            todo.append(child)
    return found


def started_at(pid: int) -> str | None:
    """Start time of a live process (None if it is gone or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_darp_serve_shuts_ray_down_on_sigterm_and_sigint(setup, stop):
    """Every process `darp serve` started (Ray's agents too, which ignore SIGTERM) is gone after it stops."""
    data, darp, _ = setup
    port = free_port()
    # its own Ray instance, whatever else runs on the machine (ray.init() joins a `ray start` cluster it finds)
    server = subprocess.Popen([sys.executable, "-m", "tune_runs.cli", "serve", "--data", str(data), "--run", str(darp),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=os.environ | {"RAY_ADDRESS": "local"},
                              # a suite started in the background inherits SIGINT ignored; a person's Ctrl-C is not
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    family: dict[int, str] = {}
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None and time.time() < deadline, "darp serve did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/gallery", timeout=5):
                    break
            except OSError:
                time.sleep(1.0)
        time.sleep(3.0)  # Ray's agents start a little after the app is up
        family = descendants(server.pid)
        names = {Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace") for p in family}
        assert any("raylet" in n for n in names), names
        server.send_signal(stop)
        assert server.wait(timeout=120) == 0
        deadline = time.time() + 30
        while time.time() < deadline and any(started_at(p) == t for p, t in family.items()):
            time.sleep(0.5)
        left = [p for p, t in family.items() if started_at(p) == t]
        assert not left, f"left running: {[Path(f'/proc/{p}/cmdline').read_bytes()[:60] for p in left]}"
        assert "darp serve: stopping" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
        for p, t in family.items():  # whatever a failed run leaves must not outlive the test
            if started_at(p) == t:
                os.kill(p, signal.SIGKILL)


def test_a_port_in_use_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    """Issue 25, item 7: `darp serve` on a port in use ended in a 42-line Ray traceback."""
    import socket

    from policies.running import live_service
    from tune_runs.cli import main

    def no_ray():
        raise AssertionError("Ray must not start when the port is taken")

    monkeypatch.setattr(live_service, "start_ray", no_ray)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--data", str(tmp_path), "--run", str(tmp_path), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}: cannot listen there (Address already in use)" in err, err
