"""`darp sweep`: Ray Tune search over DARP's std schedule, ASHA early stopping on validation AUIR.

    darp sweep --data runs/demo/data --embedding runs/demo/phase1 --run-dir runs/demo/sweep --samples 16

Each trial is one `darp train` run (policies.running.fit.TrainTrial, the same trainable) with the same seed,
so trials differ by their schedule only; every `darp train` option sets what all trials train with.
Trial 0 runs the given (by default TrainConfig's) schedule, so the table shows what the search gains
over it. Validation runs every iteration: ASHA compares trials on "evaluation/auir" at every rung.

Writes under --run-dir: tune/ (Tune's experiment: trial results and checkpoints; on a multi-node
cluster it lives under --storage instead, which every node must reach), best_config.json (TrainConfig
keys, for `darp train --config`), trials.csv (one row per trial) and sweep.png (validation AUIR against
each searched parameter). Rerunning the same command after a kill resumes the experiment
(Tuner.restore): finished trials are kept, unfinished ones continue from their last checkpoint; the
search space and budget of the first run apply.

The options are policies.running.sweep.SweepConfig's; the engine is policies.running.sweep.run_sweep.
"""

from __future__ import annotations

from policies.running.sweep import SweepConfig, run_sweep

__all__ = ["SweepConfig", "run"]


def run(cfg: SweepConfig) -> int:
    """Run or resume the sweep (`policies.running.sweep.run_sweep`)."""
    run_sweep(cfg)
    return 0
