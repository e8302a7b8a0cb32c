"""`darp train`: phase 2, DARP (or a baseline) with RLlib, checkpointed and resumable.

    darp train --data runs/demo/data --embedding runs/demo/phase1 --run-dir runs/demo/darp

Writes under --run-dir: checkpoint/ (RLlib, replaced atomically after every save), results.jsonl
(one line per iteration), run.json (what was trained, from what, and the final validation figures).
`--resume` (default) continues from checkpoint/ if it exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from sketch_env.atomic import OutputKind, atomic_write_json, prepare_output_dir
from sketch_env.render import N_LEVELS
from tune_runs.cli import arg

Algo = Literal["darp", "darp-no-exploration", "darp-no-attention", "vanilla-pg", "ppo", "bdqn"]
ALGOS = get_args(Algo)
GLIMPSING = ("darp", "darp-no-exploration", "bdqn")  # the models that choose where to look
NO_EXPLORATION_STD = 0.05


@dataclass
class TrainConfig:
    """Train DARP on RLlib over the sketch-retrieval environment."""

    data: str = arg(help="data set directory (darp data generate / import-qmul)")
    embedding: str = arg(help="phase-1 run directory (darp pretrain) with embeddings/")
    run_dir: str = arg(help="output directory for checkpoints and results")
    algo: Algo = arg(
        "darp",
        "model: darp; darp-no-exploration (one head, fixed std 0.05); darp-no-attention (core RNN over the partial "
        "sketch's features, supervised only); vanilla-pg (REINFORCE on the sketch features); ppo (RLlib's PPO on "
        "the sketch features); bdqn (bootstrapped DQN locator over a grid)",
    )
    iterations: int = arg(40, "training iterations (each: one batch of complete episodes + one update)")
    time_budget_s: float = arg(0.0, "stop after this many seconds (0: no limit)")
    seed: int = arg(0, "random seed")
    resume: bool = arg(True, "continue from run-dir/checkpoint if it exists")
    # sampling and hardware
    num_env_runners: int = arg(0, "remote EnvRunners (0: sample in the driver)")
    num_envs_per_env_runner: int = arg(32, "vectorised envs per EnvRunner")
    episodes_per_batch: int = arg(64, "complete episodes per update (multiple of envs x runners and of learners)")
    num_learners: int = arg(0, "remote learners (0: learn in the driver; 2+: DDP)")
    num_gpus_per_learner: float = arg(0.0, "GPUs per learner (1 on a GPU cluster)")
    num_threads: int = arg(1, "torch CPU threads in this process; 1 suits per-step batches on few cores")
    # environment
    n_glimpses: int | None = arg(None, "glimpses per completion level (default: 12 for darp, darp-no-exploration, bdqn; 1 for the others)")
    reward: Literal["threshold", "best_rank", "rank_gain"] = arg("rank_gain", "reward variant (see sketch_env.rewards)")
    # loss and optimisation
    num_epochs: int = arg(4, "passes over each batch of episodes (more supervised steps per sampled batch)")
    minibatch_episodes: int = arg(16, "episodes per gradient step (0: the whole batch)")
    lr: float = arg(3e-4, "learning rate")
    gamma: float | None = arg(None, "discount of the returns-to-go (default: 0.99; 0 for vanilla-pg and ppo, whose query "
                                    "does not change what they see next: with rank_gain a return would cancel its effect)")
    rl_weight: float = arg(0.01, "weight of the policy-gradient term (authors' code: 0.01)")
    sup_lambda: float = arg(1.0, "weight of the supervised ||a - e_target||^2 term")
    sup_target: Literal["photo", "final_sketch"] = arg("photo", "e_target: the true photo's embedding or the complete sketch's")
    sup_loss: Literal["mse", "infonce"] = arg(
        "infonce", "supervised objective: infonce, cross-entropy of the target photo among the training gallery (needs "
        "--sup-target photo; beat mse on Chair-V2 validation), or mse, squared error to e_target (the paper)")
    sup_temperature: float = arg(0.2, "infonce temperature, relative to the gallery's mean squared pairwise distance")
    residual_query: bool = arg(True, "query = normalize(phase-1 embedding of the partial sketch + learned correction)")
    dropout: float = arg(0.3, "dropout on the core state before the action network, in updates only: the query "
                              "correction overfits the training photos without it (0.3 beat 0 on Chair-V2 validation)")
    # locator exploration
    n_heads: int = arg(6, "bootstrapped locator heads K")
    bootstrap_p: float = arg(0.5, "Bernoulli probability of each head's bootstrap mask")
    grid: int = arg(5, "bdqn: locations per side of the grid (grid x grid actions)")
    std_start: float = arg(0.3, "locator std at the start")
    std_end: float = arg(0.05, "locator std at the end of the schedule")
    std_shape: Literal["linear", "exponential", "cosine"] = arg("exponential", "shape of the std decay")
    std_horizon: int = arg(200_000, "env steps over which the std decays")
    # networks
    cell: Literal["gru", "lstm"] = arg("gru", "core RNN cell")
    h0_init: Literal["sketch", "zeros"] = arg("sketch", "initialise h0 from the first partial sketch's embedding, or zeros")
    use_sketch_embedding: bool = arg(True, "feed the phase-1 embedding of the current partial sketch at every step")
    eval_heads: Literal["mean", "first"] = arg("mean", "deterministic location: mean of all heads or head 0")
    # validation
    val_interval: int = arg(5, "validate every this many iterations (0: only at the end)")
    val_split: str = arg("val", "split to validate on")
    keep_best: bool = arg(True, "keep the checkpoint of the best validation AUIR (RUN/best_checkpoint); evaluation uses it")
    val_max_sketches: int = arg(0, "validate on at most this many sketches (0: all)")
    force: bool = arg(False, "write into --run-dir even if it holds something other than an RL run")


def env_config_of(cfg: TrainConfig, split: str = "train") -> dict:
    return {
        "data": str(Path(cfg.data).resolve()),
        "embedding": str(Path(cfg.embedding).resolve()),
        "split": split,
        "n_glimpses": cfg.n_glimpses,
        "reward": cfg.reward,
    }


def with_algo_defaults(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the model's defaults for the fields left at None, and darp-no-exploration's preset."""
    values = {}
    if cfg.n_glimpses is None:
        values["n_glimpses"] = 12 if cfg.algo in GLIMPSING else 1
    if cfg.gamma is None:
        values["gamma"] = 0.0 if cfg.algo in ("vanilla-pg", "ppo") else 0.99
    if cfg.algo == "darp-no-exploration":
        values.update(n_heads=1, bootstrap_p=1.0, std_start=NO_EXPLORATION_STD, std_end=NO_EXPLORATION_STD)
    return dataclasses.replace(cfg, **values)


