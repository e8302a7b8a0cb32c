"""`darp calibrate`: fit a run's confidence (when to stop drawing) on the validation split.

    darp calibrate --data data/chairv2 --run runs/chair/phase1 [--split val] [--method auto]

Every calibrator is cross-fitted by photo, the lowest held-out log loss kept for each event, then refitted on the
whole split (`policies.running.calibration.calibrate_run`); writes RUN/calibration.json (JSON, atomically) with the
held-out figures and prints them. `darp pretrain` and `darp train` do this on the val split when they finish;
`darp calibrate` reruns it (another split, a fixed method).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from policies.running.calibration import FIT_SPLIT
from sketch_env.errors import ConfigError
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

    def check(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"--folds must be >= 2, got {self.folds}")


def run(cfg: CalibrateConfig) -> int:
    import torch

    from policies.running.calibration import calibrate_run

    torch.set_num_threads(cfg.num_threads)
    calibrate_run(cfg.run, cfg.data, cfg.split, cfg.method, cfg.folds, cfg.seed, level_batch=cfg.level_batch)
    return 0
