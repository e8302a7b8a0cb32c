"""A run's confidence ("when to stop drawing"), fitted and judged on its queries.

A run's queries on a split (`run_queries`: a triplet run's partial-sketch embeddings, an RL run's queries after
each level's last glimpse) are ranked against the split's photos; each gives the rank of its true photo and the
squared distances of its 10 nearest photos (`RankedQueries`), which is all the calibrators of
`sketch_env.confidence` read. `fit_run_confidence` cross-fits every calibrator by photo (5 folds: all the sketches
of a photo in one fold), keeps the one with the lowest held-out log loss for each event (top-1 right, right photo
in the top 5) and refits it on the whole split. `evaluation_confidence` is what `darp evaluate` and `darp report`
report: the run's stored calibrator applied to the evaluated queries, except on the very queries it was fitted on
(same data, same split, no noise strokes, the policy's own locator), which get the cross-fitted figures, since
fitting and checking on the same sketches flatters the ECE. `calibrate_run` writes the fit (RUN/calibration.json,
JSON, atomically): `darp calibrate`, and `darp pretrain` / `darp train` when they finish (`calibrate_after_training`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policies.running.runs import CALIBRATION_FILE, load_run_confidence, read_run
from sketch_env.confidence import (
    METHODS,
    N_BINS,
    STOP_THRESHOLDS,
    TOP_K,
    Confidence,
    brier_score,
    choose_calibrator,
    cross_fit,
    early_stop_table,
    expected_calibration_error,
    fit_calibrator,
    photo_folds,
    reliability_bins,
    top_distances,
)
from sketch_env.data import DataError, data_fingerprint, load_dataset, select_split
from sketch_env.gallery import Gallery

FIT_SPLIT = "val"  # the split a run's confidence is fitted on: held out by photo from training


@dataclass
class RankedQueries:
    """What a run's ranking gives on one split: sketch_id, photo_id (S,) the sketches and their true
    photos; ranks (S, L) of the true photo at each completion level; distances (S, L, k) squared
    distances of the k = min(10, N) nearest photos, nearest first; n_photos: the gallery's size."""

    sketch_id: np.ndarray
    photo_id: np.ndarray
    ranks: np.ndarray
    distances: np.ndarray
    n_photos: int

    def __post_init__(self):
        s, levels = np.shape(self.ranks)
        if np.shape(self.distances)[:2] != (s, levels) or len(self.sketch_id) != s or len(self.photo_id) != s:
            raise ValueError(f"ranks {np.shape(self.ranks)}, distances {np.shape(self.distances)} and "
                             f"{len(self.sketch_id)} sketch ids / {len(self.photo_id)} photo ids do not agree")

    @property
    def top1(self) -> np.ndarray:
        return np.asarray(self.ranks) == 1

    @property
    def top5(self) -> np.ndarray:
        return np.asarray(self.ranks) <= 5

    @staticmethod
    def from_queries(gallery: Gallery, queries, ranks, sketch_id, photo_id) -> "RankedQueries":
        """From queries (S, L, D) ranked against `gallery` with known `ranks` (S, L)."""
        return RankedQueries(np.asarray(sketch_id, dtype=object), np.asarray(photo_id, dtype=object),
                             np.asarray(ranks), top_distances(gallery, queries, TOP_K), len(gallery))


def triplet_queries(photo_emb, sketch_emb, split) -> RankedQueries:
    """A triplet run's queries: the partial sketches' embeddings (S, 17, D) against photos (N, D) of `split`."""
    import torch

    return ranked_in(Gallery(torch.as_tensor(photo_emb), split.photos.photo_id), sketch_emb, split)


def ranked_in(gallery: Gallery, sketch_emb, split) -> RankedQueries:
    """The partial sketches' embeddings (S, 17, D) of `split` ranked against `gallery`, which holds their photos."""
    import torch

    queries = torch.as_tensor(sketch_emb)
    s, levels, d = queries.shape
    target = gallery.index_of(list(split.sketches.photo_id)).repeat_interleave(levels)
    ranks = gallery.rank(queries.reshape(s * levels, d), target).view(s, levels).numpy()
    return RankedQueries.from_queries(gallery, queries, ranks, split.sketches.sketch_id, split.sketches.photo_id)


