"""Training one model as one Ray Tune trial: `train(cfg)` runs `darp train` (and the training of
`darp report`, `darp sweep` and `darp demo`).

    from policies.running.fit import train
    from policies.running.registry import TrainConfig
    metrics = train(TrainConfig(data="runs/demo/data", embedding="runs/demo/phase1", run_dir="runs/demo/darp"))

Tune gives the run what RLlib and Tune users expect: result.json, progress.csv and TensorBoard
events per iteration (`tensorboard --logdir RUN`: return, losses, std, env steps/s, validation AUIR),
checkpoints kept by validation AUIR (CheckpointConfig: the best and the latest), and restore after a
crash (Tuner.restore). `TrainTrial` is the trainable: it builds the model's RLlib Algorithm from a
TrainConfig (policies.running.registry), steps it, and stops itself after `iterations` or `time_budget_s`,
validating that last iteration. The run directory's layout is policies.running.runs'.

Resuming (`resume`, the default) continues an unfinished run with the options it was started with
(different options are refused: Tune restores the stored ones); `resume=False` starts the run over.
Whatever a kill interrupted, the rerun restores the last checkpoint Tune recorded, cuts the results
logged after it (so no iteration is listed twice), and keeps time_total_s counting.

Before Ray starts, `check_inputs` checks what every actor would otherwise find out on its own (the
options, the data set, and that the phase-1 export matches its sketches and photos), so a bad input is
one line naming the file, sketch or option, and nothing is written. Errors are raised, never turned
into exit codes here: ConfigError / DataError for bad input, RunStopped for a run that failed
(run.json then says "failed") or was interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

from ray import tune

from policies.running import runs
from policies.running.ray_session import ray_session
from policies.running.registry import TrainConfig, build_algo_config, with_algo_defaults
from policies.darp.validation import ENV_STEPS_PER_S, VALIDATION_AUIR, fill_validation, validation_of
from sketch_env.atomic import check_output_dir, prepare_output_dir
from sketch_env.data import DataError
from sketch_env.errors import ConfigError, RunStopped

_printing = {"on": True}  # train(quiet=True) turns the per-iteration lines off (read by _Progress in the driver)


class TrainTrial(tune.Trainable):
    """One TrainConfig as a Tune trainable; config = {"train": TrainConfig's fields}."""

    def setup(self, config: dict) -> None:
        import torch

        self.cfg = TrainConfig(**config["train"])
        torch.set_num_threads(self.cfg.num_threads)
        self.algo = build_algo_config(self.cfg).build_algo()
        self._validation: dict = {}

    def step(self) -> dict:
        warm = self._warm_start() if self.iteration == 0 and self.cfg.warm_start_updates else {}
        result = self.algo.train()
        if warm:  # the warm start is training time: it counts in this iteration and in the budget
            result["time_this_iter_s"] += warm["warm_start_s"]
            result.update(warm)
        elapsed = self._time_total + result["time_this_iter_s"]
        last = result["training_iteration"] >= self.cfg.iterations or (
            bool(self.cfg.time_budget_s) and elapsed >= self.cfg.time_budget_s
        )
        if last and not validation_of(result):
            fill_validation(result, self.algo.evaluate())
        self._validation = validation_of(result)
        result["done"] = last
        return result

    def _warm_start(self) -> dict:
        """The supervised warm start (policies.darp.warm_start) of a fresh run; a restored run (iteration > 0) has its weights."""
        from policies.darp.warm_start import WarmStartConfig, warm_start_algo

        config = WarmStartConfig(updates=self.cfg.warm_start_updates, locator=self.cfg.warm_start_locator,
                                 episodes_per_update=self.cfg.minibatch_episodes or 16, lr=self.cfg.lr, seed=self.cfg.seed,
                                 noise_copies=self.cfg.warm_start_noise_copies,
                                 noise_strokes=self.cfg.warm_start_noise_strokes)
        return warm_start_algo(self.algo, config, self.cfg.val_split)

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self.algo.save_to_path(checkpoint_dir)
        runs.write_checkpoint_info(checkpoint_dir, self.algo.iteration, self._validation)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.algo.restore_from_path(checkpoint_dir)

    def cleanup(self) -> None:
        self.algo.stop()
        # The inner Algorithm, a Trainable outside Tune, made itself an empty log dir in ~/ray_results.
        with contextlib.suppress(OSError):
            os.rmdir(self.algo.logdir)

    @classmethod
    def default_resource_request(cls, config: dict):
        """The Algorithm's own request, except that the trial's process (and its local learner, if any)
        reserves no CPU when remote EnvRunners or learners are asked for: as when `darp train` ran the
        Algorithm in its driver, --num-env-runners 2 or --num-learners 2 fits a 2-core machine."""
        cfg = TrainConfig(**config["train"])
        algo_config = build_algo_config(cfg)
        if cfg.num_env_runners or cfg.num_learners:
            # RLlib places EnvRunners by bundle index after the head bundle, which must stay: a byte of
            # memory keeps it without holding a CPU.
            algo_config.resources(num_cpus_for_main_process=0, custom_resources_for_main_process={"memory": 1})
            if not cfg.num_learners and not cfg.num_gpus_per_learner:
                algo_config.learners(num_cpus_per_learner=0)
        return algo_config.algo_class.default_resource_request(algo_config)


def _trial_dirname(trial) -> str:
    return runs.TRIAL


def progress_line(result: dict) -> str:
    """One printed line per iteration: time, env steps/s, return, supervised loss, std, validation."""
    learner = result.get("learners", {}).get("default_policy", {})
    parts = [
        f"iter {result.get('training_iteration', 0):4d}",
        f"{result.get('time_total_s', math.nan):6.0f}s",
        f"{result.get(ENV_STEPS_PER_S, math.nan):7.0f} steps/s",
        f"return {result.get('env_runners', {}).get('episode_return_mean', math.nan):7.2f}",
        f"sup {learner.get('supervised_loss', math.nan):.4f}",
        f"std {learner.get('locator_std', math.nan):.3f}",
    ]
    val = validation_of(result)
    if val:
        parts.append(f"val AUIR {val['auir']:6.2f} acc@5 {val.get('acc@5', math.nan):5.1f}")
    return " | ".join(parts)


class _Progress(tune.Callback):
    """Prints one line per iteration and says where a resumed trial restarts; cuts the trial's logged
    results back to the checkpoint it restarts from (policies.running.runs.trim_results)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
        start = int(latest.metrics.get("training_iteration", 0)) if latest else 0
        for folder in {trial.path, trial.local_path}:  # the storage copy, and the driver's staging copy
            runs.trim_results(folder, start)
        if start and _printing["on"]:
            print(f"resumed from {latest.checkpoint.path} at iteration {start}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if _printing["on"]:
            print(progress_line(result), flush=True)


def checkpoint_config(cfg: TrainConfig) -> tune.CheckpointConfig:
    """Every iteration checkpointed (what a resume restarts from); kept: the latest, and with keep_best
    the best validation AUIR (VALIDATION_AUIR is NaN in iterations that did not validate: never best)."""
    best = dict(checkpoint_score_attribute=VALIDATION_AUIR, checkpoint_score_order="max") if cfg.keep_best else {}
    return tune.CheckpointConfig(num_to_keep=1, checkpoint_frequency=1, checkpoint_at_end=True, **best)


def _options_changed(before: dict, now: dict) -> list[str]:
    return [f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
            if k != "resume" and before.get(k) != now.get(k)]


def _damaged_states(experiment: Path) -> list[Path]:
    """Tune experiment-state files a kill cut short (Tune writes them in place)."""
    damaged = []
    for path in experiment.glob("experiment_state-*.json"):
        try:
            json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            damaged.append(path)
    return damaged


def _tuner(cfg: TrainConfig, run_dir: Path, record: dict) -> tune.Tuner:
    """Tuner.restore of the unfinished run in run_dir, or a new Tuner (the old experiment cleared)."""
    experiment = runs.experiment_dir(run_dir)
    if cfg.resume and experiment is not None:
        damaged = _damaged_states(experiment)
        for path in damaged:  # Tune then reads the state before it, if there is one
            path.rename(path.with_name(path.name + ".damaged"))
        if tune.Tuner.can_restore(str(experiment)):
            previous = runs.read_run(run_dir).get("config", {}) if (run_dir / runs.RUN_FILE).is_file() else {}
            changed = _options_changed(previous, record["config"])
            if changed:
                raise ConfigError(f"{run_dir} was started with other options ({'; '.join(changed)}); "
                                  "rerun with the same options to resume it, or --no-resume to start over")
            try:
                return tune.Tuner.restore(str(experiment), TrainTrial, resume_unfinished=True, resume_errored=True)
            except (ModuleNotFoundError, AttributeError) as e:  # its pickles name classes this version does not have
                raise DataError(f"cannot resume {run_dir}: its Tune state was saved by another version of this "
                                f"project ({e}); --no-resume starts the run over") from None
        if damaged or runs.checkpoints(run_dir):
            raise DataError(f"cannot resume {run_dir}: Tune's experiment state "
                            f"({damaged[0].name if damaged else 'missing'}) was cut short by a kill; "
                            "--no-resume starts the run over")
        if _printing["on"]:
            print(f"nothing to resume in {run_dir} (stopped before its first checkpoint): starting over", flush=True)
    for old in runs.experiment_dirs(run_dir):
        shutil.rmtree(old, ignore_errors=True)
    runs.write_run(run_dir, record)
    return tune.Tuner(
        TrainTrial,
        param_space={"train": record["config"]},
        tune_config=tune.TuneConfig(trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=runs.new_experiment_name(),
            storage_path=str(run_dir),
            checkpoint_config=checkpoint_config(cfg),
            callbacks=[_Progress()],
            verbose=0,
        ),
    )


def check_inputs(cfg: TrainConfig) -> None:
    """What every EnvRunner and learner would find out on its own, checked once before Ray starts:
    the RLlib config validates, the data set loads, and the phase-1 export holds unchanged embeddings of
    the sketches and photos of the training and validation splits (`sketch_env.embedding_export`: a sketch
    whose strokes changed since the export is named). ConfigError / DataError otherwise."""
    from sketch_env.data import load_dataset, select_split
    from sketch_env.embedding_export import gallery_for, load_embedding_export, sketch_embeddings_for

    try:
        build_algo_config(cfg).validate()
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    ds = load_dataset(cfg.data)
    export = load_embedding_export(cfg.embedding)
    for split in dict.fromkeys(("train", cfg.val_split)):
        part = select_split(ds, split)
        if len(part.sketches) == 0:
            raise DataError(f"{cfg.data}: the {split} split has no sketches")
        sketch_embeddings_for(export, part.sketches, cfg.embedding, cfg.data)
        gallery_for(export, part.photos, cfg.embedding, cfg.data)


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Train `cfg` as one Tune trial in cfg.run_dir (resuming it, see the module docstring).

    Returns the validation figures of the checkpoint evaluation uses (policies.running.runs.best_checkpoint)
    and writes run.json. ConfigError / DataError for bad options, inputs or run directory (nothing
    written); RunStopped with a one-line reason when the run failed (run.json: "failed") or was interrupted.
    """
    run_dir = Path(cfg.run_dir).resolve()
    # Tune runs the trial in a working directory of its own: relative paths are read from here
    cfg = dataclasses.replace(with_algo_defaults(cfg), data=str(Path(cfg.data).resolve()),
                              embedding=str(Path(cfg.embedding).resolve()), run_dir=str(run_dir))
    cfg.check()
    inputs = (cfg.data, cfg.embedding)
    check_output_dir(run_dir, runs.RL_RUN_KIND, inputs=inputs, force=cfg.force)
    check_inputs(cfg)
    prepare_output_dir(run_dir, runs.RL_RUN_KIND, inputs=inputs, force=cfg.force)
    record = {"kind": cfg.algo, "status": "running", "config": dataclasses.asdict(cfg),
              "data": cfg.data, "embedding": cfg.embedding}
    # Checkpointing every iteration with num_to_keep=1 makes Tune snapshot its state after every
    # checkpoint (so a resume restarts from the last one); Tune warns about that when iterations are short.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables: the lines of _Progress say it
    _printing["on"] = not quiet
    try:
        with ray_session():
            if not quiet:
                print(f"run directory {run_dir} (tensorboard --logdir {run_dir})", flush=True)
            grid = _tuner(cfg, run_dir, record).fit()
    finally:
        _printing["on"] = True
    if grid.errors:
        runs.write_run(run_dir, record | {"status": "failed"})
        raise RunStopped(f"the run failed: {grid.errors[0]}".splitlines()[0] + f" (details under {runs.trial_dir(run_dir)})")
    last = grid[0].metrics or {}  # Tune's record of the last result (its result.json copy may lag)
    if not last.get("done"):
        raise RunStopped(f"interrupted after iteration {last.get('training_iteration', 0)}; "
                         f"run the same command to resume {run_dir}")
    best = runs.best_checkpoint(run_dir, cfg.keep_best)
    val = best.validation
    runs.write_run(run_dir, record | {
        "status": "finished",
        "iterations": int(last["training_iteration"]),
        "train_seconds": float(last.get("time_total_s", math.nan)),
        "val_metrics": val,
        "best_iteration": best.iteration,
        "best_checkpoint": str(best.path.relative_to(run_dir)),
    })
    if not quiet:
        print(f"kept iteration {best.iteration} ({'best validation AUIR' if cfg.keep_best else 'latest'}); "
              f"validation ({cfg.val_split}): AUIR {val.get('auir', math.nan):.2f}  acc@1 {val.get('acc@1', math.nan):.1f}  "
              f"acc@5 {val.get('acc@5', math.nan):.1f}  acc@10 {val.get('acc@10', math.nan):.1f}  "
              f"m@A {val.get('m_at_a', math.nan):.2f}")
    return val


__all__ = ["TrainTrial", "check_inputs", "checkpoint_config", "progress_line", "train"]
