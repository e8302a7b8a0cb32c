"""`darp evaluate`: retrieval figures of a trained run on one split of a data set.

The gallery is the photos of the evaluated split; every sketch of the split is a query at each of
the 17 completion levels. Ranks come from `sketch_env.gallery.Gallery`, figures from
`sketch_env.metrics.retrieval_metrics`. A triplet run (`darp pretrain`) is queried with the
embedding of each partial sketch (from its export when the export was made from this data set, else
by running its saved network); an RL run is evaluated by `tune_runs.rl_eval.evaluate_policy_run`,
on the phase-1 embeddings of its export, except for sketches (photos) whose strokes (bytes) changed
since the export was made: those are re-embedded by its phase-1 network, so the ranks always belong
to the strokes evaluated.

`--match` ranks in another mode than the run's own (sketch_env.local_match): a triplet run in local
match takes its glimpses where a fixed `--locator` rule puts them (what local matching gives without
RL), in dense match it compares every cell; an RL run can be ranked densely in place of its glimpses.

Writes OUT/metrics.json (auir, m_at_a, acc@1, acc@5, acc@10, percentile_curve, n_sketches, n_photos,
match and its cost: multiply-adds per gallery photo to score one query at one level),
OUT/curve.png (ranking percentile vs completion) and OUT/ranks.parquet (sketch_id, level, rank), and
prints the figures as a table.

    darp evaluate --data /tmp/builtin --split test --run /tmp/runs/triplet --out /tmp/eval/triplet
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from policies.embedding import (
    EmbeddingNet,
    embed_photo_inputs,
    embed_sketch_levels,
    load_embedding_net,
    photo_decode_size,
    photo_inputs,
)
from sketch_env.atomic import OutputKind, atomic_write, atomic_write_json, prepare_output_dir
from sketch_env.data import DataError, Dataset, data_fingerprint, load_dataset, select_split
from sketch_env.embeddings import EXPORT_DIR, EmbeddingExport, gallery_for, load_embedding_export, sketch_embeddings_for
from sketch_env.gallery import ranks_from_embeddings
from sketch_env.metrics import retrieval_metrics
from sketch_env.render import first_ink_level
from tune_runs.cli import arg
from tune_runs.plots import format_percentiles, format_table, plot_curves, plot_glimpses

METRIC_KEYS = ("auir", "m_at_a", "acc@1", "acc@5", "acc@10", "percentile_curve", "n_sketches", "n_photos")
EVAL_KIND = OutputKind("evaluation", ("metrics.json", "glimpses.png"))


@dataclass
class EvaluateConfig:
    """Evaluate a run on a split of a data set: metrics.json, curve.png, ranks.parquet and a table."""

    data: Path = arg(help="data set directory")
    run: Path = arg(help="run directory (darp pretrain or darp train)")
    split: Literal["train", "val", "test", "train+val", "all"] = arg("test", "split to evaluate (select_split's definition)")
    out: Path | None = arg(None, "output directory (default: RUN/eval-SPLIT)")
    level_batch: int = arg(1024, "partial-sketch images per forward pass of a triplet network")
    num_threads: int = arg(2, "torch CPU threads")
    locator: Literal["policy", "centre", "random", "ink", "newest-ink"] = arg(
        "policy", "where a policy that looks takes its glimpses: its own locator, or a fixed rule in its place "
        "(centre; random: uniform; ink: a random inked pixel; newest-ink: on the stroke drawn last)")
    seed: int = arg(0, "seed of the random locators")
    noise_strokes: int = arg(0, "add this many unnecessary strokes (random lines and scribbles at random places of "
                                "the drawing order) to every evaluated sketch")
    noise_seed: int = arg(0, "seed of the noise strokes (the same seed gives the same sketches)")
    match: Literal["run", "global", "local", "dense", "dense-ink"] = arg(
        "run", "what the ranking compares: the run's own mode (a triplet run: global), global, local (+ local descriptors "
        "at the glimpses' cells; a triplet run needs a fixed --locator), dense (+ every cell's) or dense-ink (+ every "
        "inked cell's); all but global need a phase 1 trained with --local-dim")
    n_glimpses: int = arg(12, "a triplet run in local match: glimpses per completion level (an RL run takes its own)")
    local_weight: float = arg(1.0, "a triplet run in local or dense matches: weight of the local term (an RL run: its own)")
    force: bool = arg(False, "write into --out even if it holds something other than an evaluation")


def export_covers(export: EmbeddingExport, ds: Dataset) -> bool:
    """Whether `export` was made from this data set and holds all of its sketches and photos."""
    if ds.path is None or export.meta.get("data_fingerprint") != data_fingerprint(ds.path):
        return False
    return set(ds.sketches.sketch_id) <= set(export.sketch_id) and set(ds.photos.photo_id) <= set(export.photo_id)


def ranks_for_triplet(export_or_net: EmbeddingExport | EmbeddingNet, split: Dataset, batch: int = 1024,
                      export_dir: str | Path = "the phase-1 run") -> np.ndarray:
    """Ranks (S, 17) of every sketch of `split` at every level, the gallery being the split's photos.

    export_or_net: an export holding the split's ids (looked up by id and checked item by item:
    `sketch_env.embeddings.gallery_for`, `sketch_embeddings_for`; export_dir names it in errors), or a
    network (the split's sketches are rendered and its photos decoded and embedded here). Rows follow
    split.sketches.
    """
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
    return ranks_from_embeddings(photo_emb, split.photos.photo_id, sketch_emb, split.sketches.photo_id)


def _triplet_ranks(run_dir: Path, split: Dataset, batch: int) -> tuple[np.ndarray, str]:
    if (run_dir / EXPORT_DIR).is_dir():
        export = load_embedding_export(run_dir)
        if export_covers(export, split):
            return ranks_for_triplet(export, split, batch, run_dir), "embedding export"
    net, _ = load_embedding_net(run_dir)
    return ranks_for_triplet(net, split, batch), "saved network"


def write_ranks(path: Path, sketch_id, ranks: np.ndarray) -> None:
    """ranks (S, L) as a long table sketch_id, level, rank (S * L rows), written atomically."""
    s, levels = ranks.shape
    table = pa.table(
        {
            "sketch_id": pa.array(np.repeat(np.asarray(sketch_id, dtype=object), levels), pa.string()),
            "level": pa.array(np.tile(np.arange(levels, dtype=np.int32), s)),
            "rank": pa.array(ranks.reshape(-1).astype(np.int64)),
        }
    )
    atomic_write(path, lambda p: pq.write_table(table, p))


def write_glimpses(path: Path, extras: dict) -> None:
    """Where the policy looks on the first few sketches, level by level (RL runs with a locator)."""
    trace, episodes = extras["trace"], extras["episodes"]
    rows = torch.as_tensor(trace.sketch_index)
    images = episodes.images.index_select(0, rows).float().numpy()
    env_cfg = extras.get("env_config")
    patch = env_cfg.glimpse_size if env_cfg is not None else 8
    plot_glimpses(images, trace.locations, trace.ranks, path, patch_pixels=patch,
                  names=[episodes.sketch_id[i] for i in trace.sketch_index])


def match_record(env_config, embedding: str | Path | None) -> dict:
    """{"match", "cost_per_photo"} of an evaluation: its env's match mode (None: a triplet run ranked globally) and
    the multiply-adds per gallery photo to score one query at one completion level (sketch_env.local_match.local_cost;
    left out when the phase-1 run `embedding` is unknown)."""
    from sketch_env.local_grids import local_grid_shape
    from sketch_env.local_match import local_cost

    match = "global" if env_config is None else env_config.match
    if embedding is None or not (Path(embedding) / EXPORT_DIR).is_dir():
        return {"match": match}
    dim = load_embedding_export(embedding).dim
    if match == "global":
        return {"match": "global", "cost_per_photo": dim}
    h, w, d = local_grid_shape(embedding)
    return {"match": env_config.match, "cost_per_photo": local_cost(env_config.match, env_config.n_glimpses, (h, w), d, dim),
            "local_weight": env_config.local_weight, "n_glimpses": env_config.n_glimpses}


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate run `cfg.run` on split `cfg.split` of `cfg.data`; returns the metrics dict."""
    from tune_runs.rl_eval import read_run

    torch.set_num_threads(cfg.num_threads)
    run_dir, data_dir = Path(cfg.run), Path(cfg.data)
    record = read_run(run_dir)
    out = prepare_output_dir(cfg.out if cfg.out is not None else run_dir / f"eval-{cfg.split}", EVAL_KIND,
                             inputs=(cfg.data, cfg.run), force=cfg.force)
    kind = record.get("kind")
    match = None if cfg.match == "run" else cfg.match
    triplet_local = kind == "triplet" and match not in (None, "global")
    if kind == "triplet" and cfg.locator != "policy" and match != "local":
        raise DataError(f"{run_dir}: a triplet run looks only in local match; --locator needs --match local or a policy that looks")
    if kind == "triplet" and match == "local" and cfg.locator == "policy":
        raise DataError(f"{run_dir}: a triplet run has no locator of its own; choose a fixed --locator (centre, random, ink, newest-ink)")
    looks = False
    if cfg.noise_strokes < 0:
        raise DataError(f"--noise-strokes must be >= 0, got {cfg.noise_strokes}")
    if triplet_local:
        from tune_runs.rl_eval import evaluate_triplet_local

        result = evaluate_triplet_local(run_dir, data_dir, cfg.split, match, cfg.locator if cfg.locator != "policy" else "centre",
                                        cfg.n_glimpses, cfg.local_weight, cfg.seed, cfg.noise_strokes, cfg.noise_seed)
        ranks, sketch_id, n_photos = result["ranks"], result["sketch_id"], result["n_photos"]
        looks = match == "local"
        if looks:
            out.mkdir(parents=True, exist_ok=True)
            write_glimpses(out / "glimpses.png", result["extras"])
        env_config = result["extras"]["env_config"]
        print(f"triplet run {run_dir} in {match} match: queries from its export, glimpses by the {cfg.locator} rule")
    elif kind == "triplet":
        from sketch_env.strokes import with_noise_strokes

        split = select_split(load_dataset(data_dir), cfg.split)
        if cfg.noise_strokes:
            split = with_noise_strokes(split, cfg.noise_strokes, cfg.noise_seed)
            ranks, source = ranks_for_triplet(load_embedding_net(run_dir)[0], split, cfg.level_batch), "saved network"
        else:
            ranks, source = _triplet_ranks(run_dir, split, cfg.level_batch)
        sketch_id, n_photos = split.sketches.sketch_id, len(split.photos)
        print(f"triplet run {run_dir}: queries from its {source}")
    else:
        from tune_runs.rl_eval import evaluate_policy_run, load_run_episodes, read_run

        episodes = load_run_episodes(read_run(run_dir), data_dir, cfg.split, cfg.noise_strokes, cfg.noise_seed, match)
        result = evaluate_policy_run(run_dir, data_dir, cfg.split, locator=cfg.locator, seed=cfg.seed, episodes=episodes,
                                     match=match)
        ranks, sketch_id, n_photos = result["ranks"], result["sketch_id"], result["n_photos"]
        env_config = result["extras"].get("env_config")
        looks = result.get("fovea_on_ink") is not None
        if looks:
            out.mkdir(parents=True, exist_ok=True)
            write_glimpses(out / "glimpses.png", result["extras"])
    metrics = retrieval_metrics(ranks, n_photos)
    record = {k: metrics[k] for k in METRIC_KEYS}
    record.update(match_record(env_config if kind != "triplet" or triplet_local else None,
                               run_dir if kind == "triplet" else read_run(run_dir).get("embedding")))
    if cfg.noise_strokes:
        record.update(noise_strokes=cfg.noise_strokes, noise_seed=cfg.noise_seed)
        print(f"{cfg.noise_strokes} noise strokes added to every sketch (seed {cfg.noise_seed})")
    if record["match"] != "global":
        print(f"{record['match']} match: {record['cost_per_photo']} multiply-adds per gallery photo per query and level")
    if looks:
        record.update(locator=cfg.locator, locator_seed=cfg.seed, fovea_on_ink=result["fovea_on_ink"])
        print(f"locator: {cfg.locator}; glimpses with ink in the finest patch: {100 * result['fovea_on_ink']:.1f}%")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", record)
    write_ranks(out / "ranks.parquet", sketch_id, np.asarray(ranks))
    title = f"{kind} on {cfg.split}"
    plot_curves({kind: metrics["percentile_curve"]}, out / "curve.png", title=title)
    print(f"{title}: {metrics['n_sketches']} sketches, gallery of {metrics['n_photos']} photos")
    print(format_table({kind: metrics}))
    print(format_percentiles(metrics["percentile_curve"]))
    print(f"wrote {out / 'metrics.json'}, {out / 'curve.png'}, {out / 'ranks.parquet'}")
    return metrics
