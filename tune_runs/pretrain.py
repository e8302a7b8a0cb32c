"""`darp pretrain`: phase 1, the triplet embedding network, and the export of its embeddings.

Trains on the project's "train" split with the batch-hard triplet loss and early-stops on acc@5 of
the "val" split (both from `sketch_env.data.select_split`, by photo). Sketches are rasterised once
into level maps (`first_ink_level`, uint8) and photos once into network inputs (edge maps or RGB);
every batch is made from those in memory. Each epoch ends with a validation pass (complete
sketches; all 17 levels every `val_levels_every` epochs) and an atomic checkpoint
(run_dir/checkpoint.pt) that a later call resumes from, also after Ctrl-C. The best network is kept
in run_dir/embedding_net.pt; at the end every photo and every sketch at every level is embedded and
exported (sketch_env.embeddings), and run_dir/run.json records the run (config, validation figures
of the best network, per-epoch history, wall and CPU seconds).

    darp pretrain --data /tmp/builtin --run-dir /tmp/runs/triplet --time-budget-s 120
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from policies.embedding import (
    Backbone,
    EmbeddingConfig,
    EmbeddingNet,
    embed_photo_inputs,
    embed_sketch_levels,
    load_embedding_net,
    photo_decode_size,
    photo_inputs,
    save_embedding_net,
)
from policies.runs import write_run
from policies.triplet import Mining, batch_triplet_loss, random_affine, sample_levels
from sketch_env.atomic import atomic_write
from sketch_env.data import DataError, Dataset, load_dataset, select_split
from sketch_env.embeddings import EmbeddingExport, save_embedding_export
from sketch_env.metrics import acc_at, retrieval_metrics
from sketch_env.render import N_LEVELS, first_ink_level
from tune_runs.cli import arg
from tune_runs.evaluate import data_fingerprint, ranks_from_embeddings

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class PretrainConfig:
    """Phase 1: train the triplet embedding network on a data set and export its embeddings."""

    data: Path = arg(help="data set directory (darp data generate / import-qmul)")
    run_dir: Path = arg(help="where the checkpoint, the best network, the export and run.json go")
    epochs: int = arg(300, "most epochs (passes over the training sketches)")
    batch_size: int = arg(32, "sketch-photo pairs per batch; negatives come from the batch")
    lr: float = arg(1e-3, "Adam learning rate")
    weight_decay: float = arg(1e-4, "Adam weight decay")
    margin: float = arg(0.2, "triplet margin on Euclidean distances of unit vectors (range 0..2)")
    mining: Mining = arg("batch_hard", "negative per sketch: the closest other photo in the batch, or a random one")
    augment: bool = arg(True, "random small rotation, scale and shift of sketches and photos")
    train_on_partial: bool = arg(False, "train on a random completion level per sketch (the paper: complete sketches)")
    patience: int = arg(15, "stop after this many epochs without a better validation acc@5 (ties: mean 1 / rank)")
    time_budget_s: float = arg(0.0, "stop training after this many seconds in all (0: no limit); resumed runs count earlier time")
    seed: int = arg(0, "seed of the batch order and augmentation")
    backbone: Backbone = arg("compact", "embedding backbone (torchvision ones are built without downloading weights)")
    embedding_dim: int = arg(64, "embedding size D")
    image_size: int = arg(64, "side of the sketch and photo images fed to the network")
    shared_branches: bool = arg(True, "one backbone for sketches and photos")
    photo_input: Literal["edges", "rgb"] = arg("edges", "photos as edge maps (a line drawing) or RGB")
    backbone_weights: str | None = arg(None, "state-dict file of the backbone (e.g. ImageNet weights you downloaded)")
    num_threads: int = arg(2, "torch CPU threads")
    resume: bool = arg(True, "continue from run_dir/checkpoint.pt if there is one")
    val_levels_every: int = arg(5, "validate on all 17 completion levels (AUIR, m@A) every this many epochs (0: never); complete sketches (acc@q) every epoch")
    eval_batch: int = arg(1024, "images per forward pass when validating and exporting")

    def embedding_config(self) -> EmbeddingConfig:
        return EmbeddingConfig(
            backbone=self.backbone,
            embedding_dim=self.embedding_dim,
            image_size=self.image_size,
            shared_branches=self.shared_branches,
            photo_input=self.photo_input,
            backbone_weights=self.backbone_weights,
        )


@dataclass
class _Tensors:
    """What training reads, computed once: level maps, photo inputs and the index of each pair."""

    first_ink: torch.Tensor  # (S, H, W) uint8, all sketches of the data set
    photos: torch.Tensor  # (N, C, H, W) float, all photos
    photo_of: torch.Tensor  # (S,) long: row in `photos` of each sketch's photo
    train: torch.Tensor  # indices of training sketches
    val: torch.Tensor  # indices of validation sketches
    val_photos: torch.Tensor  # rows of the validation photos (the validation gallery)


def _indices(ds: Dataset, part: Dataset, what: str) -> np.ndarray:
    """Rows of ds.sketches (what="sketches") or ds.photos ("photos") that are in `part`."""
    ids = ds.sketches.sketch_id if what == "sketches" else ds.photos.photo_id
    keep = set(part.sketches.sketch_id if what == "sketches" else part.photos.photo_id)
    return np.flatnonzero(np.fromiter((i in keep for i in ids), bool, len(ids)))


def _prepare(ds: Dataset, emb_cfg: EmbeddingConfig) -> _Tensors:
    if len(set(ds.sketches.sketch_id)) != len(ds.sketches):
        raise DataError(f"{ds.path}: sketch ids are not unique")
    train, val = select_split(ds, "train"), select_split(ds, "val")
    if len(set(train.sketches.photo_id)) < 2:
        raise DataError(f"{ds.path}: the training split needs sketches of at least 2 photos, has {len(train.sketches)} sketches")
    if len(val.sketches) == 0:
        raise DataError(f"{ds.path}: the validation split has no sketches")
    photo_row = ds.photos.index_of()
    return _Tensors(
        first_ink=torch.from_numpy(first_ink_level(ds.sketches, emb_cfg.image_size)),
        photos=photo_inputs(ds.photos.decode_all(photo_decode_size(emb_cfg)), emb_cfg),
        photo_of=torch.tensor([photo_row[p] for p in ds.sketches.photo_id], dtype=torch.long),
        train=torch.from_numpy(_indices(ds, train, "sketches")),
        val=torch.from_numpy(_indices(ds, val, "sketches")),
        val_photos=torch.from_numpy(_indices(ds, val, "photos")),
    )


def validate(net: EmbeddingNet, t: _Tensors, photo_ids: np.ndarray, batch: int, all_levels: bool) -> dict:
    """Validation sketches against the validation photos.

    all_levels: every figure of `retrieval_metrics` over the 17 completion levels; otherwise only the
    complete sketches are embedded (17 x cheaper): acc@1/5/10 and mrr, their mean 1 / rank x100.
    """
    photo_emb = embed_photo_inputs(net, t.photos[t.val_photos], batch)
    levels = tuple(range(N_LEVELS)) if all_levels else (N_LEVELS - 1,)
    sketch_emb = embed_sketch_levels(net, t.first_ink[t.val].numpy(), batch, levels)
    ranks = ranks_from_embeddings(
        photo_emb, photo_ids[t.val_photos.numpy()], sketch_emb, photo_ids[t.photo_of[t.val].numpy()]
    )
    metrics = retrieval_metrics(ranks, len(t.val_photos)) if all_levels else {
        f"acc@{q}": acc_at(ranks[:, -1], q) for q in (1, 5, 10)
    }
    metrics["mrr"] = float(100.0 * np.mean(1.0 / ranks[:, -1]))
    return metrics


def _train_epoch(
    net: EmbeddingNet,
    optimizer: torch.optim.Optimizer,
    cfg: PretrainConfig,
    t: _Tensors,
    gen: torch.Generator,
    deadline: float,
    on_batch,
) -> tuple[float, bool]:
    """One pass over the training sketches in random order. Returns (mean loss, stopped by deadline)."""
    net.train()
    order = t.train[torch.randperm(len(t.train), generator=gen)]
    n_batches = max(1, len(order) // cfg.batch_size)  # drop the ragged last batch unless it is the only one
    total, count = 0.0, 0
    for b in range(n_batches):
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size] if n_batches > 1 else order
        labels = t.photo_of[idx]
        if len(torch.unique(labels)) < 2:
            continue
        levels = sample_levels(len(idx), N_LEVELS, cfg.train_on_partial, generator=gen)
        sketches = (t.first_ink[idx] <= levels[:, None, None].to(torch.uint8)).float().unsqueeze(1)
        photos = t.photos[labels]
        if cfg.augment:
            sketches = random_affine(sketches, generator=gen)
            photos = random_affine(photos, generator=gen)
        s_emb, p_emb = net(sketches, photos)
        loss = batch_triplet_loss(s_emb, p_emb, labels, cfg.margin, cfg.mining, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item(), count + 1
        on_batch(total / count)
        if time.monotonic() > deadline:
            return total / max(count, 1), True
    return total / max(count, 1), False


def _score(metrics: dict) -> list[float]:
    """Early-stopping key: validation acc@5 of complete sketches, ties broken by their mean 1 / rank."""
    return [metrics["acc@5"], metrics["mrr"]]


def _load_checkpoint(path: Path, emb_cfg: EmbeddingConfig) -> dict:
    """The checkpoint at `path`, refused if it holds another network than `emb_cfg` describes."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for unreadable files
        raise ValueError(f"{path}: cannot read the checkpoint ({e}); use --no-resume to start over") from None
    saved = {**ckpt["embedding_config"], "backbone_weights": None}
    wanted = {**dataclasses.asdict(emb_cfg), "backbone_weights": None}
    if saved != wanted:
        raise ValueError(
            f"{path}: checkpoint of a different network {saved}, asked for {wanted}; "
            "use --no-resume to start over or another --run-dir"
        )
    return ckpt


