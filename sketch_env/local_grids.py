"""The local-descriptor grids phase 1 exports beside its embeddings (issue 23), and their lookup.

Layout of ``RUN_DIR/local_grids/`` (written atomically: temp directory + rename)::

    meta.json      {"schema_version", "grid": [h, w], "dim": d, "photo_id": [...], "sketch_id": [...],
                    "photo_digest": [...], "sketch_digest": [...]}     (ids in the rows' order)
    photos.npy     (N, h, w, d) float16: each photo's grid of unit descriptors (8 x 8 x 32: 4 KB a photo)
    sketches.npy   (S, 17, h, w, d) float16: every sketch's grid at each of the 17 completion levels

The arrays are read with `numpy.load(allow_pickle=False)`. Like the embedding export, grids are only
right for the strokes and photos they were computed from: the digests (`sketch_env.data.sketch_digests`
/ `photo_digests`) let `sketch_grids_for` / `photo_grids_for` re-embed the changed items with a
function the caller gives (the phase-1 network lives in `policies`), or stop with a DataError naming them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sketch_env.atomic import read_json_object, replace_dir
from sketch_env.data.store import DataError, PhotoSet, SketchSet, photo_digests, sketch_digests
from sketch_env.render import N_LEVELS

LOCAL_DIR = "local_grids"
SCHEMA_VERSION = 1
SketchGridEmbedder = Callable[[SketchSet], "np.ndarray | torch.Tensor"]  # n sketches -> (n, 17, h, w, d)
PhotoGridEmbedder = Callable[[PhotoSet], "np.ndarray | torch.Tensor"]  # n photos -> (n, h, w, d)


@dataclass
class LocalGrids:
    """Photo grids (N, h, w, d) and sketch grids at every level (S, 17, h, w, d), float16, with the ids
    (and digests of what was embedded) of their rows."""

    photo_id: np.ndarray
    photo_grids: np.ndarray
    sketch_id: np.ndarray
    sketch_grids: np.ndarray
    photo_digest: np.ndarray | None = None
    sketch_digest: np.ndarray | None = None

    def __post_init__(self):
        self.photo_id = np.asarray(self.photo_id, dtype=object)
        self.sketch_id = np.asarray(self.sketch_id, dtype=object)
        self.photo_grids = np.asarray(self.photo_grids, np.float16)
        self.sketch_grids = np.asarray(self.sketch_grids, np.float16)
        if self.photo_grids.ndim != 4 or self.photo_grids.shape[0] != len(self.photo_id):
            raise ValueError(f"photo grids must be ({len(self.photo_id)}, h, w, d), got {self.photo_grids.shape}")
        want = (len(self.sketch_id), N_LEVELS, *self.photo_grids.shape[1:])
        if self.sketch_grids.shape != want:
            raise ValueError(f"sketch grids must have shape {want} (the photo grids' cells), got {self.sketch_grids.shape}")
        for name, n in (("photo_digest", len(self.photo_id)), ("sketch_digest", len(self.sketch_id))):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=object))
                if getattr(self, name).shape != (n,):
                    raise ValueError(f"{name} must have shape ({n},)")

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.photo_grids.shape[1]), int(self.photo_grids.shape[2])

    @property
    def dim(self) -> int:
        return int(self.photo_grids.shape[3])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(h, w, d) of one grid."""
        return (*self.grid, self.dim)


def save_local_grids(run_dir: str | Path, grids: LocalGrids) -> Path:
    """Write `grids` to run_dir/local_grids/ atomically; returns that directory."""
    meta = {
        "schema_version": SCHEMA_VERSION,
        "grid": list(grids.grid),
        "dim": grids.dim,
        "photo_id": [str(p) for p in grids.photo_id],
        "sketch_id": [str(s) for s in grids.sketch_id],
        "photo_digest": None if grids.photo_digest is None else [str(d) for d in grids.photo_digest],
        "sketch_digest": None if grids.sketch_digest is None else [str(d) for d in grids.sketch_digest],
    }
    text = json.dumps(meta) + "\n"

    def write(tmp: Path) -> None:
        np.save(tmp / "photos.npy", grids.photo_grids, allow_pickle=False)
        np.save(tmp / "sketches.npy", grids.sketch_grids, allow_pickle=False)
        (tmp / "meta.json").write_text(text)

    return replace_dir(Path(run_dir) / LOCAL_DIR, write)


def has_local_grids(run_dir: str | Path) -> bool:
    return (Path(run_dir) / LOCAL_DIR / "meta.json").is_file()


def local_grid_shape(run_dir: str | Path) -> tuple[int, int, int]:
    """(h, w, d) of a run's local grids, from their meta.json alone (DataError without grids)."""
    meta_file = Path(run_dir) / LOCAL_DIR / "meta.json"
    meta = read_json_object(meta_file, f"{run_dir}: no local descriptor grids ({meta_file} missing); local matching "
                                       f"needs a phase 1 trained with them: `darp pretrain --local-dim 32`")
    grid, dim = meta.get("grid"), meta.get("dim")
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)
            and isinstance(dim, int) and dim > 0):
        raise DataError(f"{meta_file}: 'grid' must be [h, w] and 'dim' d, positive integers; got {grid!r} and {dim!r}")
    return grid[0], grid[1], dim


