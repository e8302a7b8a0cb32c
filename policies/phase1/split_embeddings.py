"""A phase-1 run's embeddings of a data set split: its export where the export covers the split, else
its saved network's (`darp evaluate`, `darp calibrate`), and the ranks of the split's sketches among its photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from policies.phase1.embedding import (
    EmbeddingNet,
    embed_photo_inputs,
    embed_sketch_levels,
    load_embedding_net,
    photo_decode_size,
    photo_inputs,
)
from sketch_env.data import DataError, Dataset, data_fingerprint
from sketch_env.embedding_export import EXPORT_DIR, EmbeddingExport, gallery_for, load_embedding_export, sketch_embeddings_for
from sketch_env.gallery import ranks_from_embeddings
from sketch_env.render import first_ink_level


def export_covers(export: EmbeddingExport, ds: Dataset) -> bool:
    """Whether `export` was made from this data set and holds all of its sketches and photos."""
    if ds.path is None or export.meta.get("data_fingerprint") != data_fingerprint(ds.path):
        return False
    return set(ds.sketches.sketch_id) <= set(export.sketch_id) and set(ds.photos.photo_id) <= set(export.photo_id)


def ranks_for_triplet(export_or_net: EmbeddingExport | EmbeddingNet, split: Dataset, batch: int = 1024,
                      export_dir: str | Path = "the phase-1 run") -> np.ndarray:
    """Ranks (S, 17) of every sketch of `split` at every level, the gallery being the split's photos.

    export_or_net: an export holding the split's ids (looked up by id and checked item by item:
    `sketch_env.embedding_export.gallery_for`, `sketch_embeddings_for`; export_dir names it in errors), or a
    network (the split's sketches are rendered and its photos decoded and embedded here). Rows follow
    split.sketches.
    """
    photo_emb, sketch_emb = triplet_embeddings(export_or_net, split, batch, export_dir)
    return ranks_from_embeddings(photo_emb, split.photos.photo_id, sketch_emb, split.sketches.photo_id)


def triplet_embeddings(export_or_net: EmbeddingExport | EmbeddingNet, split: Dataset, batch: int = 1024,
                       export_dir: str | Path = "the phase-1 run"):
    """(photo embeddings (N, D), sketch embeddings (S, 17, D)) of `split` (see `ranks_for_triplet`)."""
    if len(split.sketches) == 0 or len(split.photos) == 0:
        raise DataError(f"{split.path}: the split has {len(split.sketches)} sketches and {len(split.photos)} photos; need both")
    if isinstance(export_or_net, EmbeddingExport):
        photo_emb = gallery_for(export_or_net, split.photos, export_dir, split.path).embeddings
        sketch_emb = sketch_embeddings_for(export_or_net, split.sketches, export_dir, split.path)
    else:
        net = export_or_net
        cfg = net.config
        photos = photo_inputs(split.photos.decode_all(photo_decode_size(cfg)), cfg)
        photo_emb = embed_photo_inputs(net, photos, batch)
        sketch_emb = embed_sketch_levels(net, first_ink_level(split.sketches, cfg.image_size), batch)
    return photo_emb, sketch_emb


def triplet_run_embeddings(run_dir: Path, split: Dataset, batch: int = 1024, fresh: bool = False):
    """(photo embeddings, sketch embeddings, source) of a triplet run on `split`: from its export when
    it covers the split (unless `fresh`), else computed by its saved network."""
    if not fresh and (run_dir / EXPORT_DIR).is_dir():
        export = load_embedding_export(run_dir)
        if export_covers(export, split):
            return (*triplet_embeddings(export, split, batch, run_dir), "embedding export")
    net, _ = load_embedding_net(run_dir)
    return (*triplet_embeddings(net, split, batch), "saved network")


__all__ = ["export_covers", "ranks_for_triplet", "triplet_embeddings", "triplet_run_embeddings"]
