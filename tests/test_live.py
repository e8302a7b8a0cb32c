"""The incremental episode (`policies.darp.rollout.LivePolicy`), its cache and the server's batching, on
untrained small networks (fast; tests/test_serve.py ties the same path to `darp evaluate` on a run)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from policies.darp.module import DARPModule
from policies.phase1.embedding import EmbeddingConfig, EmbeddingNet
from policies.darp.rollout import LivePolicy, LiveRetrieval
from sketch_env.env import EnvConfig, action_space, observation_space
from sketch_env.gallery import Gallery
from sketch_env.geometry import stroke_ends

DIM = 16


@pytest.fixture(scope="module")
def policy() -> LivePolicy:
    torch.manual_seed(0)
    config = EnvConfig(n_glimpses=3)
    module = DARPModule(observation_space=observation_space(config, DIM), action_space=action_space(DIM),
                        model_config={"hidden": 32, "glimpse_hidden": 16})
    net = EmbeddingNet(EmbeddingConfig(embedding_dim=DIM, image_size=32))
    return LivePolicy(module, net, config)


@pytest.fixture(scope="module")
def gallery() -> Gallery:
    photos = torch.nn.functional.normalize(torch.randn(40, DIM, generator=torch.Generator().manual_seed(1)), dim=1)
    return Gallery(photos, [f"p{i}" for i in range(40)])


def drawing(seed: int, n_strokes: int) -> np.ndarray:
    """n_strokes random strokes of 2-4 points, (P, 3) in [0, 1]."""
    rng = np.random.default_rng(seed)
    strokes = [rng.uniform(0.05, 0.95, (rng.integers(2, 5), 2)) for _ in range(n_strokes)]
    pen = [np.r_[np.zeros(len(s) - 1), 1.0] for s in strokes]
    return np.column_stack([np.concatenate(strokes), np.concatenate(pen)]).astype(np.float32)


def test_a_batch_of_levels_equals_each_level_alone(policy):
    sketches = [drawing(i, 3) for i in range(4)]
    first = policy.advance([(None, s[: stroke_ends(s)[0]], 0) for s in sketches])
    steps = [(lv, s[: stroke_ends(s)[1]], 1) for lv, s in zip(first, sketches)]
    together = policy.advance(steps)
    for step, batched in zip(steps, together):
        (alone,) = policy.advance([step])
        torch.testing.assert_close(batched.query, alone.query, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(batched.looked, alone.looked, atol=1e-5)
        for key in alone.state:
            torch.testing.assert_close(batched.state[key], alone.state[key], atol=1e-5, rtol=1e-5)
    assert not np.allclose(together[0].looked, together[1].looked), "different sketches must be seen differently"


def test_each_new_stroke_costs_one_level_from_the_cache(policy, gallery, monkeypatch):
    retrieval = LiveRetrieval(policy, gallery, cache_size=100)
    rows = []
    advance = policy.advance
    monkeypatch.setattr(policy, "advance", lambda steps: rows.append(len(steps)) or advance(steps))
    points = drawing(0, 5)
    answers = [retrieval.query(points[:end], "p3") for end in stroke_ends(points)]
    assert rows == [1] * 5, "each stroke after the first must start from the cached earlier strokes"
    assert [a["target_rank"] for a in answers] == answers[-1]["target_ranks"]
    replay = LiveRetrieval(policy, gallery).query(points, "p3")  # nothing cached: five levels in one request
    assert len(rows) == 10 and replay["target_ranks"] == answers[-1]["target_ranks"]
    assert replay["top"] == answers[-1]["top"]
    small = LiveRetrieval(policy, gallery, cache_size=2)
    small.query(points, "p3")
    assert len(small._cache) == 2


@pytest.fixture
def outside_a_replica(monkeypatch):
    """Lets `@serve.batch` queue in this process: its only use of a replica is a warning about
    max_ongoing_requests, which reads the replica's deployment config."""
    from ray.serve import batching

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)


def run_concurrently(batcher, requests, delays=None, rounds=()):
    """Answers of batcher.query for each (points, target), sent at the given delays (s), and the
    order they finished in as (request, len(rounds) at that moment)."""
    finished = []

    async def one(i, points, target, delay):
        await asyncio.sleep(delay)
        answer = await batcher.query(points, target)
        finished.append((i, len(rounds)))
        return answer

    async def main():
        delays_ = delays or [0.0] * len(requests)
        return await asyncio.gather(*(one(i, p, t, d) for i, ((p, t), d) in enumerate(zip(requests, delays_))))

    return asyncio.run(main()), finished