def load_local_grids(run_dir: str | Path) -> LocalGrids:
    """Read run_dir/local_grids/; DataError naming the file for anything missing or inconsistent."""
    folder = Path(run_dir) / LOCAL_DIR
    meta_file = folder / "meta.json"
    meta = read_json_object(meta_file, f"{run_dir}: no local descriptor grids ({meta_file} missing); local matching "
                                       f"needs a phase 1 trained with them: `darp pretrain --local-dim 32`")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{meta_file}: schema_version {meta.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    for key in ("photo_id", "sketch_id"):
        if not isinstance(meta.get(key), list) or not all(isinstance(v, str) for v in meta[key]):
            raise DataError(f"{meta_file}: {key!r} must be a list of strings")
    arrays = {}
    for name in ("photos", "sketches"):
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise DataError(f"{path}: missing")
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the grid array ({e})") from None
    try:
        grids = LocalGrids(meta["photo_id"], arrays["photos"], meta["sketch_id"], arrays["sketches"],
                           meta.get("photo_digest"), meta.get("sketch_digest"))
    except ValueError as e:
        raise DataError(f"{folder}: {e}") from None
    if list(grids.grid) != meta.get("grid") or grids.dim != meta.get("dim"):
        raise DataError(f"{meta_file}: says grid {meta.get('grid')} x {meta.get('dim')}, the arrays hold {grids.shape}")
    return grids


def sketch_grids_for(grids: LocalGrids, sketches: SketchSet, run_dir: str | Path,
                     embed: SketchGridEmbedder | None = None) -> torch.Tensor:
    """(S, 17, h, w, d) float16 grids of `sketches` (looked up by id), the changed ones re-embedded by `embed`."""
    return _grids_for("sketch", grids.sketch_id, grids.sketch_grids, grids.sketch_digest, sketches,
                      sketches.sketch_id, sketch_digests, embed, run_dir)


def photo_grids_for(grids: LocalGrids, photos: PhotoSet, run_dir: str | Path,
                    embed: PhotoGridEmbedder | None = None) -> torch.Tensor:
    """(N, h, w, d) float16 grids of `photos` in their order, the changed ones re-embedded by `embed`."""
    return _grids_for("photo", grids.photo_id, grids.photo_grids, grids.photo_digest, photos,
                      photos.photo_id, photo_digests, embed, run_dir)


def _grids_for(what: str, stored_id: np.ndarray, stored: np.ndarray, stored_digest: np.ndarray | None, items,
               item_id: np.ndarray, digests: Callable, embed: Callable | None, run_dir) -> torch.Tensor:
    """The stored grids of `items` (rows found by id); items whose digest differs from the stored one are
    re-embedded by `embed`, or refused by a DataError naming them when there is none."""
    rows = _rows(stored_id, item_id, what, run_dir)
    out = torch.from_numpy(stored[rows].copy())
    if stored_digest is None:
        return out
    changed = np.flatnonzero(stored_digest[rows] != digests(items))
    if len(changed):
        if embed is None:
            raise DataError(_stale(run_dir, what, item_id[changed]))
        out[changed] = _embedded(embed(items.subset(changed)), (len(changed), *stored.shape[1:]), what)
    return out


def _rows(ids: np.ndarray, wanted, what: str, run_dir) -> np.ndarray:
    index = {key: i for i, key in enumerate(ids)}
    missing = [key for key in wanted if key not in index]
    if missing:
        raise DataError(f"{run_dir}: the local grids have no {what} grid for {len(missing)} {what}(s), e.g. "
                        f"{missing[:3]}; export them again from this data set (`darp pretrain` on the run)")
    return np.array([index[key] for key in wanted], np.int64)


def _stale(run_dir, what: str, ids) -> str:
    content = "other strokes" if what == "sketch" else "another image"
    return (f"{run_dir}: {len(ids)} {what}(s) have {content} than the local grids were computed from (e.g. "
            f"{list(ids[:3])}); export again (`darp pretrain` on the run) or evaluate with `darp evaluate`, "
            f"which re-embeds them")


def _embedded(values, shape: tuple[int, ...], what: str) -> torch.Tensor:
    out = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values).to(torch.float16)
    if tuple(out.shape) != shape:
        raise ValueError(f"re-embedding {what} grids gave shape {tuple(out.shape)}, expected {shape}")
    return out


__all__ = ["LOCAL_DIR", "LocalGrids", "PhotoGridEmbedder", "SketchGridEmbedder", "has_local_grids", "load_local_grids",
           "local_grid_shape",
           "photo_grids_for", "save_local_grids", "sketch_grids_for"]
