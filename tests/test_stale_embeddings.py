"""The phase-1 export is checked against the strokes and photos it is used with (sketch_env/embedding_export.py):
a changed sketch is refused by name, or re-embedded by the phase-1 network, never ranked with its old
embedding; the result follows the edit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import sketch_env  # noqa: F401  (registers SketchRetrieval-v0)
from policies.phase1.embedding import EmbeddingConfig, EmbeddingNet, embed_photos, embed_sketches, reembedders, save_embedding_net
from sketch_env.atomic import atomic_write_json
from sketch_env.data import (DataError, Dataset, PhotoSet, SketchSet, data_fingerprint, encode_png, load_dataset,
                             photo_digests, save_dataset, select_split, sketch_digests)
from sketch_env.data.generate import generate_dataset
from sketch_env.embedding_export import EmbeddingExport, gallery_for, load_embedding_export, save_embedding_export
from sketch_env.episodes import episode_data, load_episode_data, load_supervised_targets
from tune_runs.cli import main

EDITED = 3  # the row of the sketch whose strokes are edited


def export_of(net: EmbeddingNet, data_dir: Path) -> EmbeddingExport:
    """What `darp pretrain` exports for `data_dir` with `net`: embeddings, digests and the fingerprint."""
    ds = load_dataset(data_dir)
    return EmbeddingExport(
        photo_id=ds.photos.photo_id, photo_split=ds.photos.split, photo_embedding=embed_photos(net, ds.photos).numpy(),
        sketch_id=ds.sketches.sketch_id, sketch_photo_id=ds.sketches.photo_id, sketch_split=ds.sketches.split,
        sketch_embedding=embed_sketches(net, ds.sketches).numpy(), meta={"data_fingerprint": data_fingerprint(data_dir)},
        sketch_digest=sketch_digests(ds.sketches), photo_digest=photo_digests(ds.photos),
    )


def phase1_run(root: Path, net: EmbeddingNet, data_dir: Path) -> Path:
    save_embedding_net(root, net, net.config)
    save_embedding_export(root, export_of(net, data_dir))
    atomic_write_json(root / "run.json", {"kind": "triplet"})
    return root


def with_points(ds: Dataset, change: dict[int, np.ndarray]) -> SketchSet:
    """ds's sketches with the points of the rows in `change` replaced."""
    sk = ds.sketches
    strokes = [change.get(i, sk.sketch(i)) for i in range(len(sk))]
    return SketchSet.from_list(strokes, sk.sketch_id, sk.photo_id, sk.split, sk.drawer, sk.canvas_width, sk.canvas_height)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A data set, a phase-1 run made from it, and a copy of the data with one sketch's strokes mirrored."""
    root = tmp_path_factory.mktemp("stale")
    data = generate_dataset(root / "data", n_photos=8, sketches_per_photo=2, seed=0)
    torch.manual_seed(0)
    net = EmbeddingNet(EmbeddingConfig(image_size=32, embedding_dim=8)).eval()
    phase1 = phase1_run(root / "phase1", net, data)
    ds = load_dataset(data)
    mirrored = ds.sketches.sketch(EDITED).copy()
    mirrored[:, 0] = 1.0 - mirrored[:, 0]
    edited = save_dataset(root / "edited", with_points(ds, {EDITED: mirrored}), ds.photos, name="edited", source="test")
    return data, phase1, edited, net, ds.sketches.sketch_id[EDITED]


def test_an_unchanged_data_set_loads_without_the_network(setup):
    data, phase1, _, _, _ = setup

    def never(items):
        raise AssertionError("nothing changed, nothing to re-embed")

    episodes = load_episode_data(data, phase1, "all", embed_sketches=never, embed_photos=never)
    np.testing.assert_array_equal(episodes.sketch_embedding.numpy(), load_embedding_export(phase1).sketch_embedding)


def test_a_changed_sketch_is_refused_by_name_by_every_loader(setup):
    _, phase1, edited, _, sketch_id = setup
    message = rf"1 sketch\(s\) of {edited} have other strokes than the embedding export was computed from \(e\.g\. \['{sketch_id}'\]\).*darp pretrain"
    with pytest.raises(DataError, match=message):
        load_episode_data(edited, phase1, "all")
    with pytest.raises(DataError, match=message):
        load_supervised_targets(edited, phase1, "all")
    with pytest.raises(DataError, match=message):
        gym.make("SketchRetrieval-v0", data=str(edited), embedding=str(phase1), split="all")


