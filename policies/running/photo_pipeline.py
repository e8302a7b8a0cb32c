"""Embedding a photo collection on a Ray cluster: the phase-1 photo branch as a Ray Data pipeline.

`darp embed-photos` reads images (a directory of image files, a data set, or Parquet with `photo_id`
and `image` columns), runs `map_batches` over them with a pool of `PhotoEmbedder` actors (one per
CPU, or per GPU, of the cluster unless told otherwise; each loads the network once), and streams the
results back to the driver, which writes them as Parquet shards (`sketch_env.photo_shards`) into a
temporary directory that replaces the output at the end: a failed or interrupted job leaves the
previous output, or none. Workers need to reach the images, not the output: on a cluster put the
images where every node reads them (the synced ./data, a shared file system, or object storage that
`ray.data` reads); the network travels with the job.

An actor embeds exactly as the one-process export does (`policies.phase1.embedding.embed_photos`: decode at
`photo_decode_size`, `photo_inputs`, the photo branch in eval mode), so the embeddings equal the
export's (tests/test_embed_photos.py, 3 workers).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from sketch_env.data import DataError, PhotoSet
from sketch_env.photo_shards import INDEX_DIR, SCHEMA_VERSION, SHARDS_DIR, SHARDS_KIND, SHARDS_META, file_digest, shard_name, shard_table

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class PhotoEmbedder:
    """One Ray Data actor: the phase-1 photo branch, loaded once, applied to batches of encoded images.

    payload: {"config": EmbeddingConfig as a dict, "state_dict": tensors} (what embedding_net.pt
    holds, read by the driver with weights_only=True). root: the source directory that file paths
    are made relative to (photo id = relative path without its extension), or None for tables
    that carry photo ids.
    """

    def __init__(self, payload: dict, root: str | None, device: str, threads: int):
        import dataclasses

        import torch

        from policies.phase1.embedding import EmbeddingConfig, EmbeddingNet

        torch.set_num_threads(threads)
        config = EmbeddingConfig(**payload["config"])
        net = EmbeddingNet(dataclasses.replace(config, backbone_weights=None))
        net.load_state_dict(payload["state_dict"])
        net.config = config
        self.net = net.to(device).eval()
        self.device = device
        self.root = root

    def __call__(self, batch: dict) -> dict:
        import torch

        from policies.phase1.embedding import photo_decode_size, photo_inputs

        if "path" in batch:  # files: ids and sources from the paths
            sources = [_relative(p, self.root) for p in batch["path"]]
            ids = [os.path.splitext(s)[0] for s in sources]
            images = list(batch["bytes"])
        else:
            ids = [str(p) for p in batch["photo_id"]]
            sources = list(ids)
            images = list(batch["image"])
        images = [bytes(b) for b in images]
        photos = PhotoSet(np.asarray(ids, dtype=object), np.asarray(["?"] * len(ids), dtype=object), images)
        size = photo_decode_size(self.net.config)
        decoded, errors = [], []
        for i in range(len(photos)):
            try:
                decoded.append(photos.decode(i, size))
                errors.append("")
            except DataError as e:
                errors.append(str(e).split(": ", 1)[-1])
        dim = self.net.config.embedding_dim
        embedding = np.zeros((len(ids), dim), np.float32)
        good = np.array([not e for e in errors], bool)
        if good.any():
            x = photo_inputs(np.stack(decoded), self.net.config)
            with torch.no_grad():
                embedding[good] = torch.cat([self.net.embed_photos(x[s : s + 256].to(self.device)).cpu()
                                             for s in range(0, len(x), 256)]).numpy()
        return {
            "photo_id": np.asarray(ids, dtype=object),
            "embedding": embedding,
            "image_digest": np.asarray([hashlib.blake2b(b, digest_size=16).hexdigest() for b in images], dtype=object),
            "source": np.asarray(sources, dtype=object),
            "error": np.asarray(errors, dtype=object),
        }


def _relative(path: str, root: str | None) -> str:
    """`path` relative to `root` (posix), as Ray's file listing gives it (with or without a leading /)."""
    if root is None:
        return path
    rel = os.path.relpath(path if os.path.isabs(path) else "/" + path, root)
    return Path(rel).as_posix()