def export_embeddings(net: EmbeddingNet, ds: Dataset, t: _Tensors, batch: int, meta: dict) -> EmbeddingExport:
    """Embeddings of every photo (N, D) and every sketch at every level (S, 17, D).

    Splits are the project's: "train", "val" (select_split's validation photos) or "test".
    """
    photo_split = np.asarray(ds.photos.split, dtype=object).copy()
    photo_split[t.val_photos.numpy()] = "val"
    sketch_split = np.asarray(ds.sketches.split, dtype=object).copy()
    sketch_split[t.val.numpy()] = "val"
    return EmbeddingExport(
        photo_id=np.asarray(ds.photos.photo_id, dtype=object),
        photo_split=photo_split,
        photo_embedding=embed_photo_inputs(net, t.photos, batch).numpy(),
        sketch_id=np.asarray(ds.sketches.sketch_id, dtype=object),
        sketch_photo_id=np.asarray(ds.sketches.photo_id, dtype=object),
        sketch_split=sketch_split,
        sketch_embedding=embed_sketch_levels(net, t.first_ink.numpy(), batch).numpy(),
        meta=meta,
    )


def _fit(cfg: PretrainConfig, net: EmbeddingNet, optimizer: torch.optim.Optimizer, t: _Tensors,
         photo_ids: np.ndarray, state: dict, run_dir: Path) -> None:
    """Epochs until cfg.epochs, early stopping or the time budget; `state` is updated in place.

    After every epoch: validation, the best network to run_dir/embedding_net.pt, and an atomic
    checkpoint (network, optimizer, `state`) to run_dir/checkpoint.pt.
    """
    budget = cfg.time_budget_s if cfg.time_budget_s > 0 else math.inf
    bar = tqdm(total=cfg.epochs, initial=state["epoch"], desc="pretrain", unit="epoch", dynamic_ncols=True)
    postfix: dict[str, str] = {}

    def show(loss: float) -> None:
        postfix["loss"] = f"{loss:.3f}"
        bar.set_postfix(postfix)

    try:
        while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience and state["train_seconds"] < budget:
            start, cpu_start = time.monotonic(), time.process_time()
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + state["epoch"])
            deadline = start + budget - state["train_seconds"]
            loss, out_of_time = _train_epoch(net, optimizer, cfg, t, gen, deadline, show)
            all_levels = cfg.val_levels_every > 0 and (state["epoch"] + 1) % cfg.val_levels_every == 0
            metrics = validate(net, t, photo_ids, cfg.eval_batch, all_levels)
            state["epoch"] += 1
            state["train_seconds"] += time.monotonic() - start
            state["cpu_seconds"] += time.process_time() - cpu_start
            state["history"].append(
                {"epoch": state["epoch"], "seconds": round(state["train_seconds"], 2),
                 "cpu_seconds": round(state["cpu_seconds"], 2), "loss": loss,
                 "acc@5": metrics["acc@5"], "mrr": metrics["mrr"], "auir": metrics.get("auir")}
            )
            if _score(metrics) > state["best"]:
                state["best"], state["bad_epochs"] = _score(metrics), 0
                save_embedding_net(run_dir, net, net.config)
            else:
                state["bad_epochs"] += 1
            payload = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                       "embedding_config": dataclasses.asdict(net.config), **state}
            atomic_write(run_dir / CHECKPOINT_FILE, lambda p: torch.save(payload, p))
            postfix.update({"val_acc@5": f"{metrics['acc@5']:.1f}", "best": f"{state['best'][0]:.1f}"})
            if all_levels:
                postfix["val_auir"] = f"{metrics['auir']:.1f}"
            bar.update(1)
            show(loss)
            if out_of_time:
                break
    finally:
        bar.close()


