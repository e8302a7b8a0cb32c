"""Calibrated confidence: how sure the ranking is that its top photo is the one being drawn.

For every query (a partial sketch's embedding, or a policy's query) the gallery's K = 10 nearest
photos and their squared distances are all a confidence reads (`top_distances`): the same numbers
the live page already has, whatever index produced them. A calibrator maps them to two
probabilities, P(the top-1 photo is the right one) and P(the right photo is in the top 5), and is
fitted on queries whose answer is known (the validation split): `fit_calibrator` with

- "constant":    the base rate (the yardstick: perfectly calibrated on average, useless to stop on);
- "temperature": the top-1 (top-5) share of softmax(-d / T) over the K photos, T fitted;
- "logistic":    logistic regression on a few ranking features (`ranking_features`: the nearest
                 distance, its gaps to the 2nd, 5th and K-th, and the temperature softmax's log-odds);
- "isotonic":    the logistic score, then a monotone (pool-adjacent-violators) map to probabilities.

Which one is kept is measured, not assumed: `cross_fit` predicts every query with a calibrator fitted
on the other folds of photos (all the sketches of a photo in one fold), so the figures are held-out
style, and `choose_calibrator` keeps the one with the lowest held-out log loss (a proper score:
ECE alone would pick "constant"). `Confidence` is the pair of fitted calibrators, stored as JSON.

What it is judged by, as pure functions: `expected_calibration_error` and `reliability_bins` (the
diagram), and `early_stop_table`: stopping each sketch at the first completion level whose
confidence reaches p, how often that fires, how often its top-1 is right (or the right photo in the
top 5) then and how much drawing it saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sketch_env.atomic import atomic_write_json, read_json_object
from sketch_env.errors import DataError

TOP_K = 10  # nearest photos a confidence reads (the live page's top 10)
METHODS = ("constant", "temperature", "logistic", "isotonic")
TARGETS = ("top1", "top5")  # P(top-1 right), P(right photo in the top 5)
STOP_THRESHOLDS = (0.8, 0.9, 0.95)
N_BINS = 15  # equal-width confidence bins of the ECE and the reliability diagram
FORMAT = "darp-confidence"
VERSION = 1
_EPS = 1e-6


# ---- what the ranking says ------------------------------------------------------------------------


def top_distances(gallery, queries, k: int = TOP_K) -> np.ndarray:
    """Squared distances (..., min(k, N)) of each query's nearest gallery photos, nearest first.

    gallery: a `sketch_env.gallery.Gallery`; queries: (..., D) embeddings (numpy or torch).
    """
    q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
    lead = tuple(q.shape[:-1])
    _, distances = gallery.topk(q.reshape(-1, q.shape[-1]), min(k, len(gallery)))
    return distances.cpu().numpy().astype(np.float64).reshape(*lead, -1)


def _checked_distances(distances) -> np.ndarray:
    d = np.asarray(distances.detach().cpu().numpy() if isinstance(distances, torch.Tensor) else distances, np.float64)
    if d.ndim != 2 or d.shape[1] < 1:
        raise ValueError(f"distances must have shape (B, k) with k >= 1, got {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("distances contain NaN or infinite values")
    if d.shape[1] > 1 and np.any(np.diff(d, axis=1) < -1e-5 * (1 + np.abs(d[:, 1:]))):
        raise ValueError("distances must be sorted nearest first along each row")
    return np.maximum(d, 0.0)


def softmax_shares(distances, temperature: float) -> np.ndarray:
    """(B, k) softmax(-d / T) over each row's k distances (nearest first): the share of each photo."""
    d = _checked_distances(distances)
    z = -(d - d[:, :1]) / temperature
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def top_share(distances, temperature: float, top: int) -> np.ndarray:
    """(B,) the softmax share of the `top` nearest photos, clipped away from 0 and 1."""
    return np.clip(softmax_shares(distances, temperature)[:, :top].sum(1), _EPS, 1 - _EPS)


FEATURES = ("nearest", "gap_2", "gap_5", "gap_k", "softmax_logodds")


def ranking_features(distances, temperature: float, top: int = 1) -> np.ndarray:
    """(B, 5) features of (B, k) squared distances (nearest first), in Euclidean distance units s = sqrt(d):
    s_1, s_2 - s_1, s_5 - s_1, s_k - s_1 (a missing j-th photo counts as the k-th) and the log-odds of the
    `top` photos' softmax share at `temperature`."""
    d = _checked_distances(distances)
    s = np.sqrt(d)
    k = s.shape[1]
    col = lambda j: s[:, min(j, k) - 1]  # noqa: E731
    p = top_share(d, temperature, top)
    return np.stack([s[:, 0], col(2) - s[:, 0], col(5) - s[:, 0], s[:, -1] - s[:, 0], np.log(p / (1 - p))], 1)


