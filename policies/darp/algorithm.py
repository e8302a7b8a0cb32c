"""The DARP algorithm on RLlib: `DARPConfig` and `DARP` with its own training step.

Run it (see also `darp train`)::

    from policies.darp.algorithm import DARPConfig
    config = (
        DARPConfig()
        .environment(env_config={"data": "runs/demo/data", "embedding": "runs/demo/phase1"})
        .env_runners(num_env_runners=1, num_envs_per_env_runner=16)
        .learners(num_learners=2)                       # num_gpus_per_learner=1 on a GPU cluster
        .training(num_episodes_per_train_batch=32, std_start=0.3, std_end=0.05)
    )
    algo = config.build_algo()
    result = algo.train()                               # result["evaluation"]: NaN until an iteration validates
    print(algo.evaluate()["auir"])                      # validate now

One training step: sample complete episodes from the EnvRunners (whole drawing episodes, 17 levels x
G glimpses each), update the learners (DARPLearner: bootstrapped REINFORCE + supervised loss), sync
weights (the scheduled std travels with them as a module buffer) and tell the envs the training step
(for the `threshold` reward). Every `evaluation_interval` iterations (RLlib's evaluation hook, default
5) `evaluate()` validates the deterministic policy on the validation split (policies.darp.validation:
AUIR, acc@k, percentile curve under result["evaluation"]).
"""

from __future__ import annotations

import tree
from ray.rllib.algorithms import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)
from ray.tune.registry import register_env

from policies.darp.defaults import ENV_NAME, EPISODES_PER_BATCH, use_sketch_env
from policies.darp.schedules import DEFAULT_STD_SCHEDULE
from policies.darp.validation import Validated, ValidationConfig



def _make_env(config: dict):
    from sketch_env.vector_env import make_vector_env

    return make_vector_env(dict(config))


def register_darp_env() -> None:
    """Register the env creator under ENV_NAME with the Ray instance that is up now.

    Called where an algorithm is built and in DARP.setup, not at import: a registration made at
    import belongs to the Ray instance of that moment and is lost with it.
    """
    register_env(ENV_NAME, _make_env)


