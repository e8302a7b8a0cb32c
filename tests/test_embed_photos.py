"""`darp embed-photos`: Ray Data workers give the one-process export's embeddings; shards read as a gallery."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from sketch_env.data import DataError, load_dataset
from sketch_env.embedding_export import load_embedding_export
from sketch_env.photo_shards import SHARDS_META, gallery_from_shards, load_photo_shards, shard_table


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    """(data dir, a tiny real phase-1 run on it: network and export)."""
    from sketch_env.data.generate import generate_dataset
    from tests.rl_fixtures import make_phase1_run

    root = tmp_path_factory.mktemp("embed")
    data = generate_dataset(root / "data", n_photos=12, sketches_per_photo=2, seed=0, test_fraction=0.2)
    return data, make_phase1_run(root, data)


@pytest.mark.slow
def test_three_workers_give_the_export_and_evaluate_reads_the_shards(phase1, tmp_path):
    from policies.running.ray_session import ray_session
    from tune_runs.cli import main

    data, run = phase1
    ds = load_dataset(data)
    images = tmp_path / "images" / "sub"
    images.mkdir(parents=True)
    for pid, image in zip(ds.photos.photo_id, ds.photos.image_bytes):
        (images / f"{pid}.png").write_bytes(image)
    (images / "broken.png").write_bytes(b"not an image")
    out_dir, out_data = tmp_path / "shards_dir", tmp_path / "shards_data"
    with ray_session(num_cpus=4):  # 3 actors and a CPU for reading
        # a directory of image files, split over 3 actors in batches of 5; the broken file is skipped
        assert main(["embed-photos", "--photos", str(tmp_path / "images"), "--embedding", str(run), "--out",
                     str(out_dir), "--num-workers", "3", "--batch-size", "5", "--shard-rows", "7", "--on-error", "skip"]) == 0
        # the data set itself (its photos.parquet)
        assert main(["embed-photos", "--photos", str(data), "--embedding", str(run), "--out", str(out_data),
                     "--num-workers", "3", "--batch-size", "4"]) == 0
        # by default an unreadable image stops the job and nothing is written
        assert main(["embed-photos", "--photos", str(tmp_path / "images"), "--embedding", str(run), "--out",
                     str(tmp_path / "failed"), "--num-workers", "3"]) == 1
    assert not (tmp_path / "failed").exists()
    export = load_embedding_export(run)
    row = export.photo_index()
    for folder, prefix in ((out_dir, "sub/"), (out_data, "")):
        shards = load_photo_shards(folder)
        assert sorted(shards.photo_id) == sorted(prefix + p for p in export.photo_id)
        ours = [row[p[len(prefix):]] for p in shards.photo_id]
        np.testing.assert_allclose(shards.embedding, export.photo_embedding[ours], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(shards.image_digest, export.photo_digest[ours])
        shards.check_network(run)
    meta = json.loads((out_dir / SHARDS_META).read_text())
    assert meta["workers"] == 3 and meta["n_skipped"] == 1 and meta["skipped"][0]["source"] == "sub/broken.png"
    assert [s["rows"] for s in meta["shards"]] == [7, 5] and "index" not in meta

    # darp evaluate --gallery: the triplet run ranked among the shards' photos gives the same figures
    from policies.running.evaluate import EvaluateConfig
    from policies.running.evaluate import evaluate_run as evaluate

    plain = evaluate(EvaluateConfig(data=data, run=run, split="all", out=tmp_path / "eval"))
    sharded = evaluate(EvaluateConfig(data=data, run=run, split="all", out=tmp_path / "eval_shards", gallery=out_data))
    for key in ("auir", "acc@1", "acc@5", "n_photos"):
        assert sharded[key] == pytest.approx(plain[key], abs=1e-3)


def test_shards_gallery_checks_targets_digests_and_network(phase1, tmp_path):
    from sketch_env.atomic import atomic_write_json
    from sketch_env.photo_shards import SHARDS_DIR, file_digest

    data, run = phase1
    ds = load_dataset(data)
    export = load_embedding_export(run)
    folder = tmp_path / "shards"
    (folder / SHARDS_DIR).mkdir(parents=True)
    n, dim = len(export.photo_id), export.dim
    pq.write_table(shard_table(export.photo_id, export.photo_embedding, export.photo_digest, export.photo_id),
                   folder / SHARDS_DIR / "part-00000.parquet")
    meta = {"schema_version": 1, "n_photos": n, "dim": dim, "shards": [{"file": "part-00000.parquet", "rows": n}],
            "network": {"run": str(run), "digest": file_digest(run / "embedding_net.pt")}}
    atomic_write_json(folder / SHARDS_META, meta)
    shards = load_photo_shards(folder)
    gallery = gallery_from_shards(shards, ds.photos, data, require=ds.sketches.photo_id)
    assert len(gallery) == n
    with pytest.raises(DataError, match="not in the gallery"):
        gallery_from_shards(shards, require=["no-such-photo"])
    changed = ds.photos.subset(np.arange(len(ds.photos)))
    changed.image_bytes[0] = ds.photos.image_bytes[1]
    with pytest.raises(DataError, match="another image than the one embedded"):
        gallery_from_shards(shards, changed, data)
    atomic_write_json(folder / SHARDS_META, {**meta, "network": {"run": "elsewhere", "digest": "0" * 64}})
    with pytest.raises(DataError, match="cannot be compared"):
        load_photo_shards(folder).check_network(run)
    atomic_write_json(folder / SHARDS_META, {**meta, "n_photos": n + 1})
    with pytest.raises(DataError, match="add up to"):
        load_photo_shards(folder)
    atomic_write_json(folder / SHARDS_META, {**meta, "shards": [{"file": "../x.parquet", "rows": n}]})
    with pytest.raises(DataError, match="missing"):
        load_photo_shards(folder)


def test_refusals_come_before_ray_starts(phase1, tmp_path, capsys):
    import ray

    from tune_runs.cli import main

    data, run = phase1
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    cases = [
        (["--photos", str(data), "--embedding", str(run), "--out", str(other)], "holds other work"),
        (["--photos", str(data), "--embedding", str(data), "--out", str(tmp_path / "o1")], "no embedding network"),
        (["--photos", str(tmp_path / "nowhere"), "--embedding", str(run), "--out", str(tmp_path / "o2")], "no such file"),
        (["--photos", str(data), "--embedding", str(run), "--out", str(data)], "an input of this command"),
        (["--photos", str(data), "--embedding", str(run), "--out", str(tmp_path / "o3"), "--batch-size", "0"], "must be > 0"),
    ]
    for args, message in cases:
        assert main(["embed-photos", *args]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not ray.is_initialized() and (other / "notes.txt").read_text() == "mine"
