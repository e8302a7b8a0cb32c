"""The models this project trains, and how a training configuration becomes an RLlib AlgorithmConfig.

One list (MODELS) names every RL model with its table name and whether it chooses where to look;
`darp train --algo`, `darp report` and the tests read it from here. `TrainConfig` is what one
training run needs (model, sampling, loss, exploration, networks, validation, run control);
`build_algo_config(cfg)` turns it into the AlgorithmConfig (DARPConfig with the model's RLModule
and Learner, or SketchPPOConfig) that `policies.running.fit` trains and that tests and benchmarks build.

    from policies.running.registry import TrainConfig, build_algo_config
    config = build_algo_config(TrainConfig(data="runs/demo/data", embedding="runs/demo/phase1", run_dir="unused"))
    algo = config.build_algo()
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from policies.darp.defaults import DEFAULT_VAL_INTERVAL, ENVS_PER_RUNNER, EPISODES_PER_BATCH, MODEL_DEFAULTS, ModelConfig
from policies.darp.schedules import DEFAULT_STD_SCHEDULE, StdShape
from sketch_env.errors import ConfigError
from sketch_env.options import arg
from sketch_env.render import N_GLIMPSES, N_LEVELS


@dataclass(frozen=True)
class Model:
    """An RL model: `name` (darp train --algo), `display` (results tables), `looks` (chooses where to
    look: 12 glimpses per level by default, glimpses.png), `summary` (its one-line description)."""

    name: str
    display: str
    looks: bool
    summary: str


# In the order of the paper's Table III.
MODELS = (
    Model("vanilla-pg", "Triplet + vanilla RL", False, "REINFORCE on the sketch features"),
    Model("ppo", "Triplet + PPO", False, "RLlib's PPO on the sketch features"),
    Model("bdqn", "Bootstrapped DQN", True, "bootstrapped DQN locator over a grid"),
    Model("darp-no-attention", "DARP without attention", False,
          "core RNN over the partial sketch's features, supervised only"),
    Model("darp-no-exploration", "DARP without exploration", True, "one head, fixed std 0.05"),
    Model("darp", "DARP-SBIR", True, "the full model"),
)
# This module imports no Ray: `darp train --help` reads TrainConfig from it.
ALGOS = tuple(m.name for m in MODELS)
Algo = Literal[ALGOS]
GLIMPSING = tuple(m.name for m in MODELS if m.looks)  # the models that choose where to look
DISPLAY = {m.name: m.display for m in MODELS}
NO_EXPLORATION_STD = 0.05


@dataclass
class TrainConfig:
    """Train DARP on RLlib over the sketch-retrieval environment."""

    data: str = arg(help="data set directory (darp data generate / import-qmul)")
    embedding: str = arg(help="phase-1 run directory (darp pretrain) with embeddings/")
    run_dir: str = arg(help="output directory for checkpoints and results")
    algo: Algo = arg("darp", "the model: darp, its ablations or a baseline (README, Models)")
    iterations: int = arg(40, "training iterations (each: a batch of complete episodes, then an update)")
    time_budget_s: float = arg(0.0, "stop after this many seconds of training (0: no limit)")
    seed: int = arg(0, "random seed")
    resume: bool = arg(True, "continue an unfinished run in --run-dir (with the same options)")
    # sampling and hardware
    num_env_runners: int = arg(0, "remote EnvRunners (0: sample in the trial's process)")
    num_envs_per_env_runner: int = arg(ENVS_PER_RUNNER, "vectorised envs per EnvRunner", advanced=True)
    episodes_per_batch: int = arg(EPISODES_PER_BATCH, "complete episodes per update (multiple of envs x runners and of learners)", advanced=True)
    num_learners: int = arg(0, "remote learners (0: learn in the trial's process; 2+: DDP)")
    num_gpus_per_learner: float = arg(0.0, "GPUs per learner (1 on a GPU cluster)")
    num_threads: int = arg(1, "torch CPU threads of the training process; 1 suits per-step batches on few cores", advanced=True)
    # environment
    n_glimpses: int | None = arg(
        None, f"glimpses per completion level (default: {N_GLIMPSES} for the models that look, 1 for the others)")
    glimpse_image_size: int = arg(64, "side of the partial-sketch render glimpses are read from (128 with --glimpse-size "
                                       "16: the same field of view as 64 with 8, a fovea twice as sharp)", experiment=True)
    glimpse_size: int = arg(8, "side of each glimpse patch in pixels (of a 64 x 64 render)")
    snap_to_ink: bool = arg(False, "every glimpse looks at the inked pixel nearest to the chosen location", experiment=True)
    reward: Literal["threshold", "best_rank", "rank_gain"] = arg("rank_gain", "reward variant (see sketch_env.rewards)", advanced=True)
    match: Literal["global", "local", "dense", "dense-ink"] = arg(
        "global", "what the ranking compares: global embeddings (the paper), + local descriptors where the glimpses "
        "look, at every cell or every inked cell (all but global: `darp pretrain --local-dim`)")
    local_weight: float = arg(1.0, "weight of the local term in the score (--match local, dense or dense-ink)", advanced=True)
    # loss and optimisation
    num_epochs: int = arg(4, "passes over each batch of episodes (more supervised steps per sampled batch)", advanced=True)
    minibatch_episodes: int = arg(16, "episodes per gradient step (0: the whole batch)", advanced=True)
    lr: float = arg(3e-4, "learning rate")
    gamma: float | None = arg(None, "discount of the returns-to-go (default: 0.99; 0 for vanilla-pg and ppo, whose query "
                                     "does not change what they see next: with rank_gain a return would cancel its effect)", advanced=True)
    rl_weight: float = arg(0.01, "weight of the policy-gradient term (authors' code: 0.01)", advanced=True)
    advantage_norm: bool = arg(False, "scale the locator's advantages to zero mean and unit std per minibatch", advanced=True)
    locator_return: Literal["episode", "level"] | None = arg(
        None, "what the locator's policy gradient credits a location with: the discounted return of the rest of the "
        "episode, or the rewards until the end of the level whose evidence its glimpse joins (default: level with "
        "--match local, else episode)", experiment=True)
    sup_lambda: float = arg(1.0, "weight of the supervised ||a - e_target||^2 term", advanced=True)
    sup_target: Literal["photo", "final_sketch"] = arg("photo", "e_target: the true photo's embedding or the complete sketch's", advanced=True)
    sup_loss: Literal["mse", "infonce"] = arg(
        "infonce", "supervised objective: infonce, cross-entropy of the target photo among the training gallery (needs "
        "--sup-target photo; beat mse on Chair-V2 validation), or mse, squared error to e_target (the paper)", advanced=True)
    sup_temperature: float = arg(0.2, "infonce temperature, relative to the gallery's mean squared pairwise distance", advanced=True)
    residual_query: bool = arg(MODEL_DEFAULTS.residual_query, "query = normalize(phase-1 embedding of the partial sketch + learned correction)", advanced=True)
    dropout: float = arg(MODEL_DEFAULTS.dropout, "dropout on the core state before the action network, in updates only: the query "
                               "correction overfits the training photos without it (0.3 beat 0 on Chair-V2 validation)", advanced=True)
    # locator exploration
    n_heads: int = arg(MODEL_DEFAULTS.n_heads, "bootstrapped locator heads K")
    bootstrap_p: float = arg(MODEL_DEFAULTS.bootstrap_p, "Bernoulli probability of each head's bootstrap mask", advanced=True)
    grid: int = arg(MODEL_DEFAULTS.grid, "bdqn: locations per side of the grid (grid x grid actions)", advanced=True)
    locator_head: Literal["gaussian", "cells"] = arg(
        MODEL_DEFAULTS.locator_head, "darp: where its locator heads point: a Gaussian over a point (the paper's), or "
        "logits over the unread inked cells of the local grid (--match local; policies.darp.cell_locator)", advanced=True)
    std_start: float = arg(DEFAULT_STD_SCHEDULE.start, "locator std at the start")
    std_end: float = arg(DEFAULT_STD_SCHEDULE.end, "locator std at the end of the schedule")
    std_shape: StdShape = arg(DEFAULT_STD_SCHEDULE.shape, "shape of the std decay", advanced=True)
    std_horizon: int = arg(DEFAULT_STD_SCHEDULE.horizon, "env steps over which the std decays", advanced=True)
    # networks
    cell: Literal["gru", "lstm"] = arg(MODEL_DEFAULTS.cell, "core RNN cell", experiment=True)
    h0_init: Literal["sketch", "zeros"] = arg(MODEL_DEFAULTS.h0_init, "initialise h0 from the first partial sketch's embedding, or zeros", experiment=True)
    use_sketch_embedding: bool = arg(MODEL_DEFAULTS.use_sketch_embedding, "feed the phase-1 embedding of the current partial sketch at every step", experiment=True)
    eval_heads: Literal["mean", "first"] = arg(MODEL_DEFAULTS.eval_heads, "deterministic location: mean of all heads or head 0", experiment=True)
    retina_encoder: Literal["linear", "conv"] = arg(MODEL_DEFAULTS.retina_encoder, "what the glimpse network reads a retina with: one linear "
                                                      "layer (the paper's), or a small CNN (for sharp glimpses)", experiment=True)
    # supervised warm start (policies.darp.warm_start)
    warm_start_updates: int = arg(0, "supervised updates before RL on glimpses placed by --warm-start-locator (0: none)")
    warm_start_locator: Literal["ink", "newest-ink", "centre", "random"] = arg(
        "ink", "the fixed rule the warm start's glimpses are taken by (sketch_env.locators)", advanced=True)
    warm_start_noise_copies: int = arg(0, "the warm start also trains on this many copies of the training sketches with "
                                           "unnecessary strokes added (copy c of n: --warm-start-noise-strokes x (c + 1) / n "
                                           "strokes), re-embedded by the phase-1 network", advanced=True)
    warm_start_noise_strokes: int = arg(4, "noise strokes in the noisiest copy of --warm-start-noise-copies", advanced=True)
    # validation
    val_interval: int = arg(DEFAULT_VAL_INTERVAL, "validate every this many iterations (0: only at the end)")
    val_split: str = arg("val", "split to validate on", advanced=True)
    keep_best: bool = arg(True, "evaluate the checkpoint of the best validation AUIR (else the latest)", advanced=True)
    val_max_sketches: int = arg(0, "validate on at most this many sketches (0: all)", advanced=True)
    force: bool = arg(False, "write into --run-dir even if it holds other files (never over the inputs)")

    def check(self) -> None:
        """Refuse values no run can train with, before anything is built or allocated (ConfigError naming
        the option): flags, config files, and the config of a run.json read back alike."""
        problems = [f"--{name.replace('_', '-')} must be {rule}, got {value!r}" for name, rule, value in _range_problems(self)]
        if problems:
            raise ConfigError("; ".join(problems))


# Upper bounds against absurd values (a run.json saying n_heads 1e12 asks for petabytes): far above any
# setting that trains on one machine or a cluster, far below what fails to allocate.
MAX_HEADS, MAX_GLIMPSES, MAX_GRID, MAX_IMAGE_SIZE = 1024, 256, 64, 512


def _range_problems(cfg: TrainConfig) -> list[tuple[str, str, Any]]:
    """(field, rule, value) of every field of `cfg` outside its range."""
    def finite(v, low=-math.inf, high=math.inf, low_open=False):
        return isinstance(v, (int, float)) and math.isfinite(v) and (v > low if low_open else v >= low) and v <= high

    def whole(v, low, high=math.inf):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    rules = [
        ("iterations", "an integer >= 1", whole(cfg.iterations, 1)),
        ("time_budget_s", "a number >= 0 (0: no limit)", finite(cfg.time_budget_s, 0)),
        ("num_env_runners", "an integer >= 0", whole(cfg.num_env_runners, 0)),
        ("num_envs_per_env_runner", "an integer >= 1", whole(cfg.num_envs_per_env_runner, 1)),
        ("episodes_per_batch", "an integer >= 1", whole(cfg.episodes_per_batch, 1)),
        ("num_learners", "an integer >= 0", whole(cfg.num_learners, 0)),
        ("num_gpus_per_learner", "a number >= 0", finite(cfg.num_gpus_per_learner, 0)),
        ("num_threads", "an integer >= 1", whole(cfg.num_threads, 1)),
        ("n_glimpses", f"unset or an integer in [1, {MAX_GLIMPSES}]", cfg.n_glimpses is None or whole(cfg.n_glimpses, 1, MAX_GLIMPSES)),
        ("glimpse_image_size", f"an integer in [8, {MAX_IMAGE_SIZE}]", whole(cfg.glimpse_image_size, 8, MAX_IMAGE_SIZE)),
        ("glimpse_size", "an integer in [1, --glimpse-image-size]",
         whole(cfg.glimpse_size, 1, cfg.glimpse_image_size if whole(cfg.glimpse_image_size, 8, MAX_IMAGE_SIZE) else 1)),
        ("num_epochs", "an integer >= 1", whole(cfg.num_epochs, 1)),
        ("minibatch_episodes", "an integer >= 0 (0: the whole batch)", whole(cfg.minibatch_episodes, 0)),
        ("lr", "a number > 0", finite(cfg.lr, 0, low_open=True)),
        ("gamma", "unset or a number in [0, 1]", cfg.gamma is None or finite(cfg.gamma, 0, 1)),
        ("rl_weight", "a number >= 0", finite(cfg.rl_weight, 0)),
        ("sup_lambda", "a number >= 0", finite(cfg.sup_lambda, 0)),
        ("sup_temperature", "a number > 0", finite(cfg.sup_temperature, 0, low_open=True)),
        ("dropout", "a number in [0, 1)", finite(cfg.dropout, 0, 1) and cfg.dropout < 1),
        ("n_heads", f"an integer in [1, {MAX_HEADS}]", whole(cfg.n_heads, 1, MAX_HEADS)),
        ("bootstrap_p", "a number in (0, 1]", finite(cfg.bootstrap_p, 0, 1, low_open=True)),
        ("grid", f"an integer in [1, {MAX_GRID}]", whole(cfg.grid, 1, MAX_GRID)),
        ("std_start", "a number > 0", finite(cfg.std_start, 0, low_open=True)),
        ("std_end", "a number > 0", finite(cfg.std_end, 0, low_open=True)),
        ("std_horizon", "an integer >= 1", whole(cfg.std_horizon, 1)),
        ("warm_start_updates", "an integer >= 0", whole(cfg.warm_start_updates, 0)),
        ("warm_start_noise_copies", "an integer >= 0", whole(cfg.warm_start_noise_copies, 0)),
        ("warm_start_noise_strokes", "an integer >= 0", whole(cfg.warm_start_noise_strokes, 0)),
        ("val_interval", "an integer >= 0 (0: only at the end)", whole(cfg.val_interval, 0)),
        ("val_max_sketches", "an integer >= 0 (0: all)", whole(cfg.val_max_sketches, 0)),
    ]
    return [(name, rule, getattr(cfg, name)) for name, rule, ok in rules if not ok]


def env_config_of(cfg: TrainConfig, split: str = "train") -> dict:
    """The environment options of a training run (`sketch_env.env.EnvConfig` names): what it trains in,
    and what evaluating it must rebuild."""
    return {
        "data": str(Path(cfg.data).resolve()),
        "embedding": str(Path(cfg.embedding).resolve()),
        "split": split,
        "n_glimpses": cfg.n_glimpses,
        "reward": cfg.reward,
        "image_size": cfg.glimpse_image_size,
        "glimpse_size": cfg.glimpse_size,
        "snap_to_ink": cfg.snap_to_ink,
        "match": cfg.match,
        "local_weight": cfg.local_weight,
    }


def with_algo_defaults(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the model's defaults for the fields left at None, and darp-no-exploration's preset."""
    if cfg.algo not in ALGOS:
        raise ValueError(f"unknown model {cfg.algo!r}; choose from {ALGOS}")
    if cfg.warm_start_updates and cfg.algo in ("vanilla-pg", "ppo"):
        raise ValueError(f"--warm-start-updates trains DARP's networks; {cfg.algo} has none (use darp, its ablations or bdqn)")
    values = {}
    if cfg.n_glimpses is None:
        values["n_glimpses"] = N_GLIMPSES if cfg.algo in GLIMPSING else 1
    if cfg.gamma is None:
        values["gamma"] = 0.0 if cfg.algo in ("vanilla-pg", "ppo") else 0.99
    if cfg.locator_return is None:
        values["locator_return"] = "level" if cfg.match == "local" else "episode"
    if cfg.match != "global" and cfg.algo in ("vanilla-pg", "ppo"):
        raise ValueError(f"--match {cfg.match} ranks with local descriptors the policy observes; {cfg.algo} reads the "
                         "phase-1 features only (use darp, its ablations or bdqn)")
    if cfg.locator_head == "cells" and (cfg.algo != "darp" or cfg.match != "local"):
        raise ValueError(f"--locator-head cells is darp's locator over the local grid's cells: it needs --algo darp and "
                         f"--match local (got --algo {cfg.algo} --match {cfg.match})")
    if cfg.algo == "darp-no-exploration":
        values.update(n_heads=1, bootstrap_p=1.0, std_start=NO_EXPLORATION_STD, std_end=NO_EXPLORATION_STD)
    return dataclasses.replace(cfg, **values)