class DARPConfig(ValidationConfig, AlgorithmConfig):
    """AlgorithmConfig for DARP: RLlib's fields plus the hybrid-loss, schedule and validation settings."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DARP)
        self._init_validation()
        use_sketch_env(self)
        self.batch_mode = "complete_episodes"
        self.num_episodes_per_train_batch = EPISODES_PER_BATCH
        self.rl_weight = 0.01
        self.advantage_norm = False
        self.locator_return = "episode"
        self.sup_lambda = 1.0
        self.sup_target = "photo"
        self.sup_loss = "infonce"
        self.sup_temperature = 0.2
        self.gamma = 0.99
        self.lr = 3e-4
        self.std_start = DEFAULT_STD_SCHEDULE.start
        self.std_end = DEFAULT_STD_SCHEDULE.end
        self.std_shape = DEFAULT_STD_SCHEDULE.shape
        self.std_horizon = DEFAULT_STD_SCHEDULE.horizon
        # Batched EnvRunner path (policies.darp.connectors, policies.darp.env_runner): the default per sub-env
        # connector pipelines and episode bookkeeping cost more than the module's forward pass.
        from policies.darp.connectors import batched_connectors
        from policies.darp.env_runner import DARPEnvRunner

        self.env_runner_cls = DARPEnvRunner
        batched_connectors(self)

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        num_episodes_per_train_batch=NotProvided,
        rl_weight=NotProvided,
        advantage_norm=NotProvided,
        locator_return=NotProvided,
        sup_lambda=NotProvided,
        sup_target=NotProvided,
        sup_loss=NotProvided,
        sup_temperature=NotProvided,
        std_start=NotProvided,
        std_end=NotProvided,
        std_shape=NotProvided,
        std_horizon=NotProvided,
        **kwargs,
    ):
        """DARP settings.

        Args:
            num_episodes_per_train_batch: complete episodes per update; keep it a multiple of
                num_envs_per_env_runner x max(1, num_env_runners) and of num_learners.
            rl_weight: weight of the policy-gradient (+ baseline) term; the authors' code used 0.01.
            advantage_norm: scale the locator's advantages (G_t - b_t) to zero mean and unit std
                over each minibatch.
            locator_return: "episode" (G_t: the discounted return to the episode's end) or "level"
                (the rewards from t + 1 to the end of the level the location's glimpse is read on:
                in local match, what the location changed; policies.darp.learner.ComputeLevelReturns).
            sup_lambda: weight of the supervised ||a_t - e_target||^2 term.
            sup_target: e_target: "photo" (the true photo's embedding) or "final_sketch" (the
                phase-1 embedding of the complete sketch).
            sup_loss: "infonce" (cross-entropy of the target photo among the training gallery; the default,
                policies.darp.supervised says why) or "mse" (the paper's ||a_t - e_target||^2).
            sup_temperature: infonce temperature, relative to the gallery's mean squared pairwise distance.
            std_start, std_end, std_shape, std_horizon: the locator's std schedule
                (policies.darp.schedules.StdSchedule; horizon in env steps).

        Validation settings are in `evaluation()` (policies.darp.validation.ValidationConfig).
        """
        super().training(**kwargs)
        for name, value in dict(
            num_episodes_per_train_batch=num_episodes_per_train_batch,
            rl_weight=rl_weight,
            advantage_norm=advantage_norm,
            locator_return=locator_return,
            sup_lambda=sup_lambda,
            sup_target=sup_target,
            sup_loss=sup_loss,
            sup_temperature=sup_temperature,
            std_start=std_start,
            std_end=std_end,
            std_shape=std_shape,
            std_horizon=std_horizon,
        ).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    @property
    def std_schedule(self) -> dict:
        return {"start": self.std_start, "end": self.std_end, "shape": self.std_shape, "horizon": self.std_horizon}

    @override(AlgorithmConfig)
    def validate(self) -> None:
        super().validate()
        per_round = self.num_envs_per_env_runner * max(1, self.num_env_runners)
        if self.num_episodes_per_train_batch % per_round:
            self._value_error(
                f"num_episodes_per_train_batch={self.num_episodes_per_train_batch} must be a multiple of "
                f"num_envs_per_env_runner x num_env_runners = {per_round} (RLlib resets all sub-envs per sample call)"
            )
        if self.locator_return not in ("episode", "level"):
            self._value_error(f"locator_return must be 'episode' or 'level', got {self.locator_return!r}")
        if self.sup_loss not in ("mse", "infonce"):
            self._value_error(f"sup_loss must be 'mse' or 'infonce', got {self.sup_loss!r}")
        if self.sup_loss == "infonce" and self.sup_target != "photo":
            self._value_error("sup_loss='infonce' ranks the target photo among the gallery: it needs sup_target='photo'")
        if self.num_learners > 1 and self.num_episodes_per_train_batch % self.num_learners:
            self._value_error(
                f"num_episodes_per_train_batch={self.num_episodes_per_train_batch} must be a multiple of "
                f"num_learners={self.num_learners}, so no learner gets a cut episode"
            )

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from policies.darp.module import DARPModule

        return RLModuleSpec(module_class=DARPModule, model_config={"std": self.std_start})

    @override(AlgorithmConfig)
    def get_default_learner_class(self):
        from policies.darp.learner import DARPLearner

        return DARPLearner

    @property
    @override(AlgorithmConfig)
    def _model_config_auto_includes(self):
        return {"max_seq_len": self.episode_length()}

    def episode_length(self) -> int:
        from sketch_env.render import N_GLIMPSES, N_LEVELS

        return N_LEVELS * int(self.env_config.get("n_glimpses", N_GLIMPSES))


class DARP(Validated, Algorithm):
    """Deep reinforced attention regression (see the module docstring)."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> DARPConfig:
        return DARPConfig()

    @override(Algorithm)
    def setup(self, config):
        register_darp_env()
        super().setup(config)

    @override(Algorithm)
    def training_step(self) -> None:
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            episodes, runner_metrics = self._sample_episodes()
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)

        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                episodes=episodes,
                num_epochs=self.config.num_epochs,
                minibatch_size=self.config.minibatch_size,
                shuffle_batch_per_epoch=self.config.num_epochs > 1,
                timesteps={
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                        (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0
                    )
                },
            )
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)

        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
        step = int(self.training_iteration) + 1
        self.env_runner_group.foreach_env_runner(
            lambda runner: _set_training_step(runner, step),
            local_env_runner=True,
        )

    def _sample_episodes(self):
        per_runner = self.config.num_episodes_per_train_batch // max(1, self.config.num_env_runners)
        sampled = self.env_runner_group.foreach_env_runner(
            lambda runner: (runner.sample(num_episodes=per_runner), runner.get_metrics()),
            local_env_runner=self.env_runner_group.num_remote_workers() <= 0,
        )
        episodes = tree.flatten([s[0] for s in sampled])
        return episodes, [s[1] for s in sampled]


def _set_training_step(runner, step: int) -> None:
    env = getattr(runner, "env", None)
    if env is None:
        return
    target = env.unwrapped if hasattr(env, "unwrapped") else env
    if hasattr(target, "set_training_step"):
        target.set_training_step(step)


__all__ = ["DARP", "DARPConfig", "register_darp_env"]
