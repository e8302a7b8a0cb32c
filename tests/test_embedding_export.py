import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sketch_env.data import DataError
from sketch_env.embedding_export import EmbeddingExport, load_embedding_export, save_embedding_export

D = 4


def make_export(n_photos=5, n_sketches=7, seed=0) -> EmbeddingExport:
    rng = np.random.default_rng(seed)
    photos = rng.normal(size=(n_photos, D)).astype(np.float32)
    sketches = rng.normal(size=(n_sketches, 17, D)).astype(np.float32)
    photo_ids = [f"photo_{i}" for i in range(n_photos)]
    return EmbeddingExport(
        photo_id=photo_ids,
        photo_split=["train"] * (n_photos - 2) + ["test"] * 2,
        photo_embedding=photos / np.linalg.norm(photos, axis=1, keepdims=True),
        sketch_id=[f"sketch_{i}" for i in range(n_sketches)],
        sketch_photo_id=[photo_ids[i % n_photos] for i in range(n_sketches)],
        sketch_split=["train" if i % n_photos < n_photos - 2 else "test" for i in range(n_sketches)],
        sketch_embedding=sketches / np.linalg.norm(sketches, axis=2, keepdims=True),
        sketch_digest=[f"points-{i}" for i in range(n_sketches)],
        photo_digest=[f"image-{i}" for i in range(n_photos)],
        meta={"backbone": "compact", "image_size": 64, "data": "built-in chairs"},
    )


def assert_same(a: EmbeddingExport, b: EmbeddingExport):
    for name in ("photo_id", "photo_split", "sketch_id", "sketch_photo_id", "sketch_split"):
        assert getattr(b, name).dtype == object
        assert list(getattr(a, name)) == list(getattr(b, name)), name
    for name in ("photo_embedding", "sketch_embedding"):
        assert getattr(b, name).dtype == np.float32
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.meta == b.meta


def test_round_trip_is_exact(tmp_path):
    export = make_export()
    folder = save_embedding_export(tmp_path, export)
    assert folder == tmp_path / "embeddings"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "photos.parquet", "sketches.parquet"]
    loaded = load_embedding_export(tmp_path)
    assert_same(export, loaded)
    assert loaded.sketch_embedding.shape == (7, 17, D)


def test_parquet_layout(tmp_path):
    export = make_export()
    folder = save_embedding_export(tmp_path, export)
    sketches = pq.read_table(folder / "sketches.parquet")
    assert sketches.column_names == ["sketch_id", "photo_id", "split", "embedding", "points_digest"]
    assert sketches.schema.field("embedding").type == pa.list_(pa.float32(), 17 * D)
    row = np.asarray(sketches.column("embedding")[2].as_py(), np.float32)
    np.testing.assert_array_equal(row.reshape(17, D), export.sketch_embedding[2])  # row-major (level, dim)
    photos = pq.read_table(folder / "photos.parquet")
    assert photos.schema.field("embedding").type == pa.list_(pa.float32(), D)