# ---- calibrators -----------------------------------------------------------------------------------


def _binary(correct, n: int) -> np.ndarray:
    y = np.asarray(correct.detach().cpu().numpy() if isinstance(correct, torch.Tensor) else correct)
    if y.shape != (n,):
        raise ValueError(f"outcomes must have shape ({n},), got {y.shape}")
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise ValueError("outcomes must be 0/1 or booleans")
    return y.astype(np.float64)


def log_loss(prob, correct) -> float:
    """Mean negative log-likelihood of 0/1 outcomes under probabilities (clipped to [1e-6, 1 - 1e-6])."""
    p = np.clip(np.asarray(prob, np.float64), _EPS, 1 - _EPS)
    y = _binary(correct, len(p))
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def brier_score(prob, correct) -> float:
    """Mean squared difference between probabilities and 0/1 outcomes."""
    p = np.asarray(prob, np.float64)
    return float(np.mean((p - _binary(correct, len(p))) ** 2))


def fit_temperature(distances, correct, top: int = 1) -> float:
    """T minimising the log loss of the `top` photos' softmax share against `correct` (B,) outcomes.

    A grid over log T spanning the data's distance gaps, refined by golden-section search.
    """
    d = _checked_distances(distances)
    y = _binary(correct, len(d))
    gaps = d[:, -1] - d[:, 0]
    scale = float(np.median(gaps[gaps > 0])) if np.any(gaps > 0) else 1.0
    loss = lambda log_t: log_loss(top_share(d, math.exp(log_t), top), y)  # noqa: E731
    grid = np.linspace(math.log(scale) - 9.0, math.log(scale) + 5.0, 57)
    values = [loss(g) for g in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(math.exp((lo + hi) / 2))


def fit_logistic(x, correct, l2: float = 1e-3, iterations: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logistic regression of 0/1 outcomes on features x (B, F), standardised, by Newton's method
    with an L2 penalty of l2 per sample on the weights (not the bias). Returns (mean, std, weights
    (F + 1,) with the bias last)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"features must be a finite (B, F) array, got shape {x.shape}")
    y = _binary(correct, len(x))
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    z = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], 1)
    n, f = z.shape
    penalty = np.full(f, l2 * n)
    penalty[-1] = 0.0
    rate = np.clip(y.mean(), 1 / (n + 2), 1 - 1 / (n + 2))
    w = np.zeros(f)
    w[-1] = math.log(rate / (1 - rate))
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(z @ w, -40, 40)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return mean, std, w


def logistic_score(x, mean, std, weights) -> np.ndarray:
    """The log-odds w . (x - mean) / std + bias of features x (B, F)."""
    z = (np.asarray(x, np.float64) - mean) / std
    return z @ weights[:-1] + weights[-1]


