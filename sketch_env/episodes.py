"""The per-sketch tensors an environment steps through, computed once when the env is built.

An episode shows one sketch at its 17 completion levels. Everything a step needs is precomputed
here, in memory (nothing is cached on disk): the partial renders, the phase-1 embedding of every
partial sketch, the index of the sketch's photo in the gallery of its split, and the rank of each
phase-1 embedding (the triplet baseline, used for the first `rank_gain` reward and by `render`).
The embeddings come from the phase-1 export, checked sketch by sketch against the strokes they are
shown with (`sketch_env.embedding_export.sketch_embeddings_for`), or from the caller (`episode_data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sketch_env.data import DataError, Dataset, load_dataset, select_split
from sketch_env.embedding_export import (
    PhotoEmbedder,
    SketchEmbedder,
    gallery_for,
    load_embedding_export,
    sketch_embeddings_for,
)
from sketch_env.gallery import Gallery
from sketch_env.local_grids import (
    PhotoGridEmbedder,
    SketchGridEmbedder,
    load_local_grids,
    photo_grids_for,
    sketch_grids_for,
)
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
    sketch_grids:     (S, 17, h, w, d) float16 local descriptor grids of each partial sketch (or None:
                      local matching needs them and `photo_grids`, sketch_env.local_match).
    photo_grids:      (N, h, w, d) float16 local descriptor grids of the gallery photos, gallery order.
    phase1_rank:      (S, 17) int64, computed here: the rank of each `sketch_embedding`.
    """

    images: torch.Tensor
    sketch_embedding: torch.Tensor
    target_index: torch.Tensor
    gallery: Gallery
    sketch_id: np.ndarray
    photo_id: np.ndarray
    thumbnails: np.ndarray | None = None
    sketch_grids: torch.Tensor | None = None
    photo_grids: torch.Tensor | None = None
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
        if (self.sketch_grids is None) != (self.photo_grids is None):
            raise ValueError("local grids come in pairs: give both sketch_grids and photo_grids, or neither")
        if self.photo_grids is not None:
            if self.photo_grids.ndim != 4 or len(self.photo_grids) != n:
                raise ValueError(f"photo_grids must have shape ({n}, h, w, d), got {tuple(self.photo_grids.shape)}")
            if self.sketch_grids.shape != (s, N_LEVELS, *self.photo_grids.shape[1:]):
                raise ValueError(f"sketch_grids must have shape ({s}, {N_LEVELS}, {', '.join(map(str, self.photo_grids.shape[1:]))}), "
                                 f"got {tuple(self.sketch_grids.shape)}")
        queries = self.sketch_embedding.reshape(s * N_LEVELS, -1)
        self.phase1_rank = self.gallery.rank(queries, self.target_index.repeat_interleave(N_LEVELS)).reshape(s, N_LEVELS)

    def __len__(self) -> int:
        return len(self.sketch_id)

    @property
    def dim(self) -> int:
        return self.gallery.dim

    @property
    def local_shape(self) -> tuple[int, int, int] | None:
        """(h, w, d) of the local descriptor grids, or None without them."""
        return None if self.photo_grids is None else tuple(int(v) for v in self.photo_grids.shape[1:])


def load_episode_data(
    data_dir: str | Path,
    embedding_run: str | Path,
    split: str = "train",
    image_size: int = 64,
    thumbnails: bool = False,
    embed_sketches: SketchEmbedder | None = None,
    embed_photos: PhotoEmbedder | None = None,
    local: bool = False,
    embed_sketch_grids: SketchGridEmbedder | None = None,
    embed_photo_grids: PhotoGridEmbedder | None = None,
) -> EpisodeData:
    """Episodes of one split: the data set's sketches of `split`, ranked among that split's photos.

    data_dir:      a data-set directory (`sketch_env.data.load_dataset`).
    embedding_run: a phase-1 run directory holding an embedding export (`load_embedding_export`).
    split:         "train", "val", "test", "train+val" or "all" (`sketch_env.data.select_split`).
    image_size:    side of the partial renders the glimpses are taken from.
    thumbnails:    decode the gallery photos at 64 x 64 for `render` (slow on large galleries).
    embed_sketches, embed_photos: re-embed the sketches (photos) whose strokes (bytes) changed since
                   the export was made (`sketch_env.embedding_export.sketch_embeddings_for`); without them
                   a changed one is a DataError naming it, as is a sketch or photo missing from the
                   export, or a sketch the export pairs with another photo than the data set does.
    local:         also load the local descriptor grids phase 1 exported (`sketch_env.local_grids`; local
                   matching), the changed items' re-embedded by embed_sketch_grids / embed_photo_grids.
    """
    ds = select_split(load_dataset(data_dir), split)
    if len(ds.sketches) == 0:
        raise DataError(f"{data_dir}: split {split!r} has no sketches")
    export = load_embedding_export(embedding_run)
    grids = {}
    if local:
        stored = load_local_grids(embedding_run)
        grids = {"sketch_grids": sketch_grids_for(stored, ds.sketches, embedding_run, embed_sketch_grids),
                 "photo_grids": photo_grids_for(stored, ds.photos, embedding_run, embed_photo_grids)}
    return episode_data(
        ds,
        gallery_for(export, ds.photos, embedding_run, data_dir, embed_photos),
        sketch_embeddings_for(export, ds.sketches, embedding_run, data_dir, embed_sketches),
        image_size,
        thumbnails,
        **grids,
    )


