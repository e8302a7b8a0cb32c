"""A tiny data set and phase-1 export for end-to-end RL tests (no CNN training needed).

The export's sketch embeddings move from a noisy point towards the photo's embedding as the
sketch completes, like a real phase-1 network's, so rankings and rewards are meaningful.
"""

from pathlib import Path

import numpy as np

from sketch_env.data import load_dataset
from sketch_env.data.generate import generate_dataset
from sketch_env.embeddings import EmbeddingExport, save_embedding_export
from sketch_env.atomic import atomic_write_json


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
        sketch_embedding=sketch_emb, meta={"synthetic": True},
    )
    phase1 = root / "phase1"
    save_embedding_export(phase1, export)
    atomic_write_json(phase1 / "run.json", {"kind": "synthetic-export"})
    return data, phase1
