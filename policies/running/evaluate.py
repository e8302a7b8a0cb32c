"""The engine of `darp evaluate` (tune_runs/evaluate.py: what it ranks and writes); `darp report` and `darp demo`
evaluate through it too.

`evaluate_run` gets the ranks of a run's queries on a split: a triplet run's through
`policies.phase1.split_embeddings.triplet_run_embeddings` (among `--gallery` shards: `triplet_queries_in_shards`; in
local or dense match: `policies.running.trained.evaluate_triplet_local`), an RL run's through
`policies.running.trained.evaluate_policy_run`. Ranks come from `sketch_env.gallery.Gallery`, figures from
`sketch_env.metrics.retrieval_metrics`, the confidence from `policies.running.calibration.evaluation_confidence`;
`write_ranks` and `match_record` give the shapes of ranks.parquet and of a record's match, which the report shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from policies.phase1.embedding import embed_sketch_levels, load_embedding_net
from policies.phase1.split_embeddings import export_covers, triplet_run_embeddings
from policies.running.calibration import evaluation_confidence, policy_queries, triplet_queries
from sketch_env.atomic import OutputKind, atomic_write, atomic_write_json, check_output_dir, prepare_output_dir
from sketch_env.data import DataError, Dataset, load_dataset, select_split
from sketch_env.errors import ConfigError
from sketch_env.embedding_export import EXPORT_DIR, load_embedding_export, sketch_embeddings_for
from sketch_env.metrics import retrieval_metrics
from sketch_env.render import N_GLIMPSES, first_ink_level
from sketch_env.options import arg
from policies.running.plots import format_percentiles, format_table, plot_curves, plot_glimpses, plot_reliability

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
    gallery: Path | None = arg(None, "rank among the photos of these Parquet shards (darp embed-photos) instead of "
                                     "the split's photos; they must hold every evaluated sketch's photo")
    match: Literal["run", "global", "local", "dense", "dense-ink"] = arg(
        "run", "what the ranking compares: the run's own mode (a triplet run: global), global, local (+ local descriptors "
        "at the glimpses' cells; a triplet run needs a fixed --locator), dense (+ every cell's) or dense-ink (+ every "
        "inked cell's); all but global need a phase 1 trained with --local-dim")
    n_glimpses: int = arg(N_GLIMPSES, "a triplet run in local match: glimpses per completion level (an RL run takes its own)")
    local_weight: float = arg(1.0, "a triplet run in local or dense matches: weight of the local term (an RL run: its own)")
    force: bool = arg(False, "write into --out even if it holds something other than an evaluation")

    def check(self) -> None:
        if self.level_batch < 1 or self.num_threads < 1 or self.noise_strokes < 0:
            raise ConfigError(f"--level-batch and --num-threads must be >= 1 and --noise-strokes >= 0, got "
                              f"{self.level_batch}, {self.num_threads} and {self.noise_strokes}")


def triplet_queries_in_shards(run_dir: Path, split: Dataset, batch: int, gallery_dir: Path,
                              use_export: bool = True):
    """(queries, how they were made): the split's sketches ranked among every photo of the shards in
    `gallery_dir` (`policies.running.trained.shards_gallery`), as `policies.running.calibration.RankedQueries`. Queries:
    the export's partial-sketch embeddings when it covers the split (and `use_export`), else the saved network's."""
    from policies.running.calibration import ranked_in
    from policies.running.trained import shards_gallery

    gallery = shards_gallery(gallery_dir, run_dir, split)
    if use_export and (run_dir / EXPORT_DIR).is_dir() and export_covers(export := load_embedding_export(run_dir), split):
        queries, source = sketch_embeddings_for(export, split.sketches, run_dir, split.path), "embedding export"
    else:
        net, _ = load_embedding_net(run_dir)
        queries, source = embed_sketch_levels(net, first_ink_level(split.sketches, net.config.image_size), batch), "saved network"
    return ranked_in(gallery, queries, split), f"{source}, gallery of {len(gallery)} photos from {gallery_dir}"


def write_ranks(path: Path, sketch_id, ranks: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> None:
    """ranks (S, L) as a long table sketch_id, level, rank (S * L rows), written atomically; `extra`:
    more (S, L) float columns by name (e.g. the confidence p_top1, p_top5)."""
    s, levels = ranks.shape
    table = pa.table(
        {
            "sketch_id": pa.array(np.repeat(np.asarray(sketch_id, dtype=object), levels), pa.string()),
            "level": pa.array(np.tile(np.arange(levels, dtype=np.int32), s)),
            "rank": pa.array(ranks.reshape(-1).astype(np.int64)),
            **{name: pa.array(np.asarray(v, np.float32).reshape(-1)) for name, v in (extra or {}).items()},
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


def evaluate_run(cfg: EvaluateConfig) -> dict:
    """Evaluate run `cfg.run` on split `cfg.split` of `cfg.data`; returns the metrics dict."""
    from policies.running.trained import read_run

    cfg.check()
    torch.set_num_threads(cfg.num_threads)
    run_dir, data_dir = Path(cfg.run), Path(cfg.data)
    record = read_run(run_dir)
    out_dir = cfg.out if cfg.out is not None else run_dir / f"eval-{cfg.split}"
    check_output_dir(out_dir, EVAL_KIND, inputs=(cfg.data, cfg.run, cfg.gallery), force=cfg.force)  # created once there is a result
    kind = record.get("kind")
    match = None if cfg.match == "run" else cfg.match
    triplet_local = kind == "triplet" and match not in (None, "global")
    if kind == "triplet" and cfg.locator != "policy" and match != "local":
        raise DataError(f"{run_dir}: a triplet run looks only in local match; --locator needs --match local or a policy that looks")
    if kind == "triplet" and match == "local" and cfg.locator == "policy":
        raise DataError(f"{run_dir}: a triplet run has no locator of its own; choose a fixed --locator (centre, random, ink, newest-ink)")
    if triplet_local and cfg.gallery is not None:
        raise DataError(f"{cfg.gallery}: photo shards hold no local grids; --match {match} ranks the data set's photos")
    looks = False
    if triplet_local:
        from policies.running.trained import evaluate_triplet_local

        result = evaluate_triplet_local(run_dir, data_dir, cfg.split, match, cfg.locator if cfg.locator != "policy" else "centre",
                                        cfg.n_glimpses, cfg.local_weight, cfg.seed, cfg.noise_strokes, cfg.noise_seed)
        ranks, sketch_id, n_photos = result["ranks"], result["sketch_id"], result["n_photos"]
        looks = match == "local"
        queries = None  # the confidence reads global distances; a triplet run in local match has no calibrator for its ranks
        env_config = result["extras"]["env_config"]
        print(f"triplet run {run_dir} in {match} match: queries from its export"
              + (f", glimpses by the {cfg.locator} rule" if match == "local" else ", every cell compared" if match == "dense"
                 else ", every inked cell compared"))
    elif kind == "triplet":
        from sketch_env.strokes import with_noise_strokes

        split = select_split(load_dataset(data_dir), cfg.split)
        if len(split.sketches) == 0 or len(split.photos) == 0:
            raise DataError(f"{split.path}: the split has {len(split.sketches)} sketches and {len(split.photos)} photos; need both")
        if cfg.noise_strokes:
            split = with_noise_strokes(split, cfg.noise_strokes, cfg.noise_seed)
        if cfg.gallery is not None:
            queries, source = triplet_queries_in_shards(run_dir, split, cfg.level_batch, Path(cfg.gallery),
                                                        use_export=not cfg.noise_strokes)
        else:
            photo_emb, sketch_emb, source = triplet_run_embeddings(run_dir, split, cfg.level_batch, fresh=cfg.noise_strokes > 0)
            queries = triplet_queries(photo_emb, sketch_emb, split)
        ranks, sketch_id, n_photos = queries.ranks, split.sketches.sketch_id, queries.n_photos
        print(f"triplet run {run_dir}: queries from its {source}")
    else:
        from policies.running.trained import evaluate_policy_run, load_run_episodes, read_run

        episodes = load_run_episodes(read_run(run_dir), data_dir, cfg.split, cfg.noise_strokes, cfg.noise_seed, match,
                                     gallery_dir=cfg.gallery)
        result = evaluate_policy_run(run_dir, data_dir, cfg.split, locator=cfg.locator, seed=cfg.seed, episodes=episodes,
                                     match=match)
        ranks, sketch_id, n_photos = result["ranks"], result["sketch_id"], result["n_photos"]
        queries = policy_queries(result)
        env_config = result["extras"].get("env_config")
        looks = result.get("fovea_on_ink") is not None
    out = prepare_output_dir(out_dir, EVAL_KIND, inputs=(cfg.data, cfg.run, cfg.gallery), force=cfg.force)
    if looks:
        write_glimpses(out / "glimpses.png", result["extras"])
    metrics = retrieval_metrics(ranks, n_photos)
    record = {k: metrics[k] for k in METRIC_KEYS}
    pristine = not cfg.noise_strokes and cfg.locator == "policy" and cfg.gallery is None
    confidence = None if queries is None else evaluation_confidence(run_dir, data_dir, cfg.split, queries, out_dir=out,
                                                                    level_batch=cfg.level_batch, pristine=pristine)
    p1, p5, figures, confidence_source = confidence if confidence is not None else (None, None, None, None)
    metrics["confidence"] = record["confidence"] = None if figures is None else {"source": confidence_source, **figures}
    if cfg.gallery is not None:
        record["gallery"] = str(cfg.gallery)
    record.update(match_record(env_config if kind != "triplet" or triplet_local else None,
                               run_dir if kind == "triplet" else read_run(run_dir).get("embedding")))
    if cfg.noise_strokes:
        record.update(noise_strokes=cfg.noise_strokes, noise_seed=cfg.noise_seed)
        print(f"{cfg.noise_strokes} noise strokes added to every sketch (seed {cfg.noise_seed})")
    if record["match"] != "global":
        print(f"{record['match']} match: {record['cost_per_photo']} multiply-adds per gallery photo per query and level")
    if looks:
        record.update(locator=cfg.locator, locator_seed=cfg.seed, fovea_on_ink=result["fovea_on_ink"],
                      glimpse_cells=result["glimpse_cells"])
        print(f"locator: {cfg.locator}; glimpses with ink in the finest patch: {100 * result['fovea_on_ink']:.1f}%; "
              f"distinct cells (8 x 8) per sketch: {result['glimpse_cells']:.1f}")
    atomic_write_json(out / "metrics.json", record)
    write_ranks(out / "ranks.parquet", sketch_id, np.asarray(ranks),
                {"p_top1": p1, "p_top5": p5} if figures is not None else None)
    title = f"{kind} on {cfg.split}"
    plot_curves({kind: metrics["percentile_curve"]}, out / "curve.png", title=title)
    written = [out / "metrics.json", out / "curve.png"]
    if figures is not None:
        written.append(plot_reliability({"top-1 right": figures["reliability_top1"], "in the top 5": figures["reliability_top5"]},
                                        out / "reliability.png", title=f"{title}: confidence (ECE top-1 {figures['ece_top1']:.3f})"))
    print(f"{title}: {metrics['n_sketches']} sketches, gallery of {metrics['n_photos']} photos")
    print(format_table({kind: metrics}))
    print(format_percentiles(metrics["percentile_curve"]))
    if figures is not None:
        print(format_confidence(metrics["confidence"]))
    print(f"wrote {', '.join(map(str, written + [out / 'ranks.parquet']))}")
    return metrics


def format_confidence(confidence: dict) -> str:
    """The printed confidence figures: where the calibrator comes from, ECE and the early-stop table."""
    from policies.running.plots import format_early_stop

    return "\n".join([
        f"confidence: {confidence['source']}",
        f"expected calibration error: P(top-1 right) {confidence['ece_top1']:.4f}, P(in the top 5) {confidence['ece_top5']:.4f} "
        f"(mean P(top-1) {confidence['mean_top1']:.3f}, top-1 right {confidence['rate_top1']:.3f} of all queries)",
        "early stop: each sketch stops at the first completion level whose confidence reaches the threshold",
        format_early_stop(confidence["early_stop"], "P(top-1 right)"),
        format_early_stop(confidence["early_stop_top5"], "P(in the top 5)"),
    ])