def test_re_embedding_follows_the_edit(setup, tmp_path):
    _, phase1, edited, net, _ = setup
    calls = []
    hooks = reembedders(phase1, log=calls.append)
    episodes = load_episode_data(edited, phase1, "all", **hooks)
    assert calls == [f"re-embedding 1 changed sketch(es) with the phase-1 network of {phase1}"]
    stale = load_embedding_export(phase1).sketch_embedding
    fresh = load_episode_data(edited, phase1_run(tmp_path / "fresh", net, edited), "all")
    # the edited sketch has the embedding of its new strokes, the others keep the export's
    np.testing.assert_allclose(episodes.sketch_embedding[EDITED], fresh.sketch_embedding[EDITED], atol=1e-5)
    assert np.abs(episodes.sketch_embedding[EDITED].numpy() - stale[EDITED]).max() > 1e-2
    keep = np.arange(len(stale)) != EDITED
    np.testing.assert_array_equal(episodes.sketch_embedding[keep].numpy(), stale[keep])
    np.testing.assert_allclose(episodes.sketch_embedding, fresh.sketch_embedding, atol=1e-5)
    assert torch.equal(episodes.phase1_rank, fresh.phase1_rank)


def with_blank_photo(data: Path, out: Path, row: int = 2) -> tuple[PhotoSet, Path]:
    """A copy of data set `data` at `out` whose photo `row` is a blank image: (its photos, its path)."""
    ds = load_dataset(data)
    images = list(ds.photos.image_bytes)
    images[row] = encode_png(np.full((64, 64, 3), 255, np.uint8))
    photos = PhotoSet(ds.photos.photo_id, ds.photos.split, images)
    return photos, save_dataset(out, ds.sketches, photos, name="photo", source="test")


def test_a_changed_photo_is_refused_or_re_embedded(setup, tmp_path):
    data, phase1, _, net, _ = setup
    photos, changed = with_blank_photo(data, tmp_path / "photo")
    name = photos.photo_id[2]
    with pytest.raises(DataError, match=rf"1 photo\(s\) of {changed} have another image .*\['{name}'\]"):
        load_episode_data(changed, phase1, "all")
    episodes = load_episode_data(changed, phase1, "all", **reembedders(phase1))
    row = list(episodes.gallery.photo_ids).index(name)
    np.testing.assert_allclose(episodes.gallery.embeddings[row], embed_photos(net, photos.subset([2]))[0], atol=1e-5)


def test_the_served_gallery_follows_the_photos_served(setup, tmp_path):
    """`darp serve`'s gallery is looked up by id like the episodes' (gallery_for): a photo whose image
    changed is re-embedded by the phase-1 network, a photo the export lacks is refused by name."""
    from tests.rl_fixtures import save_untrained_run
    from policies.running.trained import live_retrieval

    data, phase1, _, net, _ = setup
    ds = load_dataset(data)
    photos, changed = with_blank_photo(data, tmp_path / "photo")
    run = save_untrained_run(tmp_path / "darp", data, phase1, n_glimpses=2)
    gallery = live_retrieval(run, select_split(load_dataset(changed), "all")).gallery
    stale = load_embedding_export(phase1).photo_embedding
    assert list(gallery.photo_ids) == list(ds.photos.photo_id)
    np.testing.assert_allclose(gallery.embeddings[2], embed_photos(net, photos.subset([2]))[0], atol=1e-5)
    assert np.abs(gallery.embeddings[2].numpy() - stale[2]).max() > 1e-2
    keep = np.arange(len(stale)) != 2
    np.testing.assert_array_equal(gallery.embeddings[keep].numpy(), stale[keep])

    extra = PhotoSet(np.append(ds.photos.photo_id, "new_chair"), np.append(ds.photos.split, "train"),
                     list(ds.photos.image_bytes) + [ds.photos.image_bytes[0]])
    more = save_dataset(tmp_path / "more", ds.sketches, extra, name="more", source="test")
    with pytest.raises(DataError, match=r"no photo embedding for 1 photo\(s\), e\.g\. \['new_chair'\]"):
        live_retrieval(run, select_split(load_dataset(more), "all"))


