"""Phase-1 recipes compared at convergence: one table of validation figures over seeds.

Each recipe is a set of `darp pretrain` options (policies.phase1.Phase1Config) trained to the end of
its schedule (or early stopping) for every seed on the project's own validation split (by photo), and
judged by the network it keeps (best validation AUIR smoothed over 3 validations). The table gives
val AUIR, m@A, acc@1/5/10 (mean +- std over seeds), the epoch kept and the training seconds on this
machine. Results are appended to a JSON-lines file, so an interrupted comparison resumes and a table
can be printed again without training (`--table-only`).

    .venv/bin/python benchmarks/bench_phase1.py --data data/chairv2 --out runs/bench_phase1.jsonl \
        --recipes default paper triplet hed-multi --seeds 0 1 2

`--speed` instead measures the cost per backbone: training pairs/s, embedded images/s and edge maps/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from policies.embedding import EmbeddingConfig, EmbeddingNet, photo_edges  # noqa: E402
from policies.phase1 import Phase1Config, fit, new_state, prepare_data, validate, weight_average  # noqa: E402
from policies.triplet import batch_triplet_loss, random_affine  # noqa: E402
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
}
FIGURES = ("auir", "m_at_a", "acc@1", "acc@5", "acc@10")


def train_recipe(ds, name: str, overrides: dict, seed: int, base: dict, cache: dict) -> dict:
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
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = new_state()
    start = time.monotonic()
    fit(cfg, net, optimizer, d, state, run_dir=None, quiet=True, ema=weight_average(cfg, net))
    net.load_state_dict(state["best_state"])
    metrics = validate(net, d, cfg.eval_batch)
    net.config = dataclasses.replace(net.config, tta_flip=not cfg.tta_flip)
    other = validate(net, d, cfg.eval_batch)  # the same network with test-time flips switched
    return {"other_tta": {k: other[k] for k in FIGURES},"recipe": name, "seed": seed, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
            "base": base, **{k: metrics[k] for k in FIGURES}, "best_epoch": state["best_epoch"], "epochs": state["epoch"],
            "train_seconds": round(state["train_seconds"], 1), "wall_seconds": round(time.monotonic() - start, 1),
            "curve": [(h["epoch"], h.get("auir"), h.get("acc@5"), round(h["loss"], 4)) for h in state["history"] if "auir" in h]}


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


def speed(backbones: list[str], seconds: float, batch: int = 32, size: int = 64) -> None:
    """Training pairs/s and embedded images/s per backbone, edge maps/s (fastest of repeated calls)."""
    photos = np.random.default_rng(0).integers(0, 256, (64, 256, 256, 3), dtype=np.uint8)
    print(f"photo_edges 256 -> 64: {best_rate(lambda: photo_edges(photos, 64), len(photos), seconds):,.0f} photos/s")
    print(f"{'backbone':<20} {'train pairs/s':>14} {'embed images/s':>15}")
    for backbone in backbones:
        torch.manual_seed(0)
        net = EmbeddingNet(EmbeddingConfig(backbone=backbone, image_size=size))
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        sketches = (torch.rand(batch, 1, size, size) > 0.9).float()
        photo = (torch.rand(batch, 1, size, size) > 0.9).float()
        labels = torch.arange(batch)

        def step() -> None:
            s, p = net(random_affine(sketches), random_affine(photo))
            loss = batch_triplet_loss(s, p, labels, margin=0.2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        net.train()
        train_rate = best_rate(step, batch, seconds)
        net.eval()
        images = (torch.rand(256, 1, size, size) > 0.9).float()
        with torch.no_grad():
            embed_rate = best_rate(lambda: net.embed_sketches(images), len(images), seconds)
        print(f"{backbone:<20} {train_rate:>14,.0f} {embed_rate:>15,.0f}")


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
    parser.add_argument("--speed", action="store_true", help="measure the cost per backbone instead")
    parser.add_argument("--backbones", nargs="+", default=["compact", "mobilenet_v3_small", "resnet18"])
    parser.add_argument("--seconds", type=float, default=3.0, help="--speed: time per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.speed:
        speed(args.backbones, args.seconds)
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
                row = train_recipe(ds, name, RECIPES[name], seed, base, cache)
                rows.append(row)
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name} seed {seed}: AUIR {row['auir']:.2f} acc@5 {row['acc@5']:.1f} m@A {row['m_at_a']:.2f} "
                      f"(epoch {row['best_epoch']}/{row['epochs']}, {row['train_seconds']:.0f} s)", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
