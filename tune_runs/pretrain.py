"""`darp pretrain`: phase 1, the triplet embedding network and the export of its embeddings.

The options are `policies.phase1.training.Phase1Config`; the training lives in `policies.phase1.training`. When it
has finished, the run's confidence is fitted on the val split (RUN/calibration.json,
`policies.running.calibration.calibrate_after_training`).

    darp pretrain --data data/chairv2 --run-dir runs/chair/phase1
"""

from __future__ import annotations

from policies.phase1 import training
from policies.phase1.training import CHECKPOINT_FILE, RUN_FILE, RUN_KIND, Phase1Config

PretrainConfig = Phase1Config

__all__ = ["CHECKPOINT_FILE", "RUN_FILE", "RUN_KIND", "PretrainConfig", "run"]


def run(cfg: PretrainConfig) -> dict:
    """Train (or resume) phase 1 and export (`policies.phase1.training.run`), then fit the run's confidence."""
    from policies.running.calibration import calibrate_after_training

    record = training.run(cfg)
    calibrate_after_training(cfg.run_dir, cfg.data)
    return record
