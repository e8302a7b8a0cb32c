"""Validation during training through RLlib's evaluation hooks, shared by DARP and the PPO baseline.

RLlib decides when (`config.evaluation(evaluation_interval=N)`: after every N-th training iteration)
and where the figures go (result["evaluation"]); `Validated.evaluate` decides what: the deterministic
policy over the validation split (policies.darp.rollout.PolicyValidator: AUIR, acc@k, m@A and the
percentile curve), not RLlib's sampled episode returns. The validator steps its own vector env (64
sketches at a time, in order) with a local copy of the learner's module. RLlib still builds a local
evaluation EnvRunner whenever evaluation_interval is set (env_runner_group.py forces one when there are
no remote evaluation EnvRunners); `ValidationConfig` keeps it small: one sub-env on the validation split.

Every result has the same shape, so Tune's progress.csv (whose columns come from the first result)
and TensorBoard see the validation figures: result["evaluation"] holds VALIDATION_METRICS, NaN in
the iterations that did not validate (TensorBoard skips NaN), and result[VALIDATION_AUIR] repeats the
AUIR at the top level, where Tune's CheckpointConfig(checkpoint_score_attribute=...) looks for it
(it does not look into nested dicts). result[ENV_STEPS_PER_S] is the iteration's sampling throughput.
"""

from __future__ import annotations

import math
import time

from ray.rllib.algorithms import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, EVALUATION_RESULTS, NUM_ENV_STEPS_SAMPLED

from policies.darp.defaults import DEFAULT_VAL_INTERVAL
from sketch_env.render import N_LEVELS

VALIDATION_METRICS = ("auir", "m_at_a", "acc@1", "acc@5", "acc@10", "n_sketches", "n_photos") + tuple(
    f"percentile_level_{i:02d}" for i in range(N_LEVELS)
)
VALIDATION_AUIR = "validation_auir"
ENV_STEPS_PER_S = "env_steps_per_s"


class ValidationConfig:
    """AlgorithmConfig mixin: the validation split and size next to RLlib's evaluation settings.

    Put it before the AlgorithmConfig class in the bases and call `_init_validation()` in __init__.
    """

    def _init_validation(self) -> None:
        self.evaluation_interval = DEFAULT_VAL_INTERVAL
        self.val_split = "val"
        self.val_max_sketches = 0

    @override(AlgorithmConfig)
    def evaluation(self, *, val_split=NotProvided, val_max_sketches=NotProvided, **kwargs):
        """RLlib's evaluation settings (`evaluation_interval`: validate every N iterations, 0 or None:
        never), plus the split validated (sketch_env.data.select_split names) and `val_max_sketches`
        (validate at most this many sketches; 0: all of the split)."""
        super().evaluation(**kwargs)
        if val_split is not NotProvided:
            self.val_split = val_split
        if val_max_sketches is not NotProvided:
            self.val_max_sketches = val_max_sketches
        return self

    @override(AlgorithmConfig)
    def get_evaluation_config_object(self):
        """RLlib's evaluation config, its (unused) EnvRunner on one sub-env of the validation split
        instead of a second copy of the training env."""
        config = super().get_evaluation_config_object()
        if config is not None:
            config.env_config = {**self.env_config, "split": self.val_split}
            config.num_envs_per_env_runner = 1
        return config


class Validated:
    """Algorithm mixin: `evaluate()` validates the deterministic policy; results keep one shape."""

    _validator = None

    @override(Algorithm)
    def evaluate(self, parallel_train_future=None) -> dict:
        """The learner's current policy on the validation split: {metric: value} (VALIDATION_METRICS)."""
        from policies.darp.rollout import PolicyValidator

        if self._validator is None:
            self._validator = PolicyValidator.from_config(self.config)
        state = self.learner_group.get_state(components="learner/rl_module/default_policy")
        return self._validator.evaluate(state["learner"]["rl_module"]["default_policy"])

    @override(Algorithm)
    def step(self) -> dict:
        start = time.perf_counter()
        result = super().step()
        seconds = time.perf_counter() - start
        fill_validation(result, result.get(EVALUATION_RESULTS) or {})
        sampled = result.get(ENV_RUNNER_RESULTS, {}).get(NUM_ENV_STEPS_SAMPLED, 0)
        result[ENV_STEPS_PER_S] = float(sampled) / seconds if seconds > 0 else math.nan
        return result


def fill_validation(result: dict, metrics: dict) -> dict:
    """Set result["evaluation"] to `metrics` in VALIDATION_METRICS' shape (NaN where missing) and
    result[VALIDATION_AUIR]; returns result."""
    result[EVALUATION_RESULTS] = {k: float(metrics.get(k, math.nan)) for k in VALIDATION_METRICS}
    result[VALIDATION_AUIR] = result[EVALUATION_RESULTS]["auir"]
    return result


def validation_of(result: dict) -> dict:
    """The validation figures of a result, or {} when that iteration did not validate."""
    metrics = result.get(EVALUATION_RESULTS) or {}
    auir = metrics.get("auir")
    if auir is None or (isinstance(auir, float) and math.isnan(auir)):
        return {}
    return dict(metrics)


__all__ = ["ENV_STEPS_PER_S", "VALIDATION_AUIR", "VALIDATION_METRICS", "Validated", "ValidationConfig",
           "fill_validation", "validation_of"]
