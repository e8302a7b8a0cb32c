"""Tiny synthetic data sets with a phase-1 embedding export, for tests and benchmarks (no pretraining needed).

The exports' sketch embeddings move from a noisy point towards their photo's embedding as the sketch
completes, like a real phase-1 network's, so rankings and rewards are meaningful. `build_fixture`: random-walk
sketches of random photos (the env tests' `synthetic` fixture); `make_tiny_setup`: the built-in generator's
chairs (the end-to-end RL tests and the benchmarks); `with_local_grids`: synthetic local descriptor grids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sketch_env.atomic import atomic_write_json
from sketch_env.data import PhotoSet, SketchSet, encode_png, load_dataset, photo_digests, save_dataset, sketch_digests
from sketch_env.data.generate import generate_dataset
from sketch_env.embedding_export import EmbeddingExport, save_embedding_export
from sketch_env.render import N_LEVELS

DIM = 8
N_PHOTOS = 10
SKETCHES_PER_PHOTO = 2
G = 2  # glimpses per level in most tests: 34-step episodes


def random_walk_sketch(rng: np.random.Generator, n: int, step: float, margin: float, stroke_points: int) -> np.ndarray:
    """(n, 3) float64 points: a random walk from the centre (steps N(0, step) per axis), clipped to
    [margin, 1 - margin], the pen lifted every `stroke_points` points and at the end."""
    xy = np.clip(0.5 + np.cumsum(rng.normal(0, step, (n, 2)), axis=0), margin, 1 - margin)
    pen = np.zeros(n)
    pen[stroke_points - 1 :: stroke_points] = 1.0
    pen[-1] = 1.0
    return np.column_stack([xy, pen])


def build_fixture(root: Path, seed: int = 0) -> tuple[str, str]:
    """A data set of 10 photos with 2 random-walk sketches each (all split "train") and an embedding
    export whose partial-sketch embeddings approach their photo's as the level grows.
    Returns (data directory, embedding run directory)."""
    rng = np.random.default_rng(seed)
    photo_ids = [f"chair{i:02d}" for i in range(N_PHOTOS)]
    images = [encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in photo_ids]
    photos = PhotoSet(np.array(photo_ids, dtype=object), np.array(["train"] * N_PHOTOS, dtype=object), images)
    strokes, sketch_ids, sketch_photos = [], [], []
    for p in photo_ids:
        for k in range(SKETCHES_PER_PHOTO):
            strokes.append(random_walk_sketch(rng, int(rng.integers(20, 40)), 0.06, 0.05, 8).astype(np.float32))
            sketch_ids.append(f"/train/{p}_{k + 1}")
            sketch_photos.append(p)
    s = len(strokes)
    sketches = SketchSet.from_list(strokes, sketch_ids, sketch_photos, ["train"] * s, np.arange(s))
    data_dir = save_dataset(root / "data", sketches, photos, name="synthetic", source="test")

    photo_emb = _normalise(rng.normal(size=(N_PHOTOS, DIM)))
    owner = np.array([photo_ids.index(p) for p in sketch_photos])
    noise = rng.normal(size=(s, N_LEVELS, DIM)) * np.linspace(2.0, 0.3, N_LEVELS)[None, :, None]
    sketch_emb = _normalise(photo_emb[owner][:, None, :] + noise)
    export = EmbeddingExport(
        photo_ids, ["train"] * N_PHOTOS, photo_emb, sketch_ids, sketch_photos, ["train"] * s, sketch_emb,
        sketch_digests(sketches), photo_digests(photos), {"test": True},
    )
    run_dir = root / "pretrain"
    save_embedding_export(run_dir, export)
    return str(data_dir), str(run_dir)


def make_tiny_setup(root: Path, n_photos: int = 10, sketches_per_photo: int = 2, dim: int = 16, seed: int = 0):
    """Writes root/data (built-in generator) and root/phase1 (a synthetic export); returns both paths."""
    data = generate_dataset(root / "data", n_photos=n_photos, sketches_per_photo=sketches_per_photo, seed=seed,
                            test_fraction=0.2)
    ds = load_dataset(data)
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    photo_emb = unit(rng.normal(size=(len(ds.photos), dim))).astype(np.float32)
    index = {p: i for i, p in enumerate(ds.photos.photo_id)}
    target = photo_emb[[index[p] for p in ds.sketches.photo_id]]
    noise = unit(rng.normal(size=(len(ds.sketches), dim)))
    w = np.linspace(0.2, 0.9, 17)[None, :, None]
    sketch_emb = unit(w * target[:, None] + (1 - w) * noise[:, None]).astype(np.float32)
    export = EmbeddingExport(
        photo_id=ds.photos.photo_id, photo_split=ds.photos.split, photo_embedding=photo_emb,
        sketch_id=ds.sketches.sketch_id, sketch_photo_id=ds.sketches.photo_id, sketch_split=ds.sketches.split,
        sketch_embedding=sketch_emb, sketch_digest=sketch_digests(ds.sketches), photo_digest=photo_digests(ds.photos),
        meta={"synthetic": True},
    )
    phase1 = root / "phase1"
    save_embedding_export(phase1, export)
    atomic_write_json(phase1 / "run.json", {"kind": "synthetic-export"})
    return data, phase1


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


LOCAL_SHAPE = (4, 4, 6)  # (h, w, d) of the synthetic local grids


def with_local_grids(episodes, seed: int = 0, photo_grids=None, sketch_grids=None):
    """`episodes` (EpisodeData) with local descriptor grids: random unit photo grids of LOCAL_SHAPE, and each
    sketch's grids drifting from noise towards its photo's as the level grows (or the grids given)."""
    import dataclasses

    import torch

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    gen = torch.Generator().manual_seed(seed)
    if photo_grids is None:
        photo_grids = unit(torch.randn(len(episodes.gallery), *LOCAL_SHAPE, generator=gen))
    if sketch_grids is None:
        own = photo_grids[episodes.target_index][:, None]
        mix = torch.linspace(0.2, 1.0, N_LEVELS)[None, :, None, None, None]
        sketch_grids = unit(mix * own + (1 - mix) * torch.randn(len(episodes), N_LEVELS, *LOCAL_SHAPE, generator=gen))
    return dataclasses.replace(episodes, photo_grids=photo_grids.half(), sketch_grids=sketch_grids.half())


def given_or_tiny_setup(data: str | None, embedding: str | None, name: str) -> tuple[str, str, bool]:
    """(data, embedding, tiny) for a benchmark: the given directories, or a tiny built-in data set with a synthetic
    phase-1 export in a new temporary directory (tiny True: its figures check that the code runs, nothing more)."""
    if data and embedding:
        return data, embedding, False
    import tempfile

    print("no --data/--embedding: a small built-in data set with a synthetic phase-1 export (figures mean nothing)")
    root = Path(tempfile.mkdtemp(prefix=f"{name}_"))
    data, embedding = (str(p) for p in make_tiny_setup(root, n_photos=40, sketches_per_photo=3, dim=64))
    return data, embedding, True