def fit_isotonic(score, correct) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing map score -> probability (pool adjacent violators), as knots (x, y) to be read by
    linear interpolation (constant beyond the ends). A block's probability is its rate shrunk by half a
    success and half a failure, (successes + 0.5) / (count + 1), so that no probability is 0 or 1 and a
    small block at an end claims less; blocks are pooled while that value does not increase."""
    s = np.asarray(score, np.float64)
    y = _binary(correct, len(s))
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    # one block per distinct score, then pool adjacent violators
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    total = list(np.add.reduceat(y, starts))
    count = list(np.diff(np.r_[starts, len(s)]).astype(np.float64))
    low, high = list(s[starts]), list(s[np.r_[starts[1:], len(s)] - 1])
    blocks: list[list[float]] = []
    shrunk = lambda block: (block[0] + 0.5) / (block[1] + 1.0)  # noqa: E731
    for t, c, lo, hi in zip(total, count, low, high):
        blocks.append([t, c, lo, hi])
        while len(blocks) > 1 and shrunk(blocks[-2]) >= shrunk(blocks[-1]):
            t2, c2, _, hi2 = blocks.pop()
            blocks[-1][0] += t2
            blocks[-1][1] += c2
            blocks[-1][3] = hi2
    xs, ys = [], []
    for t, c, lo, hi in blocks:
        value = shrunk((t, c))
        xs += [lo, hi] if hi > lo else [lo]
        ys += [value, value] if hi > lo else [value]
    return np.asarray(xs), np.asarray(ys)


@dataclass
class Calibrator:
    """One fitted map from a query's top-K distances to the probability of one event (top-1 right, or
    top-5), with everything needed to apply it stored as plain numbers (`to_json` / `from_json`).

    method: one of METHODS; top: 1 or 5; base_rate: the event's rate where it was fitted;
    temperature: softmax temperature (all methods but constant); mean, std, weights: the logistic
    model on `ranking_features`; knots_x, knots_y: the isotonic map of the logistic score.
    """

    method: str
    top: int
    base_rate: float
    temperature: float = 1.0
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    weights: np.ndarray | None = None
    knots_x: np.ndarray | None = None
    knots_y: np.ndarray | None = None

    def predict(self, distances) -> np.ndarray:
        """(B,) probabilities for (B, k) squared distances, nearest first."""
        d = _checked_distances(distances)
        if self.method == "constant":
            return np.full(len(d), self.base_rate)
        if self.method == "temperature":
            return top_share(d, self.temperature, self.top)
        score = logistic_score(ranking_features(d, self.temperature, self.top), self.mean, self.std, self.weights)
        if self.method == "logistic":
            return 1 / (1 + np.exp(-np.clip(score, -40, 40)))
        return np.interp(score, self.knots_x, self.knots_y)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"method": self.method, "top": self.top, "base_rate": self.base_rate}
        if self.method != "constant":
            out["temperature"] = self.temperature
        if self.method in ("logistic", "isotonic"):
            out |= {"features": list(FEATURES), "mean": self.mean.tolist(), "std": self.std.tolist(),
                    "weights": self.weights.tolist()}
        if self.method == "isotonic":
            out |= {"knots_x": self.knots_x.tolist(), "knots_y": self.knots_y.tolist()}
        return out

    @staticmethod
    def from_json(obj: Any, where: str = "calibrator") -> "Calibrator":
        """The calibrator `to_json` wrote; ValueError naming `where` and the problem for anything else."""
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
        method, top = obj.get("method"), obj.get("top")
        if method not in METHODS:
            raise ValueError(f"{where}: method must be one of {METHODS}, got {method!r}")
        if top not in (1, 5) or isinstance(top, bool):
            raise ValueError(f"{where}: top must be 1 or 5, got {top!r}")
        base = _number(obj, "base_rate", where, 0.0, 1.0)
        cal = Calibrator(method, top, base)
        if method != "constant":
            cal.temperature = _number(obj, "temperature", where, 0.0, math.inf, open_low=True)
        if method in ("logistic", "isotonic"):
            if obj.get("features") != list(FEATURES):
                raise ValueError(f"{where}: features must be {list(FEATURES)}, got {obj.get('features')!r}")
            cal.mean = _vector(obj, "mean", where, len(FEATURES))
            cal.std = _vector(obj, "std", where, len(FEATURES))
            cal.weights = _vector(obj, "weights", where, len(FEATURES) + 1)
            if np.any(cal.std <= 0):
                raise ValueError(f"{where}: std must be positive")
        if method == "isotonic":
            cal.knots_x, cal.knots_y = _vector(obj, "knots_x", where), _vector(obj, "knots_y", where)
            if len(cal.knots_x) != len(cal.knots_y) or len(cal.knots_x) == 0:
                raise ValueError(f"{where}: knots_x and knots_y must be non-empty and of equal length")
            if np.any(np.diff(cal.knots_x) < 0) or np.any(np.diff(cal.knots_y) < 0):
                raise ValueError(f"{where}: isotonic knots must be non-decreasing")
            if np.any((cal.knots_y < 0) | (cal.knots_y > 1)):
                raise ValueError(f"{where}: isotonic probabilities must lie in [0, 1]")
        return cal


def _number(obj: dict, key: str, where: str, low: float, high: float, open_low: bool = False) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (open_low and value <= low):
        raise ValueError(f"{where}: {key} must be a finite number in {'(' if open_low else '['}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _vector(obj: dict, key: str, where: str, length: int | None = None) -> np.ndarray:
    value = obj.get(key)
    ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    arr = np.asarray(value, np.float64) if ok else None
    if arr is None or not np.isfinite(arr).all() or (length is not None and arr.shape != (length,)):
        want = f"{length} finite numbers" if length is not None else "a list of finite numbers"
        raise ValueError(f"{where}: {key} must be {want}")
    return arr


def fit_calibrator(method: str, distances, correct, top: int = 1) -> Calibrator:
    """A calibrator of `method` for the event `correct` (B,) (top-1 right, or in the top 5 for top=5),
    fitted on the queries' (B, k) squared distances, nearest first."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}: choose from {', '.join(METHODS)}")
    d = _checked_distances(distances)
    y = _binary(correct, len(d))
    if len(d) == 0:
        raise ValueError("no queries to fit a calibrator on")
    base = float(np.clip(y.mean(), 0.0, 1.0))
    cal = Calibrator(method, top, base)
    if method == "constant":
        return cal
    cal.temperature = fit_temperature(d, y, top)
    if method == "temperature":
        return cal
    x = ranking_features(d, cal.temperature, top)
    cal.mean, cal.std, cal.weights = fit_logistic(x, y)
    if method == "isotonic":
        cal.knots_x, cal.knots_y = fit_isotonic(logistic_score(x, cal.mean, cal.std, cal.weights), y)
    return cal


