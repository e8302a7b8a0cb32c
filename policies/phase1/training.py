"""Phase 1: train the triplet embedding network for on-the-fly retrieval, and export its embeddings.

The task queries the gallery with partial sketches (17 completion levels) and reads acc@q on the
complete one, so training shows the network what users draw: every sketch of a batch appears at
`levels_per_sketch` completion levels (the complete sketch with probability `complete_fraction`,
else a uniformly drawn level), all pulled to the same photo by the batch-hard triplet loss, whose
weight can lean toward later levels (`late_weight`). Sketches are redrawn each epoch with
stroke-level augmentation (`sketch_env.strokes.augment_strokes`: stroke dropout, per-stroke
similarity, point jitter; a pen width per sample from `pen_widths`), then rendered as level maps
(`first_ink_level`, cheap: all Chair-V2 sketches in about 0.1 s); photos enter once, as edge maps
(gradients, or HED's learned edges) or RGB, and get the same random image-level affine.

Selection follows the task's own measure: every `val_every` epochs the validation sketches at all
17 levels are ranked against the validation photos, and the network with the best validation AUIR
averaged over the last `val_smooth` validations is kept (one evaluation of 192 sketches moves by
about +-1). Training stops at `epochs`, after `patience` epochs without a better smoothed AUIR, or
at the time budget; the learning rate follows `lr_schedule`. Each epoch ends with an atomic
checkpoint that a later call resumes from (also after Ctrl-C). At the end every photo and every
sketch at every level is embedded with the kept network and exported (sketch_env.embedding_export).

    darp pretrain --data /tmp/chairv2 --run-dir /tmp/runs/phase1
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from policies.phase1.backbones import HED_WEIGHTS, Backbone, n_stages
from policies.phase1.embedding import (
    EmbeddingConfig,
    EmbeddingNet,
    PhotoInput,
    embed_photo_inputs,
    embed_sketch_levels,
    load_embedding_net,
    photo_decode_size,
    photo_inputs,
    save_embedding_net,
)
from policies.phase1.local_descriptors import captured_feature_maps, export_local_grids, local_loss
from policies.phase1.triplet import Mining, batch_infonce_loss, batch_triplet_loss, random_affine, sample_levels
from sketch_env.atomic import OutputKind, atomic_write, atomic_write_json, check_output_dir, prepare_output_dir
from sketch_env.data import (
    DataError,
    Dataset,
    SketchSet,
    data_fingerprint,
    load_dataset,
    photo_digests,
    select_split,
    sketch_digests,
)
from sketch_env.embedding_export import EmbeddingExport, save_embedding_export
from sketch_env.errors import ConfigError, RunStopped
from sketch_env.gallery import ranks_from_embeddings
from sketch_env.local_grids import save_local_grids
from sketch_env.options import arg
from sketch_env.metrics import retrieval_metrics
from sketch_env.render import N_LEVELS, default_thickness, first_ink_level
from sketch_env.strokes import augment_strokes

CHECKPOINT_FILE = "checkpoint.pt"
# Image sides worth training on: the compact CNN halves the side in each of its 4 blocks (16 leaves it one
# pixel); above 512 the level maps of a data set's sketches (S x side^2 bytes) and its photos no longer fit in memory.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 512
RUN_FILE = "run.json"
RUN_KIND = OutputKind("phase-1 run", (RUN_FILE, CHECKPOINT_FILE, "embedding_net.pt"))


@dataclass
class Phase1Config:
    """Phase 1: train the triplet embedding network on a data set and export its embeddings."""

    data: str = arg(help="data set directory (darp data generate / import-qmul)")
    run_dir: str = arg(help="where the checkpoint, the best network, the export and run.json go")
    epochs: int = arg(300, "most epochs (passes over the training sketches)")
    batch_size: int = arg(32, "sketches per batch, each with its photo (the negatives)")
    lr: float = arg(1e-3, "Adam learning rate")
    lr_schedule: Literal["constant", "cosine"] = arg("cosine", "learning rate over the epochs: constant, or cosine decay to 0 at --epochs", advanced=True)
    weight_decay: float = arg(1e-4, "Adam weight decay", advanced=True)
    ema_decay: float = arg(0.999, "validate, keep and export an exponential moving average of the weights with this "
                                 "decay per step, warmed up as min(decay, (1 + n) / (10 + n)) after n steps (0: the weights themselves)", advanced=True)
    loss: Literal["triplet", "infonce"] = arg("infonce", "triplet (a negative from the batch) or infonce (the "
                                               "sketch's photo among the batch's)")
    margin: float = arg(0.2, "triplet margin on Euclidean distances of unit vectors (range 0..2; 0: soft margin)", advanced=True)
    temperature: float = arg(0.1, "infonce temperature of the cosine logits", advanced=True)
    mining: Mining = arg("batch_hard", "negative per sketch: the closest other photo in the batch, or a random one", advanced=True)
    augment: bool = arg(True, "random small rotation, scale and shift of sketch and photo images", advanced=True)
    train_on_partial: bool = arg(True, "train on partial sketches too (the task's queries); off: complete sketches only (the paper)", advanced=True)
    complete_fraction: float = arg(0.0, "share of training samples shown complete when training on partial sketches", advanced=True)
    levels_per_sketch: int = arg(1, "completion levels of each sketch per batch, all pulled to its photo", experiment=True)
    late_weight: float = arg(0.0, "loss weight of a sample ~ ((level + 1) / 17) ** late_weight (0: equal weights)", experiment=True)
    stroke_augment: bool = arg(False, "redraw training sketches each epoch with stroke dropout, per-stroke affine and jitter", experiment=True)
    stroke_drop_p: float = arg(0.1, "stroke augmentation: probability of dropping a stroke (never the first)", experiment=True)
    pen_widths: tuple[int, ...] = arg((), "pen widths in pixels drawn at random per training sample (empty: the default pen)", experiment=True)
    patience: int = arg(60, "stop after this many epochs without a better validation AUIR")
    time_budget_s: float = arg(0.0, "stop training after this many seconds in all, resumed runs too (0: no limit)")
    seed: int = arg(0, "random seed")
    backbone: Backbone = arg("compact", "compact (trained from scratch) or a torchvision classifier's trunk")
    embedding_dim: int = arg(64, "embedding size D")
    image_size: int = arg(64, "side of the sketch and photo images fed to the network")
    width: int = arg(16, "channels of the compact backbone's first block (doubled in each of the 4 blocks)", advanced=True)
    shared_branches: bool = arg(True, "one backbone for sketches and photos", advanced=True)
    photo_input: PhotoInput = arg("edges", "photos as gradient edge maps, HED edge maps or RGB")
    tta_flip: bool = arg(False, "embed images and their mirror images and average (validation, export, queries)", experiment=True)
    local_dim: int = arg(0, "also learn 8 x 8 grids of local descriptors of this size (for --match local; 0: none)")
    local_weight: float = arg(1.0, "weight of the local InfoNCE term in the loss (with --local-dim)", advanced=True)
    local_temperature: float = arg(0.1, "temperature of the local InfoNCE's cosine logits (with --local-dim)", advanced=True)
    backbone_weights: str | None = arg(None, "pretrained backbone: a torchvision state-dict file, or hed (vgg16 only)")
    frozen_stages: int = arg(0, "first backbone stages kept fixed, their outputs computed once and cached")
    backbone_lr_scale: float = arg(0.1, "learning rate of a pretrained backbone's trained stages, relative to --lr "
                                         "(the embedding head's); without --backbone-weights everything trains at --lr", advanced=True)
    stem_cache_gib: float = arg(8.0, "most memory the frozen stages' cached outputs may take", advanced=True)
    stem_precision: Literal["bfloat16", "float32"] = arg(
        "bfloat16", "arithmetic of the one pass over the frozen stages: bfloat16 (channels-last; ~4x faster on CPUs with "
                    "AMX or AVX-512 BF16, features within ~1% of float32's) or float32", advanced=True)
    num_threads: int = arg(2, "torch CPU threads")
    resume: bool = arg(True, "continue from run_dir/checkpoint.pt if there is one")
    val_every: int = arg(2, "validate on all 17 completion levels every this many epochs", advanced=True)
    val_smooth: int = arg(3, "keep the network with the best validation AUIR averaged over this many validations", advanced=True)
    eval_batch: int = arg(1024, "images per forward pass when validating and exporting", advanced=True)
    force: bool = arg(False, "write into --run-dir even if it holds other files")

    def embedding_config(self) -> EmbeddingConfig:
        return EmbeddingConfig(
            backbone=self.backbone,
            embedding_dim=self.embedding_dim,
            image_size=self.image_size,
            shared_branches=self.shared_branches,
            photo_input=self.photo_input,
            backbone_weights=self.backbone_weights,
            frozen_stages=self.frozen_stages,
            width=self.width,
            tta_flip=self.tta_flip,
            local_dim=self.local_dim,
        )

    def check(self) -> None:
        """Refuse settings that cannot train, with the option named (ConfigError)."""
        problems = []
        if self.epochs < 1:
            problems.append(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            problems.append(f"--batch-size must be >= 2, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--lr must be a number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"--weight-decay must be a number >= 0, got {self.weight_decay}")
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            problems.append(f"--image-size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] pixels, got {self.image_size}")
        if not 1 <= self.embedding_dim <= 4096 or not 1 <= self.width <= 1024:
            problems.append(f"--embedding-dim must be in [1, 4096] and --width in [1, 1024], got {self.embedding_dim} and {self.width}")
        if self.patience < 1 or self.num_threads < 1 or self.eval_batch < 1:
            problems.append(f"--patience, --num-threads and --eval-batch must be >= 1, got {self.patience}, "
                            f"{self.num_threads} and {self.eval_batch}")
        if not (math.isfinite(self.time_budget_s) and self.time_budget_s >= 0):
            problems.append(f"--time-budget-s must be >= 0 (0: no limit), got {self.time_budget_s}")
        if not (math.isfinite(self.late_weight) and self.late_weight >= 0):
            problems.append(f"--late-weight must be a number >= 0, got {self.late_weight}")
        if self.levels_per_sketch < 1:
            problems.append(f"--levels-per-sketch must be >= 1, got {self.levels_per_sketch}")
        if not 0.0 <= self.complete_fraction <= 1.0:
            problems.append(f"--complete-fraction must be in [0, 1], got {self.complete_fraction}")
        if not 0.0 <= self.stroke_drop_p < 1.0:
            problems.append(f"--stroke-drop-p must be in [0, 1), got {self.stroke_drop_p}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if any(w < 1 for w in self.pen_widths):
            problems.append(f"--pen-widths must be >= 1 pixel, got {self.pen_widths}")
        if not (self.margin >= 0 and math.isfinite(self.margin) and self.temperature > 0 and math.isfinite(self.temperature)):
            problems.append(f"--margin must be >= 0 and --temperature > 0, got {self.margin} and {self.temperature}")
        if not 0 <= self.frozen_stages < n_stages(self.backbone):
            problems.append(f"--frozen-stages must be in [0, {n_stages(self.backbone) - 1}] for {self.backbone} "
                            f"({n_stages(self.backbone)} stages; at least one trains), got {self.frozen_stages}")
        if self.frozen_stages and (self.stroke_augment or self.pen_widths or self.tta_flip):
            problems.append("--frozen-stages caches one rendering of each image: it cannot be combined with "
                            "--stroke-augment, --pen-widths or --tta-flip")
        if self.backbone_weights and self.backbone == "compact":
            problems.append("--backbone-weights needs a torchvision --backbone (the compact one trains from scratch)")
        if not self.backbone_lr_scale > 0 or not self.stem_cache_gib > 0:
            problems.append(f"--backbone-lr-scale and --stem-cache-gib must be > 0, got {self.backbone_lr_scale} and {self.stem_cache_gib}")
        if self.local_dim < 0 or self.local_weight < 0 or self.local_temperature <= 0:
            problems.append(f"--local-dim and --local-weight must be >= 0 and --local-temperature > 0, got "
                            f"{self.local_dim}, {self.local_weight} and {self.local_temperature}")
        if self.local_dim and self.backbone != "compact":
            problems.append(f"--local-dim needs --backbone compact for now, got {self.backbone}")
        if self.local_dim and self.frozen_stages:
            problems.append("--local-dim trains the trunk's feature map: it cannot be combined with --frozen-stages")
        if self.val_every < 1 or self.val_smooth < 1:
            problems.append(f"--val-every and --val-smooth must be >= 1, got {self.val_every} and {self.val_smooth}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class Phase1Data:
    """What training reads, computed once: sketches, level maps, photo inputs, the split's rows."""

    sketches: SketchSet  # all sketches of the data set
    first_ink: torch.Tensor  # (S, H, W) uint8 level maps of all sketches, default pen
    photos: torch.Tensor  # (N, C, H, W) float, all photos
    photo_of: torch.Tensor  # (S,) long: row in `photos` of each sketch's photo
    train: torch.Tensor  # rows of training sketches
    val: torch.Tensor  # rows of validation sketches
    val_photos: torch.Tensor  # rows of the validation photos (the validation gallery)
    photo_ids: np.ndarray  # (N,) photo id of each row of `photos`
    stems: StemCache | None = None  # the frozen stages' outputs, when the network has frozen stages


@dataclass
class StemCache:
    """The frozen stages' outputs of every image phase 1 reads, computed once (`stem_cache`).

    sketch: (S, 17, C, h, w) fp16, every sketch at every completion level (default pen);
    photo: (N, C, h, w) fp16, every photo. Training, validation and the export read these instead of
    running the frozen stages again: an epoch then costs only the stages that train.
    """

    sketch: torch.Tensor
    photo: torch.Tensor


def _rows(ids, keep) -> torch.Tensor:
    keep = set(keep)
    return torch.from_numpy(np.flatnonzero(np.fromiter((i in keep for i in ids), bool, len(ids))))


def prepare_data(ds: Dataset, emb_cfg: EmbeddingConfig) -> Phase1Data:
    """Render the sketches and turn the photos into network inputs, once."""
    if len(set(ds.sketches.sketch_id)) != len(ds.sketches):
        raise DataError(f"{ds.path}: sketch ids are not unique")
    train, val = select_split(ds, "train"), select_split(ds, "val")
    if len(set(train.sketches.photo_id)) < 2:
        raise DataError(f"{ds.path}: the training split needs sketches of at least 2 photos, has {len(train.sketches)} sketches")
    if len(val.sketches) == 0:
        raise DataError(f"{ds.path}: the validation split has no sketches")
    photo_row = ds.photos.index_of()
    return Phase1Data(
        sketches=ds.sketches,
        first_ink=torch.from_numpy(first_ink_level(ds.sketches, emb_cfg.image_size)),
        photos=photo_inputs(ds.photos.decode_all(photo_decode_size(emb_cfg)), emb_cfg),
        photo_of=torch.tensor([photo_row[p] for p in ds.sketches.photo_id], dtype=torch.long),
        train=_rows(ds.sketches.sketch_id, train.sketches.sketch_id),
        val=_rows(ds.sketches.sketch_id, val.sketches.sketch_id),
        val_photos=_rows(ds.photos.photo_id, val.photos.photo_id),
        photo_ids=np.asarray(ds.photos.photo_id, dtype=object),
    )


@torch.no_grad()
def stem_cache(net: EmbeddingNet, d: Phase1Data, batch: int = 256, limit_gib: float = 8.0,
               dtype: torch.dtype = torch.float16, precision: str = "float32") -> StemCache:
    """Run `net`'s frozen stages once over every sketch at every level and every photo of `d`.

    precision "bfloat16": under bfloat16 autocast with the network and images channels-last, where
    oneDNN's AMX / AVX-512 BF16 kernels run the convolutions ~4x faster than float32 on 2 cores
    (benchmarks/bench_phase1.py --speed); the cached maps are stored as `dtype` either way.

    Refuses (naming the option) when the cache would take more than `limit_gib`: fewer levels of a
    large map quickly reach gigabytes (VGG16 at 128 px after 2 blocks: 256 KB per image in fp16).
    """
    first = d.first_ink
    s, n = len(first), N_LEVELS
    shape = tuple(net.stem_sketches(torch.zeros(1, 1, *first.shape[1:])).shape[1:])
    gib = (s * n + len(d.photos)) * math.prod(shape) * torch.finfo(dtype).bits / 8 / 2**30
    if gib > limit_gib:
        raise DataError(f"the frozen stages' outputs {shape} of {s} sketches x {n} levels and {len(d.photos)} photos "
                        f"take {gib:.1f} GiB, over --stem-cache-gib {limit_gib}: freeze more stages, use a smaller "
                        "--image-size, or raise --stem-cache-gib")
    if precision not in ("bfloat16", "float32"):
        raise ValueError(f"precision must be bfloat16 or float32, got {precision!r}")
    bf16 = precision == "bfloat16"
    layout = torch.channels_last if bf16 else torch.contiguous_format
    was_training = net.training
    net.eval().to(memory_format=layout)

    def stems(embed, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return embed(images.contiguous(memory_format=layout)).to(dtype).contiguous()

    try:
        sketch = torch.empty((s * n, *shape), dtype=dtype)
        flat_sketch, flat_level = torch.arange(s).repeat_interleave(n), torch.arange(n, dtype=torch.uint8).repeat(s)
        for start in range(0, s * n, batch):
            images = (first[flat_sketch[start : start + batch]] <= flat_level[start : start + batch, None, None]).float()
            sketch[start : start + batch] = stems(net.stem_sketches, images.unsqueeze(1))
        photo = torch.cat([stems(net.stem_photos, d.photos[i : i + batch]) for i in range(0, len(d.photos), batch)])
    finally:
        net.train(was_training).to(memory_format=torch.contiguous_format)
    return StemCache(sketch=sketch.view(s, n, *shape), photo=photo)


@torch.no_grad()
def embed_photo_rows(net: EmbeddingNet, d: Phase1Data, rows: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """(len(rows), D) embeddings of photos `rows` of `d`, from the stem cache when there is one."""
    if d.stems is None:
        return embed_photo_inputs(net, d.photos[rows], batch)
    was_training = net.training
    net.eval()
    out = torch.cat([net.embed_photo_stems(d.stems.photo[rows[i : i + batch]]) for i in range(0, len(rows), batch)])
    net.train(was_training)
    return out


@torch.no_grad()
def embed_sketch_rows(net: EmbeddingNet, d: Phase1Data, rows: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """(len(rows), 17, D) embeddings of sketches `rows` of `d` at every level, from the stem cache when there is one."""
    if d.stems is None:
        return embed_sketch_levels(net, d.first_ink[rows].numpy(), batch)
    was_training = net.training
    net.eval()
    out = torch.empty(len(rows) * N_LEVELS, net.config.embedding_dim)
    flat = rows.repeat_interleave(N_LEVELS), torch.arange(N_LEVELS).repeat(len(rows))
    for start in range(0, len(out), batch):
        out[start : start + batch] = net.embed_sketch_stems(d.stems.sketch[flat[0][start : start + batch], flat[1][start : start + batch]])
    net.train(was_training)
    return out.view(len(rows), N_LEVELS, -1)


def validate(net: EmbeddingNet, d: Phase1Data, batch: int = 1024) -> dict:
    """`retrieval_metrics` of the validation sketches at all 17 levels against the validation photos."""
    photo_emb = embed_photo_rows(net, d, d.val_photos, batch)
    sketch_emb = embed_sketch_rows(net, d, d.val, batch)
    ranks = ranks_from_embeddings(
        photo_emb, d.photo_ids[d.val_photos.numpy()], sketch_emb, d.photo_ids[d.photo_of[d.val].numpy()]
    )
    return retrieval_metrics(ranks, len(d.val_photos))


def epoch_level_maps(cfg: Phase1Config, d: Phase1Data, rng: np.random.Generator) -> torch.Tensor:
    """Level maps of the training sketches for one epoch: (n_pens, n_train, H, W) uint8.

    Without stroke augmentation and pen widths, the precomputed maps (one pen). Otherwise the
    training sketches are edited afresh (`augment_strokes`) and rendered once per pen width.
    """
    if not cfg.stroke_augment and not cfg.pen_widths:
        return d.first_ink[d.train].unsqueeze(0)
    sketches = d.sketches.subset(d.train.numpy())
    if cfg.stroke_augment:
        sketches = augment_strokes(sketches, rng, drop_p=cfg.stroke_drop_p)
    pens = cfg.pen_widths or (default_thickness(cfg.image_size),)
    return torch.from_numpy(np.stack([first_ink_level(sketches, cfg.image_size, thickness=p) for p in pens]))


def train_epoch(
    net: EmbeddingNet,
    optimizer: torch.optim.Optimizer,
    cfg: Phase1Config,
    d: Phase1Data,
    level_maps: torch.Tensor | None,
    gen: torch.Generator,
    deadline: float,
    on_batch,
    after_step=None,
) -> tuple[float, bool]:
    """One pass over the training sketches in random order. Returns (mean loss, stopped by deadline).

    level_maps: `epoch_level_maps`, rows in the order of d.train (None: d.stems is read); after_step(): called after every
    optimizer step (the weight average's update).
    """
    net.train()
    order = torch.randperm(len(d.train), generator=gen)
    n_batches = max(1, len(order) // cfg.batch_size)  # drop the ragged last batch unless it is the only one
    reps = cfg.levels_per_sketch
    total, count = 0.0, 0
    for b in range(n_batches):
        pos = order[b * cfg.batch_size : (b + 1) * cfg.batch_size] if n_batches > 1 else order
        photo_rows, labels = torch.unique(d.photo_of[d.train[pos]], return_inverse=True)
        if len(photo_rows) < 2:
            continue
        pos_rep = pos.repeat(reps)
        levels = sample_levels(len(pos_rep), N_LEVELS, cfg.train_on_partial, generator=gen,
                               complete_fraction=cfg.complete_fraction)
        if d.stems is not None:  # the frozen stages' cached outputs; the affine acts on their maps
            sketches, photos = d.stems.sketch[d.train[pos_rep], levels].float(), d.stems.photo[photo_rows].float()
        else:
            pens = level_maps.shape[0]  # drawn only when there is a choice: one pen samples as the stem cache does
            pen = torch.randint(pens, (len(pos_rep),), generator=gen) if pens > 1 else torch.zeros(len(pos_rep), dtype=torch.long)
            sketches = (level_maps[pen, pos_rep] <= levels[:, None, None].to(torch.uint8)).float().unsqueeze(1)
            photos = d.photos[photo_rows]
        if cfg.augment:
            sketches = random_affine(sketches, generator=gen)
            photos = random_affine(photos, generator=gen)
        with captured_feature_maps(net) as maps:  # empty without local descriptors
            s_emb, p_emb = net.forward_stems(sketches, photos) if d.stems is not None else net(sketches, photos)
        weight = ((levels.float() + 1.0) / N_LEVELS) ** cfg.late_weight if cfg.late_weight else None
        targets = labels.repeat(reps)
        if cfg.loss == "infonce":
            loss = batch_infonce_loss(s_emb, p_emb, targets, cfg.temperature, weight)
        else:
            loss = batch_triplet_loss(s_emb, p_emb[targets], targets, cfg.margin, cfg.mining, gen, weight)
        if maps:
            loss = loss + cfg.local_weight * local_loss(net, maps, sketches, targets, cfg.local_temperature, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total, count = total + loss.item(), count + 1
        on_batch(total / count)
        if time.monotonic() > deadline:
            return total / max(count, 1), True
    return total / max(count, 1), False


def _lr_at(cfg: Phase1Config, epoch: int) -> float:
    if cfg.lr_schedule == "cosine":
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(epoch, cfg.epochs) / cfg.epochs))
    return cfg.lr


def _load_checkpoint(path: Path, emb_cfg: EmbeddingConfig) -> dict:
    """The checkpoint at `path`, refused if it holds another network than `emb_cfg` describes."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for unreadable files
        raise DataError(f"{path}: cannot read the checkpoint ({e}); use --no-resume to start over") from None
    if not isinstance(ckpt, dict) or "embedding_config" not in ckpt:
        raise DataError(f"{path}: not a phase-1 checkpoint; use --no-resume to start over")
    saved = {**dataclasses.asdict(EmbeddingConfig()), **ckpt["embedding_config"], "backbone_weights": None}
    wanted = {**dataclasses.asdict(emb_cfg), "backbone_weights": None}
    if saved != wanted:
        raise DataError(
            f"{path}: checkpoint of a different network {saved}, asked for {wanted}; "
            "use --no-resume to start over or another --run-dir"
        )
    return ckpt


def export_embeddings(net: EmbeddingNet, ds: Dataset, d: Phase1Data, batch: int, meta: dict) -> EmbeddingExport:
    """Embeddings of every photo (N, D) and every sketch at every level (S, 17, D).

    Splits are the project's: "train", "val" (select_split's validation photos) or "test".
    """
    photo_split = np.asarray(ds.photos.split, dtype=object).copy()
    photo_split[d.val_photos.numpy()] = "val"
    sketch_split = np.asarray(ds.sketches.split, dtype=object).copy()
    sketch_split[d.val.numpy()] = "val"
    return EmbeddingExport(
        photo_id=np.asarray(ds.photos.photo_id, dtype=object),
        photo_split=photo_split,
        photo_embedding=embed_photo_rows(net, d, torch.arange(len(d.photos)), batch).numpy(),
        sketch_id=np.asarray(ds.sketches.sketch_id, dtype=object),
        sketch_photo_id=np.asarray(ds.sketches.photo_id, dtype=object),
        sketch_split=sketch_split,
        sketch_embedding=embed_sketch_rows(net, d, torch.arange(len(d.first_ink)), batch).numpy(),
        meta=meta,
        sketch_digest=sketch_digests(ds.sketches),
        photo_digest=photo_digests(ds.photos),
    )


def make_optimizer(cfg: Phase1Config, net: EmbeddingNet) -> torch.optim.Adam:
    """Adam over what trains: a pretrained backbone's trained stages at lr x backbone_lr_scale (the
    field's fine-tuning: small steps keep what the weights know), everything else at lr."""
    scale = cfg.backbone_lr_scale if cfg.backbone_weights else 1.0
    backbone = {id(p) for p in net.backbone_parameters()}
    rest = [p for p in net.parameters() if p.requires_grad and id(p) not in backbone]
    groups = [{"params": net.backbone_parameters(), "lr_scale": scale}, {"params": rest, "lr_scale": 1.0}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)


def ema_with_warmup(decay: float):
    """AveragedModel's multi_avg_fn: an exponential moving average whose decay after n updates is
    min(decay, (1 + n) / (10 + n)), so that a short run's average is not dominated by the random
    initial weights (with a fixed 0.999 they still weigh 22% after 1,500 steps)."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (batch norm's counter): follow the model
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def weight_average(cfg: Phase1Config, net: EmbeddingNet) -> AveragedModel | None:
    """The exponential moving average of `net`'s weights and batch-norm statistics, if asked for."""
    if not cfg.ema_decay:
        return None
    return AveragedModel(net, multi_avg_fn=ema_with_warmup(cfg.ema_decay), use_buffers=True)


@dataclass
class TrainingState:
    """Where phase-1 training stands: saved with every checkpoint (all but `best_state`) and resumed from."""

    epoch: int = 0
    best: float = -math.inf  # the best smoothed validation AUIR so far
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best (early stopping after cfg.patience)
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0
    val_auir: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None  # the best network's state dict, kept only when nothing is written (run_dir None)

    def saved(self) -> dict:
        """What a checkpoint holds of it."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "best_state"}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> TrainingState:
        return cls(**{k: ckpt[k] for k in cls().saved()})


def fit(cfg: Phase1Config, net: EmbeddingNet, optimizer: torch.optim.Optimizer, d: Phase1Data, state: TrainingState,
        run_dir: Path | None, quiet: bool = False, ema: AveragedModel | None = None) -> None:
    """Epochs until cfg.epochs, early stopping or the time budget; `state` is updated in place.

    Every `val_every` epochs: validation on all levels, and the network to run_dir/embedding_net.pt
    when its smoothed AUIR is the best so far. After every epoch an atomic checkpoint (network,
    optimizer, weight average, `state`) to run_dir/checkpoint.pt. With `ema` (`weight_average`) the
    averaged network is the one validated, kept and exported. run_dir None: nothing is written
    (benchmarks); the best state dict is then kept in state.best_state.
    """
    judged = ema.module if ema is not None else net
    after_step = (lambda: ema.update_parameters(net)) if ema is not None else None
    budget = cfg.time_budget_s if cfg.time_budget_s > 0 else math.inf
    bar = tqdm(total=cfg.epochs, initial=state.epoch, desc="pretrain", unit="epoch", dynamic_ncols=True, disable=quiet)
    postfix: dict[str, str] = {}

    def show(loss: float) -> None:
        postfix["loss"] = f"{loss:.3f}"
        bar.set_postfix(postfix, refresh=False)

    try:
        while state.epoch < cfg.epochs and state.bad_epochs < cfg.patience and state.train_seconds < budget:
            start, cpu_start = time.monotonic(), time.process_time()
            seed = cfg.seed * 100_003 + state.epoch
            gen = torch.Generator().manual_seed(seed)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(cfg, state.epoch) * group.get("lr_scale", 1.0)
            level_maps = None if d.stems is not None else epoch_level_maps(cfg, d, np.random.default_rng(seed))
            deadline = start + budget - state.train_seconds
            loss, out_of_time = train_epoch(net, optimizer, cfg, d, level_maps, gen, deadline, show, after_step)
            state.epoch += 1
            entry = {"epoch": state.epoch, "loss": loss, "lr": _lr_at(cfg, state.epoch - 1)}
            last = state.epoch >= cfg.epochs or out_of_time
            if state.epoch % cfg.val_every == 0 or last:
                metrics = validate(judged, d, cfg.eval_batch)
                state.val_auir.append(metrics["auir"])
                smoothed = float(np.mean(state.val_auir[-cfg.val_smooth :]))
                entry.update({k: metrics[k] for k in ("auir", "m_at_a", "acc@1", "acc@5", "acc@10")}, smoothed_auir=smoothed)
                if smoothed > state.best:
                    state.best, state.bad_epochs, state.best_epoch = smoothed, 0, state.epoch
                    if run_dir is not None:
                        save_embedding_net(run_dir, judged, net.config)
                    else:
                        state.best_state = {k: v.detach().clone() for k, v in judged.state_dict().items()}
                else:
                    state.bad_epochs += cfg.val_every
                postfix.update({"val_auir": f"{metrics['auir']:.1f}", "val_acc@1": f"{metrics['acc@1']:.1f}",
                                "val_acc@5": f"{metrics['acc@5']:.1f}",
                                "best": f"{state.best:.1f}"})
            state.train_seconds += time.monotonic() - start
            state.cpu_seconds += time.process_time() - cpu_start
            entry.update(seconds=round(state.train_seconds, 2), cpu_seconds=round(state.cpu_seconds, 2))
            state.history.append(entry)
            if run_dir is not None:
                payload = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                           "ema": ema.state_dict() if ema is not None else None,
                           "embedding_config": dataclasses.asdict(net.config),
                           **state.saved()}
                atomic_write(run_dir / CHECKPOINT_FILE, lambda p: torch.save(payload, p))
            bar.update(1)
            show(loss)
            if out_of_time:
                break
    finally:
        bar.close()


def run(cfg: Phase1Config) -> dict:
    """Train (or resume), keep the best network, export embeddings, write run.json. Returns run.json.

    Bad options, data or output directory: ConfigError / DataError before anything is written.
    RunStopped when interrupted (the checkpoint it resumes from is written)."""
    cfg.check()
    torch.set_num_threads(cfg.num_threads)
    weights_file = cfg.backbone_weights if cfg.backbone_weights != HED_WEIGHTS else None
    inputs = (cfg.data, weights_file)
    check_output_dir(cfg.run_dir, RUN_KIND, inputs=inputs, force=cfg.force)
    emb_cfg = cfg.embedding_config()
    ds = load_dataset(cfg.data)
    d = prepare_data(ds, emb_cfg)
    run_dir = prepare_output_dir(cfg.run_dir, RUN_KIND, inputs=inputs, force=cfg.force)

    torch.manual_seed(cfg.seed)
    net = EmbeddingNet(emb_cfg)
    optimizer = make_optimizer(cfg, net)
    ema = weight_average(cfg, net)
    if emb_cfg.frozen_stages:
        start = time.monotonic()
        d.stems = stem_cache(net, d, limit_gib=cfg.stem_cache_gib, precision=cfg.stem_precision)
        print(f"cached the {emb_cfg.frozen_stages} frozen stage(s)' outputs {tuple(d.stems.photo.shape[1:])} of "
              f"{len(d.first_ink)} sketches x {N_LEVELS} levels and {len(d.photos)} photos in {time.monotonic() - start:.0f} s")
    state = TrainingState()
    ckpt_path = run_dir / CHECKPOINT_FILE
    if cfg.resume and ckpt_path.is_file():
        ckpt = _load_checkpoint(ckpt_path, emb_cfg)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if (ema is None) != (ckpt.get("ema") is None):
            raise DataError(f"{ckpt_path}: checkpoint {'without' if ema is not None else 'with'} a weight average; "
                            "keep --ema-decay as it was, or use --no-resume to start over")
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        if not isinstance(ckpt.get("best"), float):
            raise DataError(f"{ckpt_path}: checkpoint of an older phase-1 version; use --no-resume to start over")
        state = TrainingState.from_checkpoint(ckpt)
        print(f"resuming {ckpt_path} after epoch {state.epoch} ({state.train_seconds:.0f} s trained)")
    try:
        fit(cfg, net, optimizer, d, state, run_dir, ema=ema)
    except KeyboardInterrupt:
        raise RunStopped(f"interrupted: {ckpt_path} holds epoch {state.epoch}; run the same command to resume") from None

    best_net, _ = load_embedding_net(run_dir)
    meta = {"kind": "triplet", "data": str(Path(cfg.data).resolve()), "data_fingerprint": data_fingerprint(cfg.data),
            "embedding_config": dataclasses.asdict(emb_cfg), "n_levels": N_LEVELS}
    save_embedding_export(run_dir, export_embeddings(best_net, ds, d, cfg.eval_batch, meta))
    if best_net.local_head is not None:
        save_local_grids(run_dir, export_local_grids(best_net, ds, d.photos, d.first_ink, cfg.eval_batch))
    val_metrics = validate(best_net, d, cfg.eval_batch)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    record = {"kind": "triplet", "config": config, "val_metrics": val_metrics,
              "train_seconds": round(state.train_seconds, 2), "train_cpu_seconds": round(state.cpu_seconds, 2),
              "epochs": state.epoch, "best_epoch": state.best_epoch, "history": state.history}
    atomic_write_json(run_dir / RUN_FILE, record)
    print(f"validation ({val_metrics['n_sketches']} sketches, {val_metrics['n_photos']} photos): "
          f"acc@1 {val_metrics['acc@1']:.1f}  acc@5 {val_metrics['acc@5']:.1f}  acc@10 {val_metrics['acc@10']:.1f}  "
          f"AUIR {val_metrics['auir']:.2f}  m@A {val_metrics['m_at_a']:.2f}  "
          f"(epoch {state.best_epoch} of {state.epoch}, {state.train_seconds:.0f} s)")
    return record
