"""The per-sketch tensors an environment steps through, computed once when the env is built.

An episode shows one sketch at its 17 completion levels. Everything a step needs is precomputed
here, in memory (nothing is cached on disk): the partial renders, the phase-1 embedding of every
partial sketch, the index of the sketch's photo in the gallery of its split, and the rank of each
phase-1 embedding (the triplet baseline, used for the first `rank_gain` reward and by `render`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sketch_env.data import DataError, load_dataset, select_split
from sketch_env.embeddings import load_embedding_export
from sketch_env.gallery import Gallery
from sketch_env.render import N_LEVELS, render_levels

THUMBNAIL_SIZE = 64
RENDER_CHUNK = 64  # sketches rendered at once: bounds render_levels' float32 output to 17 MiB at 64 x 64


@dataclass
class EpisodeData:
    """Everything an environment steps through, for S sketches and a gallery of N photos.

    images:           (S, 17, H, W) uint8, the partial sketches, ink = 1, paper = 0.
    sketch_embedding: (S, 17, D) float32, the phase-1 embedding of each partial sketch.
    target_index:     (S,) int64, the row of each sketch's photo in `gallery`.
    gallery:          the photos of the same split as the sketches.
    sketch_id, photo_id: (S,) object arrays of ids.
    thumbnails:       (N, 64, 64, 3) uint8 gallery photos in gallery order, for `render` (or None).
    phase1_rank:      (S, 17) int64, computed here: the rank of each `sketch_embedding`.
    """

    images: torch.Tensor
    sketch_embedding: torch.Tensor
    target_index: torch.Tensor
    gallery: Gallery
    sketch_id: np.ndarray
    photo_id: np.ndarray
    thumbnails: np.ndarray | None = None
    phase1_rank: torch.Tensor = field(init=False)

    def __post_init__(self):
        s = len(self.sketch_id)
        if s == 0:
            raise DataError("there are no sketches to build episodes from")
        if self.images.ndim != 4 or self.images.shape[:2] != (s, N_LEVELS):
            raise ValueError(f"images must have shape ({s}, {N_LEVELS}, H, W), got {tuple(self.images.shape)}")
        if self.sketch_embedding.shape != (s, N_LEVELS, self.gallery.dim):
            raise ValueError(
                f"sketch_embedding must have shape ({s}, {N_LEVELS}, {self.gallery.dim}) (the gallery's "
                f"embedding size), got {tuple(self.sketch_embedding.shape)}"
            )
        if self.target_index.shape != (s,) or len(self.photo_id) != s:
            raise ValueError(f"target_index and photo_id must have one entry per sketch ({s})")
        n = len(self.gallery)
        if self.thumbnails is not None and self.thumbnails.shape != (n, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3):
            raise ValueError(f"thumbnails must have shape ({n}, {THUMBNAIL_SIZE}, {THUMBNAIL_SIZE}, 3), got {self.thumbnails.shape}")
        queries = self.sketch_embedding.reshape(s * N_LEVELS, -1)
        self.phase1_rank = self.gallery.rank(queries, self.target_index.repeat_interleave(N_LEVELS)).reshape(s, N_LEVELS)

    def __len__(self) -> int:
        return len(self.sketch_id)

    @property
    def dim(self) -> int:
        return self.gallery.dim


def load_episode_data(
    data_dir: str | Path,
    embedding_run: str | Path,
    split: str = "train",
    image_size: int = 64,
    thumbnails: bool = False,
) -> EpisodeData:
    """Episodes of one split: the data set's sketches of `split`, ranked among that split's photos.

    data_dir:      a data-set directory (`sketch_env.data.load_dataset`).
    embedding_run: a phase-1 run directory holding an embedding export (`load_embedding_export`).
    split:         "train", "val", "test", "train+val" or "all" (`sketch_env.data.select_split`).
    image_size:    side of the partial renders the glimpses are taken from.
    thumbnails:    decode the gallery photos at 64 x 64 for `render` (slow on large galleries).
    Raises DataError when a sketch or photo of the split has no embedding in the export, or when the
    export pairs a sketch with another photo than the data set does.
    """
    ds = select_split(load_dataset(data_dir), split)
    if len(ds.sketches) == 0:
        raise DataError(f"{data_dir}: split {split!r} has no sketches")
    export = load_embedding_export(embedding_run)
    sketch_rows = _rows_in_export(export.sketch_index(), ds.sketches.sketch_id, "sketch", embedding_run, split)
    paired = export.sketch_photo_id[sketch_rows]
    mismatch = np.flatnonzero(paired != ds.sketches.photo_id)
    if len(mismatch):
        i = mismatch[0]
        raise DataError(
            f"{embedding_run}: the embedding export pairs sketch {ds.sketches.sketch_id[i]!r} with photo "
            f"{paired[i]!r} but {data_dir} pairs it with {ds.sketches.photo_id[i]!r} ({len(mismatch)} such "
            "sketches): was the export made from another data set?"
        )
    gallery = _split_gallery(ds, export, embedding_run, split)
    sketch_embedding = torch.from_numpy(export.sketch_embedding[sketch_rows])
    return EpisodeData(
        images=_render(ds.sketches, image_size),
        sketch_embedding=sketch_embedding,
        target_index=gallery.index_of(ds.sketches.photo_id),
        gallery=gallery,
        sketch_id=np.asarray(ds.sketches.sketch_id, dtype=object),
        photo_id=np.asarray(ds.sketches.photo_id, dtype=object),
        thumbnails=ds.photos.decode_all(THUMBNAIL_SIZE) if thumbnails else None,
    )


def load_supervised_targets(
    data_dir: str | Path, embedding_run: str | Path, split: str = "train"
) -> tuple[Gallery, torch.Tensor]:
    """What a learner's supervised term looks up, in `load_episode_data`'s order, without rendering:
    the split's gallery (infos' target_index indexes it) and the (S, D) phase-1 embedding of each
    complete sketch of the split (infos' sketch_index indexes it). The data set and the export are
    read once for both."""
    ds = select_split(load_dataset(data_dir), split)
    export = load_embedding_export(embedding_run)
    rows = _rows_in_export(export.sketch_index(), ds.sketches.sketch_id, "sketch", embedding_run, split)
    return _split_gallery(ds, export, embedding_run, split), torch.from_numpy(export.sketch_embedding[rows, -1])


def _split_gallery(ds, export, embedding_run, split: str) -> Gallery:
    photo_rows = _rows_in_export(export.photo_index(), ds.photos.photo_id, "photo", embedding_run, split)
    return Gallery(torch.from_numpy(export.photo_embedding[photo_rows]), ds.photos.photo_id)


def _rows_in_export(index: dict[str, int], wanted, what: str, run, split: str) -> np.ndarray:
    """Row of each id of `wanted` in the export (`index`: id -> row); DataError naming the missing ones."""
    missing = [key for key in wanted if key not in index]
    if missing:
        raise DataError(
            f"{run}: the embedding export has no {what} embedding for {len(missing)} {what}(s) of split "
            f"{split!r}, e.g. {missing[:3]}; export the embeddings again from this data set"
        )
    return np.array([index[key] for key in wanted], np.int64)


def _render(sketches, size: int) -> torch.Tensor:
    """(S, 17, size, size) uint8 partial renders, rendered RENDER_CHUNK sketches at a time."""
    out = np.empty((len(sketches), N_LEVELS, size, size), np.uint8)
    for start in range(0, len(sketches), RENDER_CHUNK):
        stop = min(start + RENDER_CHUNK, len(sketches))
        out[start:stop] = render_levels(sketches.subset(np.arange(start, stop)), size)
    return torch.from_numpy(out)