def photo_folds(photo_ids, n_folds: int, seed: int = 0) -> np.ndarray:
    """(B,) fold of each query: its photo's, the distinct photos dealt into n_folds at random (seeded)."""
    ids = np.asarray(photo_ids, dtype=object)
    distinct = np.array(sorted(set(ids.tolist())), dtype=object)
    if n_folds < 2 or n_folds > len(distinct):
        raise ValueError(f"cross-fitting needs 2 <= folds <= the number of photos ({len(distinct)}), got {n_folds}")
    order = np.random.default_rng(seed).permutation(len(distinct))
    fold_of = {p: i % n_folds for i, p in zip(range(len(distinct)), distinct[order])}
    return np.array([fold_of[p] for p in ids], np.int64)


def cross_fit(method: str, distances, correct, folds, top: int = 1) -> np.ndarray:
    """(B,) held-out predictions: each query's probability from a calibrator fitted on the other folds."""
    d = _checked_distances(distances)
    y = _binary(correct, len(d))
    folds = np.asarray(folds)
    if folds.shape != (len(d),):
        raise ValueError(f"folds must have shape ({len(d)},), got {folds.shape}")
    out = np.empty(len(d))
    for f in np.unique(folds):
        held = folds == f
        if held.all():
            raise ValueError("cross-fitting needs at least two folds")
        out[held] = fit_calibrator(method, d[~held], y[~held], top).predict(d[held])
    return out


def choose_calibrator(distances, correct, folds, top: int = 1, methods=METHODS) -> tuple[str, dict]:
    """The method with the lowest held-out log loss, and {method: {"log_loss", "brier", "ece",
    "prediction"}} of every candidate (cross-fitted by `folds`)."""
    y = _binary(correct, len(np.asarray(folds)))
    table = {}
    for method in methods:
        p = cross_fit(method, distances, y, folds, top)
        table[method] = {"log_loss": log_loss(p, y), "brier": brier_score(p, y),
                         "ece": expected_calibration_error(p, y), "prediction": p}
    best = min(table, key=lambda m: table[m]["log_loss"])
    return best, table


# ---- judging a confidence --------------------------------------------------------------------------


def reliability_bins(prob, correct, n_bins: int = N_BINS) -> dict:
    """Equal-width bins of [0, 1]: {"edges" (n_bins + 1,), "count", "confidence" (mean probability),
    "accuracy" (share of outcomes that happened)}; NaN in the two means of an empty bin."""
    p = np.asarray(prob, np.float64).reshape(-1)
    y = _binary(np.asarray(correct).reshape(-1), len(p))
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if len(p) and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, p, n_bins) / count
        accuracy = np.bincount(which, y, n_bins) / count
    return {"edges": edges, "count": count.astype(np.int64), "confidence": confidence, "accuracy": accuracy}


def expected_calibration_error(prob, correct, n_bins: int = N_BINS) -> float:
    """ECE: the mean over queries of |accuracy - mean confidence| of their bin (equal-width bins)."""
    bins = reliability_bins(prob, correct, n_bins)
    n = bins["count"].sum()
    if n == 0:
        raise ValueError("no predictions to score")
    used = bins["count"] > 0
    gap = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    return float(np.sum(bins["count"][used] * gap) / n)


def completion_of_levels(n_levels: int) -> np.ndarray:
    """(L,) the share of a sketch's points each completion level holds: (l + 1) / L
    (`sketch_env.render.level_cut_points` up to rounding)."""
    return (np.arange(n_levels) + 1.0) / n_levels