def source_dataset(source: str | Path):
    """(ray.data.Dataset of the images, the root paths are relative to or None, kind): a directory
    of image files, a data set directory (its photos.parquet), or a Parquet file or directory."""
    import ray.data

    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    if path.is_dir() and (path / "manifest.json").is_file():
        path = path / "photos.parquet"
    if path.is_file() or (path.is_dir() and any(path.glob("*.parquet"))):
        if path.is_file() and path.suffix != ".parquet":
            raise DataError(f"{source}: give a directory of images, a data set directory or Parquet files")
        import pyarrow.parquet as pq

        first = path if path.is_file() else sorted(path.glob("*.parquet"))[0]
        try:
            names = pq.read_schema(first).names
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{first}: cannot read a Parquet schema ({str(e).splitlines()[0]})") from None
        if not {"photo_id", "image"} <= set(names):
            raise DataError(f"{first}: Parquet of photos needs photo_id and image columns, has {names}")
        ds = ray.data.read_parquet(str(path.resolve())).select_columns(["photo_id", "image"])
        return ds, None, "parquet"
    root = path.resolve()
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*") if p.is_file()):
        raise DataError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this directory")
    ds = ray.data.read_binary_files(str(root), include_paths=True, file_extensions=[e[1:] for e in IMAGE_EXTENSIONS])
    return ds, str(root), "directory"


def check_photo_job(source: str | Path, embedding_run: str | Path, out: str | Path, force: bool = False) -> Path:
    """What `embed_photo_collection` checks before any work (no Ray needed): the source exists, the
    run has a network, and `out` may be replaced (never other work unless forced, never an input).
    Returns the network file."""
    from policies.phase1.embedding import NET_FILE
    from sketch_env.atomic import check_output_dir

    if not Path(source).exists():
        raise DataError(f"{source}: no such file or directory")
    check_output_dir(out, SHARDS_KIND, inputs=(source, embedding_run), force=force, replace=True)
    net_file = Path(embedding_run) / NET_FILE
    if not net_file.is_file():
        raise DataError(f"{net_file}: no embedding network here; train one with `darp pretrain --run-dir {embedding_run}`")
    return net_file