def test_episodes_take_embeddings_computed_elsewhere(setup):
    """What `--noise-strokes` needs: sketches changed in memory, embedded by the phase-1 network."""
    data, phase1, _, net, _ = setup
    split = select_split(load_dataset(data), "all")
    noisy = Dataset(with_points(split, {0: np.r_[split.sketches.sketch(0), [[0.1, 0.1, 0], [0.9, 0.9, 1]]]}), split.photos, split.manifest)
    export = load_embedding_export(phase1)
    with pytest.raises(DataError, match="other strokes"):
        from sketch_env.embedding_export import sketch_embeddings_for

        sketch_embeddings_for(export, noisy.sketches, phase1)
    episodes = episode_data(noisy, gallery_for(export, noisy.photos, phase1), embed_sketches(net, noisy.sketches), image_size=32)
    assert episodes.images.shape == (16, 17, 32, 32) and episodes.phase1_rank.shape == (16, 17)
    assert episodes.images[0, -1].sum() > load_episode_data(data, phase1, "all", image_size=32).images[0, -1].sum()


def test_evaluate_names_a_photo_that_is_not_an_image(setup, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, phase1, _, _, _ = setup
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    table = pq.read_table(broken / "photos.parquet")
    images = table.column("image").to_pylist()
    images[1] = b"\x89PNG truncated"
    pq.write_table(table.set_column(2, "image", pa.array(images, pa.binary())), broken / "photos.parquet")
    name = table.column("photo_id")[1].as_py()
    assert main(["evaluate", "--data", str(broken), "--run", str(phase1), "--split", "all", "--out", str(tmp_path / "eval")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and f"photos.parquet: photo '{name}' is not a readable image" in err[0]


@pytest.mark.slow
def test_evaluating_an_rl_run_follows_the_strokes_evaluated(ray_local, setup, tmp_path):
    """Every sketch given another sketch's strokes: an RL run's evaluation must rank the new strokes'
    embeddings (as with an export made from the changed data), not the old ones."""
    from policies.running.trained import evaluate_policy_run
    from policies.running.fit import train
    from policies.running.registry import TrainConfig

    data, phase1, _, net, _ = setup
    run = tmp_path / "darp"
    train(TrainConfig(data=str(data), embedding=str(phase1), run_dir=str(run), iterations=1, num_envs_per_env_runner=4,
                      episodes_per_batch=8, n_glimpses=2, val_interval=0), quiet=True)
    ds = load_dataset(data)
    shifted = {i: ds.sketches.sketch((i + 1) % len(ds.sketches)) for i in range(len(ds.sketches))}
    swapped = save_dataset(tmp_path / "swapped", with_points(ds, shifted), ds.photos, name="swapped", source="test")
    fresh_run = tmp_path / "darp_fresh"  # the same policy, its phase-1 export made from the swapped strokes
    shutil.copytree(run, fresh_run)
    record = json.loads((run / "run.json").read_text())
    atomic_write_json(fresh_run / "run.json", {**record, "embedding": str(phase1_run(tmp_path / "fresh", net, swapped))})

    evaluated = evaluate_policy_run(run, swapped, "all")["ranks"]
    expected = evaluate_policy_run(fresh_run, swapped, "all")["ranks"]
    on_old_strokes = evaluate_policy_run(run, data, "all")["ranks"]
    np.testing.assert_array_equal(evaluated, expected)
    assert (evaluated != on_old_strokes).any()


def test_train_on_a_changed_sketch_stops_before_ray_with_one_line_and_no_run(setup, tmp_path, capsys, monkeypatch):
    """Issue 25, item 6: an 80-line Ray traceback ("the actor died ...") named the sketch only inside
    it, and left a run directory with status "running"."""
    import policies.running.fit

    _, phase1, edited, _, name = setup

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for a stale export")

    monkeypatch.setattr(policies.running.fit, "ray_session", no_ray)
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(edited), "--embedding", str(phase1), "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert name in lines[0] and "other strokes than the embedding export" in lines[0], err
    assert not run_dir.exists()