def policy_queries(result: dict) -> RankedQueries:
    """An RL run's queries, from `policies.running.trained.evaluate_policy_run`'s result."""
    return RankedQueries.from_queries(result["gallery"], result["queries"], result["ranks"], result["sketch_id"],
                                      result["photo_id"])


def run_queries(run_dir: str | Path, data_dir: str | Path, split: str, level_batch: int = 1024) -> RankedQueries:
    """The queries of a run of either kind on `split` of `data_dir`, ranked against the split's photos."""
    from policies.running.trained import evaluate_policy_run, read_run

    run_dir = Path(run_dir)
    if read_run(run_dir).get("kind") == "triplet":
        from policies.phase1.split_embeddings import triplet_run_embeddings

        part = select_split(load_dataset(data_dir), split)
        if len(part.sketches) == 0 or len(part.photos) == 0:
            raise DataError(f"{data_dir}: the {split} split has {len(part.sketches)} sketches and {len(part.photos)} photos; need both")
        photo_emb, sketch_emb, _ = triplet_run_embeddings(run_dir, part, level_batch)
        return triplet_queries(photo_emb, sketch_emb, part)
    return policy_queries(evaluate_policy_run(run_dir, Path(data_dir), split, n_traces=1))


def _flat(q: RankedQueries):
    s, levels, k = q.distances.shape
    return (q.distances.reshape(s * levels, k), q.top1.reshape(-1), q.top5.reshape(-1),
            np.repeat(np.asarray(q.photo_id, dtype=object), levels))


def confidence_figures(p1, p5, q: RankedQueries) -> dict:
    """What a confidence (p1, p5: (S, L) probabilities) is worth on queries `q`: ECE and Brier score of
    both, the early-stop tables at STOP_THRESHOLDS (stopping on P(top-1 right): early_stop; on P(in the
    top 5): early_stop_top5) and the reliability bins of both."""
    p1, p5 = np.asarray(p1), np.asarray(p5)
    figures = {"ece_top1": expected_calibration_error(p1, q.top1), "ece_top5": expected_calibration_error(p5, q.top5),
               "brier_top1": brier_score(p1.reshape(-1), q.top1.reshape(-1)),
               "brier_top5": brier_score(p5.reshape(-1), q.top5.reshape(-1)),
               "mean_top1": float(p1.mean()), "rate_top1": float(q.top1.mean()),
               "early_stop": early_stop_table(p1, {"top1": q.top1, "top5": q.top5}, STOP_THRESHOLDS),
               "early_stop_top5": early_stop_table(p5, {"top1": q.top1, "top5": q.top5}, STOP_THRESHOLDS)}
    for name, p, y in (("top1", p1, q.top1), ("top5", p5, q.top5)):
        bins = reliability_bins(p, y, N_BINS)
        figures[f"reliability_{name}"] = {k: np.asarray(v).tolist() for k, v in bins.items()}
    return figures


