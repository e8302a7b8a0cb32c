"""`darp pretrain`: phase 1, the triplet embedding network and the export of its embeddings.

The options are `policies.phase1.Phase1Config`; the training lives in `policies.phase1`.

    darp pretrain --data data/chairv2 --run-dir runs/chair/phase1
"""

from __future__ import annotations

from policies.phase1 import CHECKPOINT_FILE, RUN_FILE, RUN_KIND, Phase1Config, run

PretrainConfig = Phase1Config

__all__ = ["CHECKPOINT_FILE", "RUN_FILE", "RUN_KIND", "PretrainConfig", "run"]