def test_overwrite_leaves_no_temporaries(tmp_path):
    save_embedding_export(tmp_path, make_export(seed=0))
    second = make_export(n_photos=3, n_sketches=2, seed=1)
    save_embedding_export(tmp_path, second)
    assert_same(second, load_embedding_export(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["embeddings"]


def test_empty_sketch_set_round_trips(tmp_path):
    export = make_export().subset_sketches(np.zeros(7, bool))
    assert export.sketch_embedding.shape == (0, 17, D)
    assert_same(export, load_embedding_export(save_embedding_export(tmp_path, export).parent))


def test_indexes_and_subsets():
    export = make_export()
    assert export.photo_index()["photo_3"] == 3
    assert export.sketch_index()["sketch_6"] == 6
    some = export.subset_sketches([6, 0])
    assert list(some.sketch_id) == ["sketch_6", "sketch_0"]
    np.testing.assert_array_equal(some.sketch_embedding[0], export.sketch_embedding[6])
    assert len(some.photo_id) == 5
    test = export.subset_photos(export.photo_split == "test")
    assert list(test.photo_id) == ["photo_3", "photo_4"]
    assert set(test.sketch_photo_id) == {"photo_3", "photo_4"}
    assert list(test.sketch_id) == ["sketch_3", "sketch_4"]
    with pytest.raises(ValueError, match=r"sketch mask must have shape \(7,\)"):
        export.subset_sketches(np.ones(3, bool))


def test_constructor_checks():
    good = make_export()
    with pytest.raises(ValueError, match=r"sketch_embedding must have shape \(S, 17, 4\)"):
        EmbeddingExport(**{**good.__dict__, "sketch_embedding": good.sketch_embedding[:, :16]})
    with pytest.raises(ValueError, match="not among the exported photos.*'ghost'"):
        EmbeddingExport(**{**good.__dict__, "sketch_photo_id": ["ghost"] * 7})
    with pytest.raises(ValueError, match="photo ids must be distinct"):
        EmbeddingExport(**{**good.__dict__, "photo_id": ["p"] * 5})


def test_missing_export_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"embeddings/meta\.json: missing"):
        load_embedding_export(tmp_path)


def saved(tmp_path):
    return save_embedding_export(tmp_path, make_export())


def test_corrupt_parquet_names_the_file(tmp_path):
    folder = saved(tmp_path)
    (folder / "photos.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=r"photos\.parquet: cannot read Parquet"):
        load_embedding_export(tmp_path)


def test_missing_parquet_names_the_file(tmp_path):
    folder = saved(tmp_path)
    (folder / "sketches.parquet").unlink()
    with pytest.raises(DataError, match=r"sketches\.parquet: missing"):
        load_embedding_export(tmp_path)


def test_bad_meta_json(tmp_path):
    folder = saved(tmp_path)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json: not valid JSON"):
        load_embedding_export(tmp_path)
    (folder / "meta.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(DataError, match=r"meta\.json: schema_version 99"):
        load_embedding_export(tmp_path)


def test_row_count_disagreeing_with_meta(tmp_path):
    folder = saved(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    meta["n_sketches"] = 8
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"sketches\.parquet: 7 rows, meta\.json says 8"):
        load_embedding_export(tmp_path)


def test_wrong_embedding_width_names_the_file(tmp_path):
    folder = saved(tmp_path)
    t = pq.read_table(folder / "sketches.parquet")
    flat = pa.array(np.zeros(7 * 16 * D, np.float32))
    t = t.set_column(3, "embedding", pa.FixedSizeListArray.from_arrays(flat, 16 * D))
    pq.write_table(t, folder / "sketches.parquet")
    with pytest.raises(DataError, match=r"sketches\.parquet: column 'embedding' must be non-null fixed_size_list"):
        load_embedding_export(tmp_path)


def test_missing_column_names_the_file(tmp_path):
    folder = saved(tmp_path)
    pq.write_table(pq.read_table(folder / "photos.parquet").drop_columns(["split"]), folder / "photos.parquet")
    with pytest.raises(DataError, match=r"photos\.parquet: missing columns \['split'\]"):
        load_embedding_export(tmp_path)


@pytest.mark.parametrize("file, column, values, message", [
    ("photos", "embedding", lambda t: pa.array([None if i == 1 else v for i, v in enumerate(t.column("embedding").to_pylist())],
                                               pa.list_(pa.float32(), D)), r"photos\.parquet: .*1 nulls"),
    ("photos", "photo_id", lambda t: pa.array(["photo_0"] * 5), r"photos\.parquet: photo ids must be distinct"),
    ("sketches", "photo_id", lambda t: pa.array(["ghost"] * 7), r"sketches\.parquet: 1 photo ids of sketches are not among"),
], ids=["null-embedding", "duplicate-photo-ids", "unknown-photo"])
def test_a_bad_column_names_its_file(tmp_path, file, column, values, message):
    """A null embedding, duplicate photo ids, a sketch of an unknown photo: each names the file it is in."""
    path = saved(tmp_path) / f"{file}.parquet"
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.column_names.index(column), column, values(t)), path)
    with pytest.raises(DataError, match=message):
        load_embedding_export(tmp_path)
