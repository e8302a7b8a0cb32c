"""The engine of `darp sweep` (tune_runs/sweep.py: what it searches, writes and resumes).

`run_sweep` checks the options (`check_config`), builds the Tuner (`make_tuner`: `param_space` over the searched
parameters, ASHA on METRIC, the default point first) or restores the killed sweep's, and turns the results into
best_config.json, trials.csv (`trial_rows`, `with_auir_at_default_iterations`) and sweep.png (`plot_sweep`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from policies.running.fit import TrainTrial, check_inputs
from policies.running.ray_session import ray_session
from policies.running.registry import TrainConfig
from policies.darp.schedules import STD_SHAPES
from sketch_env.atomic import (OutputKind, atomic_write, atomic_write_json, atomic_write_text, check_output_dir,
                                prepare_output_dir)
from sketch_env.errors import ConfigError, DataError, RunStopped
from sketch_env.options import arg

METRIC = "evaluation/auir"
EXPERIMENT = "tune"
STD_PARAMS = ("std_start", "std_end", "std_shape", "std_horizon")
EXPLORATION_PARAMS = ("bootstrap_p", "n_heads")


@dataclass
class SweepConfig:
    """Ray Tune search over DARP's std schedule (ASHA on validation AUIR)."""

    train: TrainConfig = arg(
        help="what every trial trains with: darp train's options (--run-dir: the sweep's directory; rerun with the "
             "same one to resume a killed sweep; --iterations: of a trial that ASHA does not stop; --seed: of every "
             "trial and of the search's draws; the std options: the default trial's schedule)",
        hide=("algo", "resume", "time_budget_s", "val_interval", "keep_best"))
    samples: int = arg(16, "trials (the first runs the default schedule when --include-default)")
    grace_period: int = arg(5, "iterations every trial runs before ASHA may stop it")
    max_concurrent: int = arg(1, "trials running at once (1 on 2 cores; one per GPU on a cluster)")
    include_default: bool = arg(True, "run the given schedule (--std-start etc.) as one of the trials")
    storage: str = arg("", "where Tune keeps trials and checkpoints on a multi-node cluster: a URI (s3://bucket/sweeps) "
                           "or a path all nodes share; the experiment is STORAGE/<name of run-dir>; empty: RUN_DIR/tune")
    # the search space
    std_start_range: tuple[float, float] = arg((0.1, 0.6), "log-uniform range of the starting std")
    std_end_range: tuple[float, float] = arg((0.01, 0.1), "log-uniform range of the final std")
    std_shapes: tuple[str, ...] = arg(STD_SHAPES, "decay shapes to choose from")
    std_horizon_range: tuple[int, int] = arg((20_000, 500_000), "log-uniform range of the decay horizon (env steps)")
    search_exploration: bool = arg(False, "also search bootstrap_p and the number of heads K")
    bootstrap_p_range: tuple[float, float] = arg((0.3, 1.0), "uniform range of bootstrap_p (with --search-exploration)")
    n_heads_choices: tuple[int, ...] = arg((1, 3, 6, 10), "values of K to choose from (with --search-exploration)")


def trial_train_config(cfg: SweepConfig, **searched) -> TrainConfig:
    """The TrainConfig a trial runs (DARP, validated every iteration); `searched` holds its values of
    the searched parameters. Its run_dir, RUN_DIR/best, is where `darp train --config best_config.json` trains."""
    return dataclasses.replace(
        cfg.train,
        data=str(Path(cfg.train.data).resolve()),
        embedding=str(Path(cfg.train.embedding).resolve()),
        run_dir=str(Path(cfg.train.run_dir).resolve() / "best"),
        algo="darp",
        val_interval=1,
        **searched,
    )


def searched_params(cfg: SweepConfig) -> tuple[str, ...]:
    return STD_PARAMS + (EXPLORATION_PARAMS if cfg.search_exploration else ())


def check_config(cfg: SweepConfig) -> None:
    """Fail before starting Ray on options no trial could run with (ConfigError naming the option) or inputs
    no trial could read (DataError)."""
    for name in ("data", "embedding"):
        if not Path(getattr(cfg.train, name)).is_dir():
            raise DataError(f"--{name} {getattr(cfg.train, name)} is not a directory")
    for name in ("std_start_range", "std_end_range", "std_horizon_range", "bootstrap_p_range"):
        values = getattr(cfg, name)
        if len(values) != 2 or not 0 < values[0] < values[1]:
            raise ConfigError(f"--{name.replace('_', '-')} needs two values 0 < low < high, got {list(values)}")
    unknown = sorted(set(cfg.std_shapes) - set(STD_SHAPES))
    if unknown or not cfg.std_shapes:
        raise ConfigError(f"--std-shapes must be among {STD_SHAPES}, got {list(cfg.std_shapes)}")
    if not 1 <= cfg.grace_period <= cfg.train.iterations:
        raise ConfigError(f"need 1 <= --grace-period <= --iterations, got {cfg.grace_period}, {cfg.train.iterations}")
    if cfg.samples < 1 or cfg.max_concurrent < 1:
        raise ConfigError(f"--samples and --max-concurrent must be >= 1, got {cfg.samples}, {cfg.max_concurrent}")
    if not cfg.n_heads_choices or min(cfg.n_heads_choices) < 1:
        raise ConfigError(f"--n-heads-choices must be >= 1, got {list(cfg.n_heads_choices)}")
    trial = trial_train_config(cfg)
    trial.check()
    check_inputs(trial)  # what every trial's actors would find out (a stale export names its sketch)