def fit_run_confidence(q: RankedQueries, method: str = "auto", folds: int = 5, seed: int = 0,
                       info: dict | None = None) -> tuple[Confidence, np.ndarray, np.ndarray, dict]:
    """Cross-fit by photo, choose, refit on everything: (Confidence, held-out p1 (S, L), held-out p5
    (S, L), the held-out record stored in its info: methods, candidates, figures)."""
    distances, top1, top5, photos = _flat(q)
    n_photos = len(set(photos.tolist()))
    if n_photos < 2:
        raise DataError(f"fitting a confidence needs sketches of at least 2 photos; the split has {n_photos}")
    folds = min(folds, n_photos)
    fold = photo_folds(photos, folds, seed)
    methods = METHODS if method == "auto" else (method,)
    chosen, held, candidates = {}, {}, {}
    for name, y, top in (("top1", top1, 1), ("top5", top5, 5)):
        best, table = choose_calibrator(distances, y, fold, top, methods)
        chosen[name] = fit_calibrator(best, distances, y, top)
        held[name] = table[best]["prediction"].reshape(q.ranks.shape)
        candidates[name] = {m: {k: v for k, v in t.items() if k != "prediction"} for m, t in table.items()}
    p5 = np.maximum(held["top5"], held["top1"])
    record = {"folds": folds, "seed": seed, "method_top1": chosen["top1"].method, "method_top5": chosen["top5"].method,
              "candidates": candidates, **confidence_figures(held["top1"], p5, q)}
    conf = Confidence(chosen["top1"], chosen["top5"], {**(info or {}), "held_out": record})
    return conf, held["top1"], p5, record


def fitted_on(data_dir: str | Path, split: str, q: RankedQueries) -> dict:
    """Where a calibrator was fitted: the data set (path and fingerprint), the split and its size."""
    return {"data": str(Path(data_dir).resolve()), "data_fingerprint": data_fingerprint(data_dir), "split": split,
            "n_sketches": int(len(q.sketch_id)), "n_photos": int(q.n_photos), "n_queries": int(np.size(q.ranks))}


def same_queries(conf: Confidence, data_dir: str | Path, split: str) -> bool:
    """Whether `conf` was fitted on `split` of this very data set (then its figures there are only honest cross-fitted)."""
    where = conf.info.get("fitted_on", {}) if isinstance(conf.info, dict) else {}
    return where.get("split") == split and where.get("data_fingerprint") == data_fingerprint(data_dir)


def evaluation_confidence(run_dir: str | Path, data_dir: str | Path, split: str, q: RankedQueries,
                          pristine: bool, out_dir: str | Path | None = None,
                          level_batch: int = 1024) -> tuple[np.ndarray, np.ndarray, dict, str] | None:
    """The confidence of every evaluated query and what it is worth: (p1 (S, L), p5 (S, L), figures, source).

    pristine: the queries are the run's own on unmodified data (no noise strokes, its own locator).
    The run's calibrator (RUN/calibration.json) is applied, except on the very queries it was fitted on,
    which get cross-fitted predictions (held-out style). A run without one gets a calibrator fitted here
    on the val split of `data_dir` (written to out_dir/calibration.json, not into the run); None (said in
    one line) when that split cannot fit one (no sketches, or sketches of one photo only).
    """
    conf = load_run_confidence(run_dir)
    if conf is None:
        try:
            fit_q = q if (split == FIT_SPLIT and pristine) else run_queries(run_dir, data_dir, FIT_SPLIT, level_batch)
            info = {"run_kind": "?", "fitted_on": fitted_on(data_dir, FIT_SPLIT, fit_q)}
            conf, _, _, _ = fit_run_confidence(fit_q, info=info)
        except DataError as e:
            print(f"no confidence: {Path(run_dir) / CALIBRATION_FILE} does not exist and none can be fitted here ({e})")
            return None
        if out_dir is not None:
            conf.save(Path(out_dir) / CALIBRATION_FILE)
        print(f"{Path(run_dir) / CALIBRATION_FILE} does not exist: fitted a calibrator on the {FIT_SPLIT} split of {data_dir} "
              f"(`darp calibrate` stores one with the run)")
    held = conf.info.get("held_out", {})
    if pristine and same_queries(conf, data_dir, split):
        folds, seed = int(held.get("folds", 5)), int(held.get("seed", 0))
        p1, p5 = _cross_fitted(conf, q, folds, seed)
        source = (f"cross-fitted over {folds} folds of photos of this split ({conf.top1.method} / {conf.top5.method}): "
                  "the calibrator was fitted on these sketches")
    else:
        s, levels, k = q.distances.shape
        p1, p5 = (p.reshape(s, levels) for p in conf.predict(q.distances.reshape(s * levels, k)))
        where = conf.info.get("fitted_on", {})
        source = (f"calibrator of the run ({conf.top1.method} / {conf.top5.method}), fitted on the "
                  f"{where.get('split', '?')} split of {where.get('data', '?')}")
    return p1, p5, confidence_figures(p1, p5, q), source


