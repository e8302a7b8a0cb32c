"""Sketch and photo data: the Parquet data-set format, importers and the built-in generator."""

from sketch_env.data.store import (
    SCHEMA_VERSION,
    DataError,
    Dataset,
    PhotoSet,
    SketchSet,
    data_fingerprint,
    encode_png,
    holdout_by_photo,
    select_split,
    load_dataset,
    load_photos,
    load_sketches,
    read_manifest,
    save_dataset,
)

__all__ = [
    "SCHEMA_VERSION",
    "DataError",
    "Dataset",
    "PhotoSet",
    "SketchSet",
    "data_fingerprint",
    "encode_png",
    "holdout_by_photo",
    "select_split",
    "load_dataset",
    "load_photos",
    "load_sketches",
    "read_manifest",
    "save_dataset",
]