def param_space(cfg: SweepConfig) -> dict:
    """A trial's TrainTrial config with Tune search spaces on the searched parameters."""
    space = dataclasses.asdict(trial_train_config(cfg)) | {
        "std_start": tune.loguniform(*cfg.std_start_range),
        "std_end": tune.loguniform(*cfg.std_end_range),
        "std_shape": tune.choice(list(cfg.std_shapes)),
        "std_horizon": tune.lograndint(cfg.std_horizon_range[0], cfg.std_horizon_range[1] + 1),
    }
    if cfg.search_exploration:
        space |= {"bootstrap_p": tune.uniform(*cfg.bootstrap_p_range), "n_heads": tune.choice(list(cfg.n_heads_choices))}
    return {"train": space}


def default_values(cfg: SweepConfig) -> dict:
    """The given (by default TrainConfig's) values of the searched parameters."""
    return {name: getattr(cfg.train, name) for name in searched_params(cfg)}


def default_point(cfg: SweepConfig) -> dict:
    """The given schedule as a Tune point (keys as in param_space)."""
    return {"train": default_values(cfg)}


def experiment_location(cfg: SweepConfig) -> tuple[str, str]:
    """(storage_path, name) of the Tune experiment: RUN_DIR/tune, or STORAGE/<name of run-dir>."""
    if cfg.storage:
        return cfg.storage.rstrip("/"), Path(cfg.train.run_dir).resolve().name
    return str(Path(cfg.train.run_dir).resolve()), EXPERIMENT


def trial_params(config: dict) -> dict:
    """The schedule and exploration parameters (searched or not) from a trial's resolved config."""
    return {name: config["train"][name] for name in STD_PARAMS + EXPLORATION_PARAMS}


class ProgressLine(tune.Callback):
    """One line per trial result: trial, iteration, validation AUIR, its schedule."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        auir = result.get("evaluation", {}).get("auir", float("nan"))
        c = trial.config["train"]
        print(
            f"{trial.trial_id} iter {result['training_iteration']:3d} | val AUIR {auir:6.2f} | std {c['std_start']:.3f}"
            f" -> {c['std_end']:.3f} {c['std_shape']} over {c['std_horizon']} steps",
            flush=True,
        )


def make_tuner(cfg: SweepConfig) -> tune.Tuner:
    """A new Tuner, or the restored one when a previous run of this sweep left its experiment behind."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    storage, name = experiment_location(cfg)
    path = f"{storage}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"resuming the sweep in {path} (its search space and budget apply)", flush=True)
        return tune.Tuner.restore(path, trainable=TrainTrial, resume_errored=True)
    return tune.Tuner(
        TrainTrial,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=cfg.samples,
            scheduler=ASHAScheduler(max_t=cfg.train.iterations, grace_period=cfg.grace_period),
            search_alg=BasicVariantGenerator(
                points_to_evaluate=[default_point(cfg)] if cfg.include_default else None,
                max_concurrent=cfg.max_concurrent,
                random_state=cfg.train.seed,
            ),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            stop={"training_iteration": cfg.train.iterations},
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_frequency=1, checkpoint_at_end=True),
            callbacks=[ProgressLine()],
            verbose=0,
        ),
    )


def trial_rows(results, default: dict) -> list[dict]:
    """One row per trial: its parameters, status, iterations, final and best validation AUIR."""
    rows = []
    for result in results:
        params = trial_params(result.config)
        history = result.metrics_dataframe
        auirs = history[METRIC].dropna() if history is not None and METRIC in history else []
        by_iteration = (
            dict(zip(history.loc[auirs.index, "training_iteration"].astype(int), auirs.astype(float)))
            if len(auirs) else {}
        )
        rows.append({
            "trial": result.metrics.get("trial_id", Path(result.path).name),
            "status": "error" if result.error else "ok",
            "default": all(params[k] == v for k, v in default.items()),
            **params,
            "iterations": int(result.metrics.get("training_iteration", 0)),
            "final_auir": float(auirs.iloc[-1]) if len(auirs) else math.nan,
            "best_auir": float(auirs.max()) if len(auirs) else math.nan,
            "_auir_by_iteration": by_iteration,
        })
    return sorted(rows, key=lambda r: -r["final_auir"] if not math.isnan(r["final_auir"]) else math.inf)