def run(cfg: PretrainConfig) -> dict:
    """Train (or resume), keep the best network, export embeddings, write run.json. Returns run.json."""
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {cfg.epochs} and {cfg.batch_size}")
    torch.set_num_threads(cfg.num_threads)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    emb_cfg = cfg.embedding_config()
    ds = load_dataset(cfg.data)
    t = _prepare(ds, emb_cfg)
    photo_ids = np.asarray(ds.photos.photo_id, dtype=object)

    torch.manual_seed(cfg.seed)
    net = EmbeddingNet(emb_cfg)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "best": [-math.inf, -math.inf], "bad_epochs": 0, "train_seconds": 0.0,
             "cpu_seconds": 0.0, "history": []}
    ckpt_path = run_dir / CHECKPOINT_FILE
    if cfg.resume and ckpt_path.is_file():
        ckpt = _load_checkpoint(ckpt_path, emb_cfg)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = {k: ckpt[k] for k in state}
        print(f"resuming {ckpt_path} after epoch {state['epoch']} ({state['train_seconds']:.0f} s trained)")
    try:
        _fit(cfg, net, optimizer, t, photo_ids, state, run_dir)
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted: {ckpt_path} holds epoch {state['epoch']}; run the same command to resume") from None

    best_net, _ = load_embedding_net(run_dir)
    meta = {"kind": "triplet", "data": str(Path(cfg.data).resolve()), "data_fingerprint": data_fingerprint(cfg.data),
            "embedding_config": dataclasses.asdict(emb_cfg), "n_levels": N_LEVELS}
    save_embedding_export(run_dir, export_embeddings(best_net, ds, t, cfg.eval_batch, meta))
    val_metrics = validate(best_net, t, photo_ids, cfg.eval_batch, all_levels=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    record = {"kind": "triplet", "config": config, "val_metrics": val_metrics,
              "train_seconds": round(state["train_seconds"], 2), "train_cpu_seconds": round(state["cpu_seconds"], 2),
              "epochs": state["epoch"], "history": state["history"]}
    write_run(run_dir, record)
    print(f"validation ({val_metrics['n_sketches']} sketches, {val_metrics['n_photos']} photos): "
          f"acc@1 {val_metrics['acc@1']:.1f}  acc@5 {val_metrics['acc@5']:.1f}  acc@10 {val_metrics['acc@10']:.1f}  "
          f"AUIR {val_metrics['auir']:.2f}  m@A {val_metrics['m_at_a']:.2f}  "
          f"({state['epoch']} epochs, {state['train_seconds']:.0f} s)")
    return record