def test_concurrent_drawers_share_batched_levels_and_ranking(policy, gallery, monkeypatch, outside_a_replica):
    from policies.running.live_service import Batcher

    retrieval = LiveRetrieval(policy, gallery)
    batches = {"advance": [], "answer": []}
    advance, answer = retrieval.advance, retrieval.answer
    monkeypatch.setattr(retrieval, "advance", lambda d: batches["advance"].append(len(d)) or advance(d))
    monkeypatch.setattr(retrieval, "answer", lambda d: batches["answer"].append(len(d)) or answer(d))
    requests = [(drawing(10 + i, 3), f"p{i}") for i in range(8)]
    answers, _ = run_concurrently(Batcher(retrieval, max_batch=64, batch_wait_ms=20), requests)
    assert batches["advance"] == [8, 8, 8], "eight 3-stroke drawings: three rounds of one batched level each"
    assert batches["answer"] == [8], "and one ranking pass for all eight, in the last round"
    for (points, target), got in zip(requests, answers):
        alone = LiveRetrieval(policy, gallery).query(points, target)
        assert got["target_ranks"] == alone["target_ranks"]
        assert [p for p, _, _ in got["top"]] == [p for p, _, _ in alone["top"]]


def test_a_long_uncached_drawing_takes_one_level_per_round_beside_a_new_stroke(policy, gallery, monkeypatch,
                                                                              outside_a_replica):
    """A 60-stroke drawing nobody has seen must not hold up a drawer's one-stroke request."""
    from policies.running.live_service import Batcher

    retrieval = LiveRetrieval(policy, gallery)
    rounds = []
    advance = retrieval.advance
    monkeypatch.setattr(retrieval, "advance", lambda d: rounds.append(len(d)) or advance(d))
    long, short = drawing(20, 60), drawing(21, 1)
    (long_answer, short_answer), finished = run_concurrently(
        Batcher(retrieval, batch_wait_ms=1), [(long, None), (short, "p0")], delays=[0.0, 0.02], rounds=rounds
    )
    (first, rounds_then), (second, _) = finished
    assert first == 1 and second == 0, "the one-stroke request must finish first"
    assert rounds_then <= 10, f"the one-stroke request waited {rounds_then} rounds of the long drawing's replay"
    assert sum(rounds) == 61 and max(rounds) <= 2, "one level per round for each drawing, none computed twice"
    assert long_answer["n_strokes"] == 60 and short_answer["n_strokes"] == 1


def test_a_level_in_flight_is_computed_once(policy, gallery, monkeypatch, outside_a_replica):
    """The page sends stroke 3 before stroke 2's answer is back: stroke 2's level is computed once."""
    from policies.running.live_service import Batcher

    retrieval = LiveRetrieval(policy, gallery)
    rows = []
    advance = retrieval.advance
    monkeypatch.setattr(retrieval, "advance", lambda d: rows.append(len(d)) or advance(d))
    points = drawing(30, 3)
    ends = stroke_ends(points)
    answers, _ = run_concurrently(Batcher(retrieval, batch_wait_ms=5), [(points[: ends[1]], "p1"), (points, "p1")])
    assert sum(rows) == 3, f"three levels, each once (batches {rows})"
    assert answers[1]["target_ranks"][:2] == answers[0]["target_ranks"]


def test_answers_carry_the_calibrated_confidence_of_every_stroke(policy, gallery, monkeypatch):
    from sketch_env.confidence import Calibrator, Confidence

    confidence = Confidence(Calibrator("temperature", 1, 0.2, temperature=0.05),
                            Calibrator("temperature", 5, 0.6, temperature=0.05), {})
    points = drawing(3, 6)
    plain = LiveRetrieval(policy, gallery).query(points)
    assert (plain["confidence"], plain["confidences"], plain["stop_stroke"]) == (None, None, None)

    levels = policy.episode(points, stroke_ends(points))
    _, distances = gallery.topk(torch.stack([lv.query for lv in levels]), 10)
    p1, p5 = confidence.predict(distances.numpy())
    stop_at = float(np.sort(p1)[2:4].mean())  # reached somewhere in the drawing, not at a rounding error's distance
    retrieval = LiveRetrieval(policy, gallery, confidence=confidence, stop_at=stop_at)
    topk_rows = []
    topk = gallery.topk
    monkeypatch.setattr(gallery, "topk", lambda q, k: topk_rows.append(len(q)) or topk(q, k))
    answers = [retrieval.query(points[:end]) for end in stroke_ends(points)]
    assert topk_rows == [], "a new stroke's confidence reads the distances its answer ranked; earlier ones are cached"
    replay = LiveRetrieval(policy, gallery, confidence=confidence, stop_at=stop_at).query(points)
    assert topk_rows == [5], "a drawing nobody sent before: one pass for all its levels but the last"
    final = answers[-1]
    np.testing.assert_allclose(replay["confidences"], final["confidences"], atol=1e-5)
    np.testing.assert_allclose(final["confidences"], p1, atol=1e-5)
    np.testing.assert_allclose(final["confidence"], (p1[-1], p5[-1]), atol=1e-5)
    assert [a["confidence"][0] for a in answers] == final["confidences"]
    assert final["stop_stroke"] == 1 + int(np.flatnonzero(p1 >= stop_at)[0])
    assert all(a["stop_stroke"] is None for a in answers[: final["stop_stroke"] - 1])