def with_auir_at_default_iterations(rows: list[dict]) -> list[dict]:
    """Add `auir_at_default_iters`: each trial's AUIR at the last iteration the default trial ran.

    Why: ASHA may stop the default schedule at an early rung while the best trial runs on; comparing
    their final AUIRs would credit the search with the extra training. This column compares them at
    equal training (NaN for trials stopped before that iteration).
    """
    defaults = [r for r in rows if r["default"] and r["_auir_by_iteration"]]
    at = max(defaults[0]["_auir_by_iteration"]) if defaults else None
    for row in rows:
        row["auir_at_default_iters"] = row["_auir_by_iteration"].get(at, math.nan) if at else math.nan
    return rows


def write_table(rows: list[dict], path: Path) -> Path:
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, out.getvalue())


def plot_sweep(rows: list[dict], params: tuple[str, ...], out: Path) -> Path:
    """Final validation AUIR against each searched parameter (scatter subplots): best in red, default ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not math.isnan(r["final_auir"])]
    fig, axes = plt.subplots(1, len(params), figsize=(3.2 * len(params), 3), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], params):
        values = [r[name] for r in rows]
        if isinstance(values[0], str):
            labels = sorted(set(values))
            ax.set_xticks(range(len(labels)), labels)
            values = [labels.index(v) for v in values]
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.scatter(values, [r["final_auir"] for r in rows], c=["tab:red"] + ["tab:blue"] * (len(rows) - 1), s=24,
                   edgecolors=["black" if r["default"] else "none" for r in rows], linewidths=1.5)
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation AUIR (final)")
    fig.suptitle("std schedule sweep (best trial in red, default schedule ringed)")

    def save(p: Path):
        fig.savefig(p, dpi=110, bbox_inches="tight", format="png")

    atomic_write(out, save)
    plt.close(fig)
    return out


def write_outputs(cfg: SweepConfig, results) -> list[dict]:
    """best_config.json, trials.csv and sweep.png under run_dir; returns the table's rows, best first."""
    run_dir = Path(cfg.train.run_dir)
    rows = with_auir_at_default_iterations(trial_rows(results, default_values(cfg)))
    if math.isnan(rows[0]["final_auir"]):
        raise RunStopped(f"no trial reported {METRIC}; see the errors under {'/'.join(experiment_location(cfg))}")
    best = {k: rows[0][k] for k in searched_params(cfg)}
    atomic_write_json(run_dir / "best_config.json", dataclasses.asdict(trial_train_config(cfg, **best)))
    write_table(rows, run_dir / "trials.csv")
    plot_sweep(rows, searched_params(cfg), run_dir / "sweep.png")
    return rows


SWEEP_KIND = OutputKind("sweep", ("best_config.json", "trials.csv", EXPERIMENT))


def run_sweep(cfg: SweepConfig) -> list[dict]:
    """Run (or resume) the sweep and write its outputs; returns the table's rows, best first."""
    check_output_dir(cfg.train.run_dir, SWEEP_KIND, inputs=(cfg.train.data, cfg.train.embedding), force=cfg.train.force)
    check_config(cfg)
    prepare_output_dir(cfg.train.run_dir, SWEEP_KIND, inputs=(cfg.train.data, cfg.train.embedding), force=cfg.train.force)
    # Checkpointing every iteration with num_to_keep=1 forces an experiment snapshot per result (what
    # makes a killed sweep resume where it was); Tune warns about that when iterations are short.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with ray_session():
        results = make_tuner(cfg).fit()
    rows = write_outputs(cfg, results)
    best = rows[0]
    print(f"{len(rows)} trials ({sum(r['status'] == 'error' for r in rows)} failed); table: {Path(cfg.train.run_dir) / 'trials.csv'}")
    print(f"best: AUIR {best['final_auir']:.2f} after {best['iterations']} iterations with "
          + ", ".join(f"{k}={best[k]}" for k in searched_params(cfg)))
    defaults = [r for r in rows if r["default"] and not math.isnan(r["final_auir"])]
    if defaults:
        default = defaults[0]
        print(f"gain over the default schedule: {best['final_auir'] - default['final_auir']:+.2f} AUIR "
              f"(default: {default['final_auir']:.2f} after {default['iterations']} iterations)")
        if best["iterations"] != default["iterations"] and not math.isnan(best["auir_at_default_iters"]):
            print(f"  at equal training ({default['iterations']} iterations): best {best['auir_at_default_iters']:.2f} "
                  f"vs default {default['final_auir']:.2f}, {best['auir_at_default_iters'] - default['final_auir']:+.2f} AUIR")
    print(f"train it: darp train --config {Path(cfg.train.run_dir) / 'best_config.json'}")
    return rows
