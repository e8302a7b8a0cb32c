"""`darp embed-photos`: embed a photo collection with a phase-1 network on Ray, as Parquet shards.

The engine is `policies.running.photo_pipeline` (Ray Data `map_batches`, one actor per CPU or GPU); the
shards' format and how they become a gallery is `sketch_env.photo_shards`. `darp evaluate --gallery`
and `darp serve --gallery` read the result.

    darp embed-photos --photos DIR_OR_PARQUET --embedding runs/chair/phase1 --out runs/catalogue
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sketch_env.options import arg


@dataclass
class EmbedPhotosConfig:
    """Embed every photo of a directory of images, a data set or Parquet (photo_id, image) with the phase-1
    network of a run, on Ray workers, into Parquet shards that `darp evaluate` and `darp serve` read as the gallery."""

    photos: Path = arg(help="a directory of image files (photo id = path without extension), a data set "
                            "directory, or a Parquet file/directory with photo_id and image columns")
    embedding: Path = arg(help="phase-1 run directory (darp pretrain) whose network embeds the photos")
    out: Path = arg(help="output directory of the shards (photo_shards.json, shards/, index/)")
    address: str = arg("", "Ray cluster to run on (default: the one `ray job submit` gives, else a local instance)")
    num_workers: int = arg(0, "embedding actors (0: one per CPU of the cluster, or per GPU with --gpus-per-worker)")
    cpus_per_worker: float = arg(1.0, "CPUs of each actor (its torch threads)")
    gpus_per_worker: float = arg(0.0, "GPUs of each actor (0: embed on CPUs)")
    batch_size: int = arg(256, "images per map_batches call")
    shard_rows: int = arg(1_000_000, "photos per Parquet shard")
    index: Literal["auto", "none", "ivfpq", "ivfflat", "hnsw"] = arg(
        "auto", "approximate index saved with the shards (auto: IVF-PQ above the exact-search crossover of "
                "sketch_env.gallery_index.EXACT_UP_TO photos)")
    on_error: Literal["fail", "skip"] = arg("fail", "an unreadable image stops the job (fail) or is left out and listed (skip)")
    force: bool = arg(False, "replace --out even if it holds something other than photo-embedding shards")


def run(cfg: EmbedPhotosConfig) -> dict:
    from policies.running.photo_pipeline import check_photo_job, embed_photo_collection
    from policies.running.ray_session import ray_session
    from sketch_env.data import DataError

    problems = [f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}"
                for name in ("batch_size", "shard_rows", "cpus_per_worker") if getattr(cfg, name) <= 0]
    if cfg.num_workers < 0 or cfg.gpus_per_worker < 0:
        problems.append("--num-workers and --gpus-per-worker must be >= 0")
    if problems:
        raise DataError("; ".join(problems))
    check_photo_job(cfg.photos, cfg.embedding, cfg.out, cfg.force)  # before Ray starts
    with ray_session(**({"address": cfg.address} if cfg.address else {})):
        record = embed_photo_collection(
            cfg.photos, cfg.embedding, cfg.out, num_workers=cfg.num_workers, cpus_per_worker=cfg.cpus_per_worker,
            gpus_per_worker=cfg.gpus_per_worker, batch_size=cfg.batch_size, shard_rows=cfg.shard_rows,
            on_error=cfg.on_error, index=cfg.index, force=cfg.force,
        )
    skipped = f", {record['n_skipped']} unreadable image(s) left out" if record["n_skipped"] else ""
    index = f", index {record['index']['describe']}" if "index" in record else ""
    print(f"wrote {record['n_photos']} photo embeddings in {len(record['shards'])} shard(s) to {cfg.out} "
          f"({record['workers']} workers, {record['seconds']:.1f} s{skipped}{index})")
    return record
