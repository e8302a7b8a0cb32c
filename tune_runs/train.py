"""`darp train`: phase 2, DARP (or a baseline) with RLlib, as one Ray Tune trial.

    darp train --data runs/demo/data --embedding runs/demo/phase1 --run-dir runs/demo/darp

The options are policies.registry.TrainConfig's; the training is policies.fit.train (the run
directory's layout: policies.runs). `tensorboard --logdir RUN` shows the curves; `--resume` (default)
continues a killed run.
"""

from __future__ import annotations

from policies.registry import TrainConfig

__all__ = ["TrainConfig", "run"]


def run(cfg: TrainConfig) -> int:
    from policies.fit import train  # Ray is imported when training, not for `darp train --help`

    train(cfg)
    return 0