def early_stop_table(confidence, outcomes: dict, thresholds=STOP_THRESHOLDS, completion=None) -> list[dict]:
    """What stopping at the first level whose confidence reaches p would give, for each p.

    confidence: (S, L) probabilities of S sketches at L completion levels (P(top-1 right), or P(in the
    top 5)); outcomes: {name: (S, L) booleans}, e.g. {"top1": rank == 1, "top5": rank <= 5};
    completion (L,): the share of the drawing each level holds (default `completion_of_levels`). A sketch
    whose confidence never reaches p is drawn to the end.
    Per p: fires (share of sketches that stop early, %), n_fired, NAME_right (% of those that fire
    where NAME holds at the stop, NaN if none fires), completion_median (median share drawn at the stop,
    of those that fire), saved_median (1 minus it), saved_mean_all (mean share saved over all sketches,
    0 where it does not fire) and NAME_at_stop (% of all sketches where NAME holds at the stop, or at the
    complete sketch where it never fires).
    """
    conf = np.asarray(confidence, np.float64)
    if conf.ndim != 2 or conf.size == 0:
        raise ValueError(f"confidence must be a non-empty (S, L) array, got {conf.shape}")
    events = {name: np.asarray(v, bool) for name, v in outcomes.items()}
    for name, v in events.items():
        if v.shape != conf.shape:
            raise ValueError(f"outcome {name!r} must have the confidence's shape (S, L) = {conf.shape}, got {v.shape}")
    s, levels = conf.shape
    share = completion_of_levels(levels) if completion is None else np.asarray(completion, np.float64)
    if share.shape != (levels,):
        raise ValueError(f"completion must have shape ({levels},), got {share.shape}")
    rows = []
    for p in thresholds:
        reached = conf >= p
        fired = reached.any(1)
        stop = np.where(fired, reached.argmax(1), levels - 1)
        drawn = share[stop]
        n = int(fired.sum())
        row = {"threshold": float(p), "fires": float(100.0 * fired.mean()), "n_fired": n}
        for name, v in events.items():
            at_stop = v[np.arange(s), stop]
            row[f"{name}_right"] = float(100.0 * at_stop[fired].mean()) if n else math.nan
            row[f"{name}_at_stop"] = float(100.0 * at_stop.mean())
        row |= {"completion_median": float(np.median(drawn[fired])) if n else math.nan,
                "saved_median": float(1.0 - np.median(drawn[fired])) if n else math.nan,
                "saved_mean_all": float(np.mean(np.where(fired, 1.0 - drawn, 0.0)))}
        rows.append(row)
    return rows


# ---- the stored pair -------------------------------------------------------------------------------


@dataclass
class Confidence:
    """The fitted pair P(top-1 right), P(in the top 5) and where they were fitted (`info`: plain JSON)."""

    top1: Calibrator
    top5: Calibrator
    info: dict

    def predict(self, distances) -> tuple[np.ndarray, np.ndarray]:
        """(P(top-1 right), P(in the top 5)), each (B,), for (B, k) squared distances nearest first.
        P(top 5) is kept at least P(top 1)."""
        p1 = self.top1.predict(distances)
        return p1, np.maximum(self.top5.predict(distances), p1)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "top_k": TOP_K, "top1": self.top1.to_json(),
                "top5": self.top5.to_json(), "info": self.info}

    def save(self, path: str | Path) -> Path:
        """Write as JSON, atomically (never a pickle)."""
        return atomic_write_json(path, _finite(self.to_json()))

    @staticmethod
    def load(path: str | Path, missing: str | None = None) -> "Confidence":
        """Read what `save` wrote; DataError naming the file for a missing, unreadable or malformed one."""
        path = Path(path)
        obj = read_json_object(path, missing or f"{path}: no calibrator here (darp calibrate fits one)")
        if obj.get("format") != FORMAT or obj.get("version") != VERSION:
            raise DataError(f"{path}: not a calibrator file (format {obj.get('format')!r} version {obj.get('version')!r}, "
                            f"want {FORMAT!r} {VERSION})")
        if obj.get("top_k") != TOP_K:
            raise DataError(f"{path}: fitted on the top {obj.get('top_k')!r} distances; this version reads the top {TOP_K}")
        try:
            top1 = Calibrator.from_json(obj.get("top1"), "top1")
            top5 = Calibrator.from_json(obj.get("top5"), "top5")
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None
        if top1.top != 1 or top5.top != 5:
            raise DataError(f"{path}: top1/top5 calibrators are for top {top1.top} and {top5.top}")
        info = obj.get("info", {})
        return Confidence(top1, top5, info if isinstance(info, dict) else {})


def _finite(obj):
    """obj with NaN and infinities replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj
