"""`darp train`: phase 2, DARP (or a baseline) with RLlib, as one Ray Tune trial.

    darp train --data runs/demo/data --embedding runs/demo/phase1 --run-dir runs/demo/darp

The options are policies.running.registry.TrainConfig's; the training is policies.running.fit.train (the run
directory's layout: policies.running.runs). `tensorboard --logdir RUN` shows the curves; `--resume` (default)
continues a killed run. When it has finished, the run's confidence is fitted on the validation split
(RUN/calibration.json, `policies.running.calibration.calibrate_after_training`).
"""

from __future__ import annotations

from policies.running.registry import TrainConfig

__all__ = ["TrainConfig", "run"]


def run(cfg: TrainConfig) -> int:
    """Train (`policies.running.fit.train`), then fit the run's confidence on its validation split
    (`policies.running.calibration.calibrate_after_training`: RUN/calibration.json)."""
    from policies.running.fit import train  # Ray is imported when training, not for `darp train --help`
    from policies.running.calibration import calibrate_after_training

    train(cfg)
    calibrate_after_training(cfg.run_dir, cfg.data, cfg.val_split)
    return 0