def _algorithm_config(cfg: TrainConfig):
    """The algorithm's config class with its training settings: SketchPPOConfig for ppo, else DARPConfig
    with the model's RLModule and Learner classes."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    if cfg.algo == "ppo":
        from policies.baselines.ppo import SketchPPOConfig

        return SketchPPOConfig().training(
            train_batch_size_per_learner=cfg.episodes_per_batch * N_LEVELS * cfg.n_glimpses // max(1, cfg.num_learners),
            lr=cfg.lr,
            gamma=cfg.gamma,
        )
    from policies.darp.algorithm import DARPConfig

    config = DARPConfig().training(
        num_episodes_per_train_batch=cfg.episodes_per_batch,
        num_epochs=cfg.num_epochs,
        minibatch_size=cfg.minibatch_episodes * N_LEVELS * cfg.n_glimpses // max(1, cfg.num_learners) or None,
        lr=cfg.lr,
        gamma=cfg.gamma,
        rl_weight=cfg.rl_weight,
        advantage_norm=cfg.advantage_norm,
        locator_return=cfg.locator_return,
        sup_lambda=cfg.sup_lambda,
        sup_target=cfg.sup_target,
        sup_loss=cfg.sup_loss,
        sup_temperature=cfg.sup_temperature,
        std_start=cfg.std_start,
        std_end=cfg.std_end,
        std_shape=cfg.std_shape,
        std_horizon=cfg.std_horizon,
    )
    if cfg.algo == "darp-no-attention":
        from policies.baselines.feature_policies import NoAttentionModule, SupervisedLearner

        module_class, learner_class = NoAttentionModule, SupervisedLearner
    elif cfg.algo == "vanilla-pg":
        from policies.baselines.feature_policies import ReinforceLearner, SketchPolicyModule

        module_class, learner_class = SketchPolicyModule, ReinforceLearner
    elif cfg.algo == "bdqn":
        from policies.baselines.bdqn import BDQNLearner, BDQNModule

        module_class, learner_class = BDQNModule, BDQNLearner
    elif cfg.locator_head == "cells":
        from policies.darp.cell_locator import CellLocatorModule
        from policies.darp.learner import DARPLearner

        module_class, learner_class = CellLocatorModule, DARPLearner
    else:
        return config
    return config.rl_module(rl_module_spec=RLModuleSpec(module_class=module_class)).learners(learner_class=learner_class)


def model_config_of(cfg: TrainConfig) -> ModelConfig:
    """The RLModule settings of a training run (its std: where the schedule starts)."""
    keys = {f.name for f in dataclasses.fields(ModelConfig)} & {f.name for f in dataclasses.fields(TrainConfig)}
    return ModelConfig(std=cfg.std_start, **{k: getattr(cfg, k) for k in keys})


def build_algo_config(cfg: TrainConfig):
    """The RLlib AlgorithmConfig for `cfg` (the model's defaults applied first)."""
    from policies.darp.algorithm import register_darp_env

    register_darp_env()
    cfg = with_algo_defaults(cfg)
    return (
        _algorithm_config(cfg)
        .environment(env_config=env_config_of(cfg))
        .env_runners(
            num_env_runners=cfg.num_env_runners,
            num_envs_per_env_runner=cfg.num_envs_per_env_runner,
            gym_env_vectorize_mode="vector_entry_point",
        )
        .learners(num_learners=cfg.num_learners, num_gpus_per_learner=cfg.num_gpus_per_learner)
        .evaluation(evaluation_interval=cfg.val_interval, val_split=cfg.val_split, val_max_sketches=cfg.val_max_sketches)
        .rl_module(
            model_config=dataclasses.asdict(model_config_of(cfg))
        )
        .debugging(seed=cfg.seed)
        .reporting(metrics_num_episodes_for_smoothing=cfg.episodes_per_batch)
    )


__all__ = ["ALGOS", "DISPLAY", "GLIMPSING", "MODELS", "NO_EXPLORATION_STD", "Algo", "Model", "TrainConfig",
           "build_algo_config", "env_config_of", "with_algo_defaults"]