def _cross_fitted(conf: Confidence, q: RankedQueries, folds: int, seed: int):
    """Held-out predictions on q with the stored methods (as `fit_run_confidence` made them)."""
    distances, top1, top5, photos = _flat(q)
    fold = photo_folds(photos, min(folds, len(set(photos.tolist()))), seed)
    p1 = cross_fit(conf.top1.method, distances, top1, fold, 1).reshape(q.ranks.shape)
    p5 = cross_fit(conf.top5.method, distances, top5, fold, 5).reshape(q.ranks.shape)
    return p1, np.maximum(p5, p1)


def calibrate_run(run_dir: str | Path, data_dir: str | Path, split: str = FIT_SPLIT, method: str = "auto",
                  folds: int = 5, seed: int = 0, queries: RankedQueries | None = None, level_batch: int = 1024,
                  quiet: bool = False) -> Confidence:
    """Fit run `run_dir`'s confidence on `split` of `data_dir` (its queries, or `queries` when given) and
    write RUN/calibration.json; prints the held-out figures unless `quiet`."""
    run_dir = Path(run_dir)
    kind = read_run(run_dir).get("kind")
    q = queries if queries is not None else run_queries(run_dir, data_dir, split, level_batch)
    info = {"run_kind": kind, "fitted_on": fitted_on(data_dir, split, q)}
    conf, _, _, record = fit_run_confidence(q, method, folds, seed, info)
    conf.save(run_dir / CALIBRATION_FILE)
    if not quiet:
        print(describe_fit(conf, split))
        print(f"wrote {run_dir / CALIBRATION_FILE}")
    return conf


def calibrate_after_training(run_dir: str | Path, data_dir: str | Path, split: str = FIT_SPLIT) -> Confidence | None:
    """What `darp pretrain` and `darp train` do when they finish: fit the run's confidence on `split`.
    A split it cannot be fitted on (no sketches, one photo) is said in one line, not an error: the
    training is done and kept; `darp calibrate` can fit it later."""
    try:
        return calibrate_run(run_dir, data_dir, split)
    except DataError as e:
        print(f"no confidence fitted for {run_dir}: {e}")
        return None


def describe_fit(conf: Confidence, split: str) -> str:
    """The held-out figures of a fitted confidence: every candidate, the choice and the early-stop table."""
    from policies.running.plots import format_early_stop

    held, where = conf.info["held_out"], conf.info["fitted_on"]
    lines = [f"confidence fitted on {split} ({where['n_sketches']} sketches x levels = {where['n_queries']} queries, "
             f"gallery of {where['n_photos']}); held-out figures cross-fitted over {held['folds']} folds of photos:",
             "  event        method       log loss   Brier     ECE"]
    for name, label in (("top1", "top-1 right"), ("top5", "in top 5")):
        for method, row in held["candidates"][name].items():
            mark = " <- kept" if method == held[f"method_{name}"] else ""
            lines.append(f"  {label:<12} {method:<12} {row['log_loss']:8.4f} {row['brier']:8.4f} {row['ece']:7.4f}{mark}")
    lines.append(f"  ECE top-1 {held['ece_top1']:.4f}, top-5 {held['ece_top5']:.4f} (held out)")
    lines.append(format_early_stop(held["early_stop"], "P(top-1 right)"))
    lines.append(format_early_stop(held["early_stop_top5"], "P(in the top 5)"))
    return "\n".join(lines)


__all__ = ["FIT_SPLIT", "RankedQueries", "calibrate_after_training", "calibrate_run", "confidence_figures", "describe_fit",
           "evaluation_confidence", "fit_run_confidence", "fitted_on", "policy_queries", "run_queries", "same_queries",
           "triplet_queries"]