def _algorithm_config(cfg: TrainConfig):
    """The algorithm's config class with its training settings: SketchPPOConfig for ppo, else DARPConfig
    with the model's RLModule and Learner classes."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    if cfg.algo == "ppo":
        from policies.ppo_baseline import SketchPPOConfig

        return SketchPPOConfig().training(
            train_batch_size_per_learner=cfg.episodes_per_batch * N_LEVELS * cfg.n_glimpses // max(1, cfg.num_learners),
            lr=cfg.lr,
            gamma=cfg.gamma,
        )
    from policies.darp import DARPConfig

    config = DARPConfig().training(
        num_episodes_per_train_batch=cfg.episodes_per_batch,
        num_epochs=cfg.num_epochs,
        minibatch_size=cfg.minibatch_episodes * N_LEVELS * cfg.n_glimpses // max(1, cfg.num_learners) or None,
        lr=cfg.lr,
        gamma=cfg.gamma,
        rl_weight=cfg.rl_weight,
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
        from policies.baselines import NoAttentionModule, SupervisedLearner

        module_class, learner_class = NoAttentionModule, SupervisedLearner
    elif cfg.algo == "vanilla-pg":
        from policies.baselines import ReinforceLearner, SketchPolicyModule

        module_class, learner_class = SketchPolicyModule, ReinforceLearner
    elif cfg.algo == "bdqn":
        from policies.bdqn import BDQNLearner, BDQNModule

        module_class, learner_class = BDQNModule, BDQNLearner
    else:
        return config
    return config.rl_module(rl_module_spec=RLModuleSpec(module_class=module_class)).learners(learner_class=learner_class)


def build_algo_config(cfg: TrainConfig):
    """The RLlib AlgorithmConfig for `cfg` (used by train, sweep and report)."""
    from policies.darp import register_darp_env

    register_darp_env()
    cfg = with_algo_defaults(cfg)
    config = (
        _algorithm_config(cfg)
        .environment(env_config=env_config_of(cfg))
        .env_runners(
            num_env_runners=cfg.num_env_runners,
            num_envs_per_env_runner=cfg.num_envs_per_env_runner,
            gym_env_vectorize_mode="vector_entry_point",
        )
        .learners(num_learners=cfg.num_learners, num_gpus_per_learner=cfg.num_gpus_per_learner)
        .training(val_interval=cfg.val_interval, val_split=cfg.val_split, val_max_sketches=cfg.val_max_sketches)
        .rl_module(
            model_config={
                "n_heads": cfg.n_heads,
                "bootstrap_p": cfg.bootstrap_p,
                "grid": cfg.grid,
                "std": cfg.std_start,
                "cell": cfg.cell,
                "h0_init": cfg.h0_init,
                "use_sketch_embedding": cfg.use_sketch_embedding,
                "eval_heads": cfg.eval_heads,
                "residual_query": cfg.residual_query,
                "dropout": cfg.dropout,
            }
        )
        .debugging(seed=cfg.seed)
        .reporting(metrics_num_episodes_for_smoothing=cfg.episodes_per_batch)
    )
    return config


def _save_checkpoint(algo, run_dir: Path, name: str = "checkpoint") -> Path:
    """Save to a temp dir, then swap it in, so a kill never leaves a half-written checkpoint."""
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    algo.save_to_path(str(tmp.resolve()))
    old = run_dir / f".{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _line(it: int, result: dict, elapsed: float, steps_per_s: float) -> str:
    learner = result.get("learners", {}).get("default_policy", {})
    runners = result.get("env_runners", {})
    val = result.get("validation", {})
    parts = [
        f"iter {it:4d}",
        f"{elapsed:6.0f}s",
        f"{steps_per_s:7.0f} steps/s",
        f"return {runners.get('episode_return_mean', float('nan')):7.2f}",
        f"sup {learner.get('supervised_loss', float('nan')):.4f}",
        f"std {learner.get('locator_std', float('nan')):.3f}",
    ]
    if val:
        parts.append(f"val AUIR {val.get('auir', float('nan')):6.2f} acc@5 {val.get('acc@5', float('nan')):5.1f}")
    return " | ".join(parts)


def _jsonable(result: dict) -> dict:
    keep = ("training_iteration", "time_total_s", "num_env_steps_sampled_lifetime")
    out = {k: result.get(k) for k in keep}
    out["env_runners"] = {k: v for k, v in result.get("env_runners", {}).items() if isinstance(v, (int, float))}
    out["learner"] = {
        k: v for k, v in result.get("learners", {}).get("default_policy", {}).items() if isinstance(v, (int, float))
    }
    out["validation"] = result.get("validation", {})
    return out


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Train, checkpoint, validate at the end; returns the validation metrics of the kept model."""
    import ray

    if cfg.algo not in ALGOS:
        raise SystemExit(f"darp train: unknown --algo {cfg.algo!r}; choose from {ALGOS}")
    cfg = with_algo_defaults(cfg)
    import torch

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    config = build_algo_config(cfg)
    algo = config.build_algo()
    if cfg.resume and (run_dir / "checkpoint").exists():
        algo.restore_from_path(str((run_dir / "checkpoint").resolve()))
        if not quiet:
            print(f"resumed from {run_dir / 'checkpoint'} at iteration {algo.iteration}")
    start = time.time()
    results_path = run_dir / "results.jsonl"
    best_path = run_dir / "best.json"
    best = json.loads(best_path.read_text()) if cfg.resume and best_path.is_file() else {"auir": -1.0}
    last_steps = None
    val = {}

    def keep_if_best(metrics: dict) -> None:
        """Early stopping by selection: the checkpoint with the best validation AUIR is kept apart."""
        nonlocal best
        if cfg.keep_best and metrics.get("auir", -1.0) > best["auir"]:
            _save_checkpoint(algo, run_dir, "best_checkpoint")
            best = {"auir": metrics["auir"], "iteration": int(algo.iteration), "metrics": metrics}
            atomic_write_json(best_path, best)
    try:
        if cfg.keep_best and algo.iteration == 0:
            keep_if_best(algo.validate_policy())  # the untrained policy is a candidate too
        while algo.iteration < cfg.iterations:
            t0 = time.time()
            result = algo.train()
            steps = result.get("num_env_steps_sampled_lifetime") or result.get("env_runners", {}).get(
                "num_env_steps_sampled_lifetime", 0
            )
            dt = time.time() - t0
            sps = (steps - last_steps) / dt if last_steps is not None else cfg.episodes_per_batch * config.episode_length() / dt
            last_steps = steps
            fresh = bool(cfg.val_interval) and algo.iteration % cfg.val_interval == 0
            if not fresh:
                result.pop("validation", None)
            val = result.get("validation", val)
            with open(results_path, "a") as f:
                f.write(json.dumps(_jsonable(result), default=float) + "\n")
            if not quiet:
                print(_line(algo.iteration, result, time.time() - start, sps), flush=True)
            _save_checkpoint(algo, run_dir)
            if fresh:
                keep_if_best(val)
            if cfg.time_budget_s and time.time() - start > cfg.time_budget_s:
                if not quiet:
                    print(f"time budget of {cfg.time_budget_s:.0f}s reached")
                break
        val = algo.validate_policy()
        _save_checkpoint(algo, run_dir)
        keep_if_best(val)
        if cfg.keep_best:
            val = best["metrics"]
    finally:
        algo.stop()
    atomic_write_json(
        run_dir / "run.json",
        {
            "kind": cfg.algo,
            "config": dataclasses.asdict(cfg),
            "data": str(Path(cfg.data).resolve()),
            "embedding": str(Path(cfg.embedding).resolve()),
            "iterations": cfg.iterations,
            "train_seconds": time.time() - start,
            "val_metrics": val,
            "best_iteration": best.get("iteration"),
        },
    )
    if not quiet:
        print(f"validation ({cfg.val_split}): AUIR {val.get('auir', float('nan')):.2f}  acc@1 {val.get('acc@1', float('nan')):.1f}  "
              f"acc@5 {val.get('acc@5', float('nan')):.1f}  acc@10 {val.get('acc@10', float('nan')):.1f}  m@A {val.get('m_at_a', float('nan')):.2f}")
    return val


RUN_KIND = OutputKind("RL run", ("run.json", "checkpoint", "best_checkpoint", "results.jsonl"))


def run(cfg: TrainConfig) -> int:
    prepare_output_dir(cfg.run_dir, RUN_KIND, inputs=(cfg.data, cfg.embedding), force=cfg.force)
    train(cfg)
    return 0
