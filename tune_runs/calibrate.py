"""`darp calibrate`: fit a run's confidence (when to stop drawing) on the validation split.

`calibrate_run` fits it (`policies.running.calibration.fit_run_confidence`: every calibrator cross-fitted by
photo, the lowest held-out log loss kept for each event, refitted on the whole split), writes RUN/calibration.json
(JSON, atomically) with the held-out figures and prints them. `darp pretrain` and `darp train` call it on the val
split when they finish; `darp calibrate` reruns it (another split, a fixed method).

    darp calibrate --data data/chairv2 --run runs/chair/phase1 [--split val] [--method auto]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from policies.running.calibration import FIT_SPLIT, RankedQueries, fit_run_confidence, fitted_on, run_queries
from policies.running.runs import CALIBRATION_FILE
from sketch_env.confidence import Confidence
from sketch_env.data import DataError
from sketch_env.options import arg



@dataclass
class CalibrateConfig:
    """Fit a run's confidence (P(top-1 right), P(in the top 5)) on a split: RUN/calibration.json."""

    data: Path = arg(help="data set directory")
    run: Path = arg(help="run directory (darp pretrain or darp train)")
    split: Literal["train", "val", "test", "train+val", "all"] = arg(
        FIT_SPLIT, "split whose sketches (with known photos) fit the calibrator: val, held out by photo from training")
    method: Literal["auto", "constant", "temperature", "logistic", "isotonic"] = arg(
        "auto", "calibrator: auto (the lowest held-out log loss of all, for each event), constant (the base rate), "
                "temperature (softmax share over the 10 nearest), logistic (on ranking features) or isotonic "
                "(the logistic score mapped monotonically)")
    folds: int = arg(5, "folds of photos for the held-out (cross-fitted) figures and the choice of method")
    seed: int = arg(0, "seed of the photos' folds")
    level_batch: int = arg(1024, "partial-sketch images per forward pass of a triplet network")
    num_threads: int = arg(2, "torch CPU threads")


def calibrate_run(run_dir: str | Path, data_dir: str | Path, split: str = FIT_SPLIT, method: str = "auto",
                  folds: int = 5, seed: int = 0, queries: RankedQueries | None = None, level_batch: int = 1024,
                  quiet: bool = False) -> Confidence:
    """Fit run `run_dir`'s confidence on `split` of `data_dir` (its queries, or `queries` when given) and
    write RUN/calibration.json; prints the held-out figures unless `quiet`."""
    from policies.running.trained import read_run

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
    from tune_runs.plots import format_early_stop

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


def run(cfg: CalibrateConfig) -> int:
    import torch

    from policies.running.trained import read_run

    torch.set_num_threads(cfg.num_threads)
    if cfg.folds < 2:
        raise DataError(f"--folds must be >= 2, got {cfg.folds}")
    read_run(cfg.run)
    calibrate_run(cfg.run, cfg.data, cfg.split, cfg.method, cfg.folds, cfg.seed, level_batch=cfg.level_batch)
    return 0
