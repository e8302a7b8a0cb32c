"""Phase-1 recipes compared at convergence: one table of validation figures over seeds.

Each recipe is a set of `darp pretrain` options (policies.phase1.training.Phase1Config) trained to the end of
its schedule (or early stopping) for every seed on the project's own validation split (by photo), and
judged by the network it keeps (best validation AUIR smoothed over 3 validations). The table gives
val AUIR, m@A, acc@1/5/10 (mean +- std over seeds), the epoch kept and the training seconds on this
machine. Results are appended to a JSON-lines file, so an interrupted comparison resumes and a table
can be printed again without training (`--table-only`).

    .venv/bin/python benchmarks/bench_phase1.py --data data/chairv2 --out runs/bench_phase1.jsonl \
        --recipes default paper triplet hed-multi --seeds 0 1 2

`--speed` instead measures what each network choice costs (backbone, frozen stages, input size): the
stem cache per image and for Chair-V2, a training step per pair and an epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from policies.phase1.edges import photo_edges  # noqa: E402
from policies.phase1.embedding import EmbeddingConfig, EmbeddingNet  # noqa: E402
from policies.phase1.training import (  # noqa: E402
    Phase1Config,
    StemCache,
    TrainingState,
    fit,
    make_optimizer,
    prepare_data,
    stem_cache,
    validate,
    weight_average,
)
from policies.phase1.triplet import batch_infonce_loss  # noqa: E402
from sketch_env.atomic import atomic_write  # noqa: E402
from sketch_env.data import load_dataset  # noqa: E402

# name -> Phase1Config overrides of the defaults (partial sketches, InfoNCE, weight average).
RECIPES: dict[str, dict] = {
    "default": dict(),
    "paper": dict(train_on_partial=False, loss="triplet", ema_decay=0.0),  # complete sketches, triplet (issue 14's row 1)
    "triplet": dict(loss="triplet", ema_decay=0.0),  # partial sketches, batch-hard triplet (issue 14's best row)
    "triplet-ema": dict(loss="triplet"),
    "no-ema": dict(ema_decay=0.0),
    "constant-lr": dict(lr_schedule="constant"),
    "mixture": dict(complete_fraction=0.3),
    "multilevel": dict(levels_per_sketch=3, complete_fraction=0.3),
    "multilevel-late": dict(levels_per_sketch=3, complete_fraction=0.3, late_weight=1.0),
    "strokes": dict(stroke_augment=True, pen_widths=(1, 2, 3)),
    "hed": dict(photo_input="hed"),
    "hed-multi": dict(photo_input="hed", levels_per_sketch=2, complete_fraction=0.3),
    "tta": dict(tta_flip=True),
    "wide": dict(width=24),
    "size96": dict(image_size=96),
    "batch64": dict(batch_size=64),
    # pretrained VGG16 (HED's weights, installed; torchvision's ImageNet file works the same way), blocks 1-4
    # frozen and cached once, block 5 and the head fine-tuned (issue 22); random: the same network untrained
    "vgg16-hed": dict(backbone="vgg16", backbone_weights="hed", frozen_stages=4, photo_input="rgb"),
    "vgg16-hed-edges": dict(backbone="vgg16", backbone_weights="hed", frozen_stages=4, photo_input="edges"),
    "vgg16-hed-f3": dict(backbone="vgg16", backbone_weights="hed", frozen_stages=3, photo_input="rgb"),
    "vgg16-random": dict(backbone="vgg16", frozen_stages=4, photo_input="rgb"),
}
FIGURES = ("auir", "m_at_a", "acc@1", "acc@5", "acc@10")


def cached_stems(net: EmbeddingNet, cfg: Phase1Config, d, cache_dir: Path | None) -> tuple[StemCache, float]:
    """The frozen stages' outputs for `net` (policies.phase1.training.stem_cache), read from `cache_dir` when an
    earlier run computed them (same data, network and frozen weights), and the seconds computing them took."""
    emb = cfg.embedding_config()
    key = [str(Path(cfg.data).resolve()), emb.backbone, emb.backbone_weights, emb.frozen_stages, emb.image_size,
           emb.photo_input, cfg.stem_precision, None if emb.backbone_weights else cfg.seed]  # random frozen stages differ per seed
    path = cache_dir / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16] + ".pt") if cache_dir else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return StemCache(sketch=saved["sketch"], photo=saved["photo"]), saved["seconds"]
    start = time.monotonic()
    stems = stem_cache(net, d, limit_gib=cfg.stem_cache_gib, precision=cfg.stem_precision)
    seconds = time.monotonic() - start
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: torch.save({"key": key, "sketch": stems.sketch, "photo": stems.photo, "seconds": seconds}, p))
    return stems, seconds


def train_recipe(ds, name: str, overrides: dict, seed: int, base: dict, cache: dict, cache_dir: Path | None = None) -> dict:
    """Train one recipe for one seed in memory; the kept network's validation figures."""
    cfg = Phase1Config(data=str(ds.path), run_dir="", seed=seed, **{**base, **overrides})
    cfg.check()
    emb_cfg = cfg.embedding_config()
    key = (emb_cfg.image_size, emb_cfg.photo_input)
    if key not in cache:
        cache[key] = prepare_data(ds, emb_cfg)
    d = cache[key]
    torch.manual_seed(seed)
    net = EmbeddingNet(emb_cfg)
    cache_seconds = 0.0
    if emb_cfg.frozen_stages:
        stems, cache_seconds = cached_stems(net, cfg, d, cache_dir)
        d = dataclasses.replace(d, stems=stems)
    optimizer = make_optimizer(cfg, net)
    state = TrainingState()
    start = time.monotonic()
    fit(cfg, net, optimizer, d, state, run_dir=None, quiet=True, ema=weight_average(cfg, net))
    net.load_state_dict(state.best_state)
    metrics = validate(net, d, cfg.eval_batch)
    other_tta = {}
    if d.stems is None:
        net.config = dataclasses.replace(net.config, tta_flip=not cfg.tta_flip)
        other = validate(net, d, cfg.eval_batch)  # the same network with test-time flips switched
        other_tta = {k: other[k] for k in FIGURES}
    return {"other_tta": other_tta, "recipe": name, "seed": seed, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
            "base": base, **{k: metrics[k] for k in FIGURES}, "best_epoch": state.best_epoch, "epochs": state.epoch,
            "train_seconds": round(state.train_seconds, 1), "cache_seconds": round(cache_seconds, 1),
            "wall_seconds": round(time.monotonic() - start, 1),
            "curve": [(h["epoch"], h.get("auir"), h.get("acc@5"), round(h["loss"], 4)) for h in state.history if "auir" in h]}


def row_of_run(run_dir: str, name: str, base: dict) -> dict:
    """A table row from a finished `darp pretrain` run (the same engine, trained by the command)."""
    record = json.loads((Path(run_dir) / "run.json").read_text())
    cfg = record["config"]
    return {"recipe": name, "seed": cfg["seed"], "run_dir": str(run_dir), "base": base, "config": cfg,
            **{k: record["val_metrics"][k] for k in FIGURES}, "best_epoch": record["best_epoch"],
            "epochs": record["epochs"], "train_seconds": record["train_seconds"]}


def table(rows: list[dict]) -> str:
    by_recipe: dict[str, list[dict]] = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], []).append(r)
    lines = ["| recipe | seeds | val AUIR | m@A | acc@1 | acc@5 | acc@10 | epoch kept / run | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in by_recipe.items():
        cells = []
        for k in FIGURES:
            v = np.array([r[k] for r in rs])
            cells.append(f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}")
        kept = f"{np.mean([r['best_epoch'] for r in rs]):.0f} / {np.mean([r['epochs'] for r in rs]):.0f}"
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {kept} | {np.mean([r['train_seconds'] for r in rs]):.0f} |")
    return "\n".join(lines)


def best_rate(call, items: int, seconds: float) -> float:
    """Items per second of the fastest of repeated calls within `seconds` (after one warm-up call)."""
    call()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > deadline:
            return items / best


def speed(setups: list[str], seconds: float, batch: int = 32, n_images: int = 952 * 17 + 300, n_train: int = 760) -> None:
    """What each network choice costs on this machine (fastest of repeated calls, torch threads as set).

    A setup is BACKBONE:FROZEN@SIZE (e.g. vgg16:4@64). Per setup: the frozen stages' output per image,
    their cost per image (paid once, by the stem cache), a training step from the cached output per
    (sketch, photo) pair, and what these add up to on Chair-V2's training split: the cache (every
    sketch at 17 levels and every photo) and one epoch (760 sketches, one photo each).
    """
    photos = np.random.default_rng(0).integers(0, 256, (64, 256, 256, 3), dtype=np.uint8)
    print(f"photo_edges 256 -> 64: {best_rate(lambda: photo_edges(photos, 64), len(photos), seconds):,.0f} photos/s")
    print("| setup | stem output | stem ms/image fp32 | bf16 | train ms/pair | cache s (Chair-V2, bf16) | epoch s (760 pairs) |")
    print("|---|---|---|---|---|---|---|")
    for setup in setups:
        backbone, rest = setup.split(":") if ":" in setup else (setup, "0@64")
        frozen, size = (int(v) for v in rest.split("@"))
        torch.manual_seed(0)
        net = EmbeddingNet(EmbeddingConfig(backbone=backbone, image_size=size, frozen_stages=frozen, photo_input="rgb"))
        optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
        sketches = (torch.rand(batch, 1, size, size) > 0.9).float()
        photo = torch.rand(batch, 3, size, size)
        with torch.no_grad():
            stem_rate = best_rate(lambda: net.stem_sketches(sketches), batch, seconds) if frozen else math.inf
            s_stem, p_stem = net.stem_sketches(sketches).half(), net.stem_photos(photo).half()
            net.eval().to(memory_format=torch.channels_last)  # the stem cache's bfloat16 pass
            fast = sketches.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16_rate = best_rate(lambda: net.stem_sketches(fast), batch, seconds) if frozen else math.inf
            net.to(memory_format=torch.contiguous_format)
        labels = torch.arange(batch)

        def step() -> None:
            s, p = net.forward_stems(s_stem, p_stem)
            loss = batch_infonce_loss(s, p, labels, 0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        net.train()
        train_rate = best_rate(step, batch, seconds)
        stem_ms, bf16_ms = 1e3 / stem_rate, 1e3 / bf16_rate
        print(f"| {setup} | {tuple(s_stem.shape[1:])} | {stem_ms:.2f} | {bf16_ms:.2f} | {1e3 / train_rate:.2f} | "
              f"{n_images * bf16_ms / 1e3:.0f} | {n_train / train_rate:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="data set directory (e.g. an import of Chair-V2)")
    parser.add_argument("--out", default="runs/bench_phase1.jsonl", help="JSON-lines results file (appended; resumes)")
    parser.add_argument("--recipes", nargs="+", default=["default", "paper", "triplet", "hed-multi"], choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--base", default="{}", help="JSON of options every recipe shares, e.g. '{\"epochs\": 300}'")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--table-only", action="store_true", help="print the table of what --out holds")
    parser.add_argument("--add-run", nargs=2, action="append", default=[], metavar=("RECIPE", "RUN_DIR"),
                        help="add a finished darp pretrain run trained with RECIPE's options and --base as a row")
    parser.add_argument("--stem-cache-dir", help="keep the frozen stages' outputs here and reuse them across runs")
    parser.add_argument("--speed", action="store_true", help="measure the cost per backbone instead")
    parser.add_argument("--setups", nargs="+", default=["compact", "vgg16:4@64", "vgg16:3@64", "vgg16:4@96", "vgg16:4@128"],
                        help="--speed: BACKBONE:FROZEN_STAGES@IMAGE_SIZE to measure")
    parser.add_argument("--seconds", type=float, default=3.0, help="--speed: time per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.speed:
        speed(args.setups, args.seconds)
        return
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []
    for name, run_dir in args.add_run:
        row = row_of_run(run_dir, name, json.loads(args.base))
        if not any(r["recipe"] == name and r["seed"] == row["seed"] and r["base"] == row["base"] for r in rows):
            rows.append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    if not args.table_only:
        if not args.data:
            parser.error("--data is required to train recipes")
        base = json.loads(args.base)
        unknown = set(base) - {f.name for f in dataclasses.fields(Phase1Config)}
        if unknown:
            parser.error(f"--base: unknown options {sorted(unknown)}")
        ds = load_dataset(args.data)
        cache: dict = {}
        out.parent.mkdir(parents=True, exist_ok=True)
        for name in args.recipes:
            for seed in args.seeds:
                if any(r["recipe"] == name and r["seed"] == seed and r["base"] == base for r in rows):
                    continue
                row = train_recipe(ds, name, RECIPES[name], seed, base, cache, Path(args.stem_cache_dir) if args.stem_cache_dir else None)
                rows.append(row)
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name} seed {seed}: AUIR {row['auir']:.2f} acc@5 {row['acc@5']:.1f} m@A {row['m_at_a']:.2f} "
                      f"(epoch {row['best_epoch']}/{row['epochs']}, {row['train_seconds']:.0f} s)", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