def episode_data(
    split: Dataset, gallery: Gallery, sketch_embedding: torch.Tensor, image_size: int = 64, thumbnails: bool = False,
    sketch_grids: torch.Tensor | None = None, photo_grids: torch.Tensor | None = None,
) -> EpisodeData:
    """Episodes of the sketches of `split` (a `Dataset`, also one made or changed in memory) ranked in
    `gallery`, with their (S, 17, D) phase-1 `sketch_embedding` computed anywhere (from the export by
    `sketch_embeddings_for`, or by the phase-1 network for sketches the export never saw), and their
    local grids if given (`EpisodeData`)."""
    return EpisodeData(
        images=_render(split.sketches, image_size),
        sketch_embedding=torch.as_tensor(sketch_embedding, dtype=torch.float32),
        target_index=gallery.index_of(split.sketches.photo_id),
        gallery=gallery,
        sketch_id=np.asarray(split.sketches.sketch_id, dtype=object),
        photo_id=np.asarray(split.sketches.photo_id, dtype=object),
        thumbnails=split.photos.decode_all(THUMBNAIL_SIZE) if thumbnails else None,
        sketch_grids=None if sketch_grids is None else torch.as_tensor(sketch_grids).to(torch.float16),
        photo_grids=None if photo_grids is None else torch.as_tensor(photo_grids).to(torch.float16),
    )


def concat_episode_data(parts: list[EpisodeData]) -> EpisodeData:
    """One EpisodeData of the sketches of `parts`, which must share one gallery (e.g. a split and noisy
    copies of it): rows in the order of the parts."""
    gallery = parts[0].gallery
    if any(p.gallery is not gallery for p in parts[1:]):
        raise ValueError("episode data can only be joined over one gallery")
    local = parts[0].sketch_grids is not None
    if any((p.sketch_grids is not None) != local for p in parts[1:]):
        raise ValueError("episode data can only be joined if all parts have local grids or none do")
    return EpisodeData(
        images=torch.cat([p.images for p in parts]),
        sketch_embedding=torch.cat([p.sketch_embedding for p in parts]),
        target_index=torch.cat([p.target_index for p in parts]),
        gallery=gallery,
        sketch_id=np.concatenate([p.sketch_id for p in parts]),
        photo_id=np.concatenate([p.photo_id for p in parts]),
        sketch_grids=torch.cat([p.sketch_grids for p in parts]) if local else None,
        photo_grids=parts[0].photo_grids,
    )


def load_supervised_targets(
    data_dir: str | Path, embedding_run: str | Path, split: str = "train"
) -> tuple[Gallery, torch.Tensor]:
    """What a learner's supervised term looks up, in `load_episode_data`'s order, without rendering:
    the split's gallery (infos' target_index indexes it) and the (S, D) phase-1 embedding of each
    complete sketch of the split (infos' sketch_index indexes it). The data set and the export are
    read once for both, and checked against each other as `load_episode_data` checks them."""
    ds = select_split(load_dataset(data_dir), split)
    export = load_embedding_export(embedding_run)
    gallery = gallery_for(export, ds.photos, embedding_run, data_dir)
    return gallery, sketch_embeddings_for(export, ds.sketches, embedding_run, data_dir)[:, -1]


def _render(sketches, size: int) -> torch.Tensor:
    """(S, 17, size, size) uint8 partial renders, rendered RENDER_CHUNK sketches at a time."""
    out = np.empty((len(sketches), N_LEVELS, size, size), np.uint8)
    for start in range(0, len(sketches), RENDER_CHUNK):
        stop = min(start + RENDER_CHUNK, len(sketches))
        out[start:stop] = render_levels(sketches.subset(np.arange(start, stop)), size)
    return torch.from_numpy(out)