def embed_photo_collection(source: str | Path, embedding_run: str | Path, out: str | Path, *, num_workers: int = 0,
                           cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, batch_size: int = 256,
                           shard_rows: int = 1_000_000, on_error: str = "fail", index: str = "auto",
                           force: bool = False, log=print) -> dict:
    """Embed every image of `source` with the phase-1 network of `embedding_run` on the running Ray
    instance and write the shards directory `out`; returns its photo_shards.json record."""
    import ray
    import torch

    from sketch_env.atomic import replace_dir

    net_file = check_photo_job(source, embedding_run, out, force)
    payload = torch.load(net_file, map_location="cpu", weights_only=True)
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    # Ray Data's file listing and read tasks need a CPU of their own: CPU actors leave one free
    spare = cpus - (0 if gpus_per_worker else 1)
    if num_workers <= 0:
        num_workers = max(1, int(gpus // gpus_per_worker) if gpus_per_worker else int(spare // cpus_per_worker))
    if gpus_per_worker and num_workers * gpus_per_worker > gpus:
        raise DataError(f"{num_workers} workers x {gpus_per_worker} GPU need more GPUs than the cluster's {gpus:g}")
    if num_workers * cpus_per_worker > max(spare, cpus_per_worker):
        raise DataError(f"{num_workers} workers x {cpus_per_worker:g} CPU would leave no CPU of the cluster's {cpus:g} "
                        f"for reading the images; use at most {max(1, int(spare // cpus_per_worker))} workers")
    ds, root, kind = source_dataset(source)
    if kind == "parquet":  # a file's rows in blocks of a batch, so that every actor gets work
        ds = ds.repartition(target_num_rows_per_block=batch_size)
    device = "cuda" if gpus_per_worker else "cpu"
    embedded = ds.map_batches(
        PhotoEmbedder,
        fn_constructor_kwargs={"payload": payload, "root": root, "device": device, "threads": max(1, int(cpus_per_worker))},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=num_workers,
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
    )
    log(f"embedding the photos of {source} with {num_workers} worker(s) "
        f"({gpus_per_worker or cpus_per_worker} {'GPU' if gpus_per_worker else 'CPU'} each)")
    started = time.perf_counter()
    record: dict = {}

    def write(tmp: Path) -> None:
        (tmp / SHARDS_DIR).mkdir()
        writer = _ShardWriter(tmp / SHARDS_DIR, shard_rows)
        failed: list[tuple[str, str]] = []
        keep_all = index != "none"
        for batch in embedded.iter_batches(batch_size=batch_size, batch_format="numpy"):
            bad = batch["error"] != ""
            failed += list(zip(batch["source"][bad], batch["error"][bad]))
            if bad.any() and on_error == "fail":
                raise DataError(f"{source}: {len(failed)} image(s) cannot be read, e.g. {failed[0][0]}: {failed[0][1]} "
                                "(--on-error skip leaves them out)")
            writer.add({k: v[~bad] for k, v in batch.items()}, keep_all)
            if writer.rows and writer.rows % (50 * batch_size) < batch_size:
                log(f"  {writer.rows} photos embedded ({writer.rows / (time.perf_counter() - started):.0f}/s)")
        writer.close()
        if writer.rows == 0:
            raise DataError(f"{source}: no readable images")
        repeated = writer.repeated_ids()
        if repeated:
            raise DataError(f"{source}: photo ids must be distinct; repeated: {repeated[:5]} "
                            "(files that differ only in their extension share an id)")
        record.update({
            "schema_version": SCHEMA_VERSION,
            "n_photos": writer.rows,
            "dim": int(payload["config"]["embedding_dim"]),
            "shards": writer.shards,
            "network": {"run": str(Path(embedding_run).resolve()), "digest": file_digest(net_file),
                        "config": payload["config"]},
            "source": {"kind": kind, "path": str(Path(source).resolve())},
            "skipped": [{"source": s, "error": e} for s, e in failed[:100]],
            "n_skipped": len(failed),
            "workers": num_workers,
            "seconds": round(time.perf_counter() - started, 2),
        })
        index_kind = _index_kind(index, writer.rows)
        if index_kind is not None:
            from sketch_env.gallery_index import IndexConfig, build_index, save_index

            log(f"building the {index_kind} index of {writer.rows} photos")
            built = build_index(writer.embeddings(), IndexConfig(kind=index_kind), log=log)
            save_index(tmp / INDEX_DIR, built)
            record["index"] = {"kind": index_kind, "describe": built.describe(), "build_s": round(built.build_s, 2)}
        from sketch_env.atomic import atomic_write_json

        atomic_write_json(tmp / SHARDS_META, record)

    replace_dir(out, write, SHARDS_KIND, inputs=(source, embedding_run), force=force)
    return record


def _index_kind(index: str, n: int) -> str | None:
    """Which index to build for n photos: "auto" builds IVF-PQ above the exact-search crossover."""
    from sketch_env.gallery_index import EXACT_UP_TO

    if index == "none":
        return None
    if index == "auto":
        return "ivfpq" if n > EXACT_UP_TO else None
    return index


class _ShardWriter:
    """Rows streamed from the pipeline -> Parquet shards of `shard_rows` rows, ids hashed for the distinctness check."""

    def __init__(self, folder: Path, shard_rows: int):
        self.folder, self.shard_rows = folder, max(1, shard_rows)
        self.shards: list[dict] = []
        self.rows = 0
        self._pending: list[dict] = []
        self._pending_rows = 0
        self._hashes: list[np.ndarray] = []
        self._kept: list[np.ndarray] = []

    def add(self, batch: dict, keep_embeddings: bool) -> None:
        n = len(batch["photo_id"])
        if not n:
            return
        self._hashes.append(np.array([int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little")
                                      for p in batch["photo_id"]], np.uint64))
        if keep_embeddings:
            self._kept.append(np.asarray(batch["embedding"], np.float32))
        self._pending.append(batch)
        self._pending_rows += n
        self.rows += n
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)

    def _flush(self, rows: int) -> None:
        merged = {k: np.concatenate([b[k] for b in self._pending]) for k in ("photo_id", "embedding", "image_digest", "source")}
        name = shard_name(len(self.shards))
        import pyarrow.parquet as pq

        table = shard_table(merged["photo_id"][:rows], merged["embedding"][:rows], merged["image_digest"][:rows],
                            merged["source"][:rows])
        pq.write_table(table, self.folder / name, use_dictionary=["photo_id"])
        self.shards.append({"file": name, "rows": rows})
        rest = {k: v[rows:] for k, v in merged.items()}
        self._pending = [rest] if len(rest["photo_id"]) else []
        self._pending_rows = len(rest["photo_id"])

    def embeddings(self) -> np.ndarray:
        return np.concatenate(self._kept)

    def repeated_ids(self) -> list[str]:
        """Photo ids written more than once (read back only when two id hashes collide)."""
        hashes = np.concatenate(self._hashes)
        values, counts = np.unique(hashes, return_counts=True)
        if (counts == 1).all():
            return []
        import pyarrow.parquet as pq

        ids = [p for s in self.shards for p in pq.read_table(self.folder / s["file"], columns=["photo_id"]).column(0).to_pylist()]
        seen, repeated = set(), []
        for p in ids:
            if p in seen:
                repeated.append(p)
            seen.add(p)
        return repeated
