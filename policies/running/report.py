"""The engine of `darp report` (tune_runs/report.py: what it runs, writes and resumes).

`run_report` evaluates once the rows that train nothing (`evaluate_triplet`; in local or dense match the fixed
rules, `evaluate_rule_model`), runs one Ray Tune function trainable per (model, seed) (`run_trial`:
`train_and_evaluate`, done.json written last), then reads the finished trials back (`collect`) into
results.md (`results_markdown` and its tables), curves.png, glimpses.png and ranks.parquet. Every evaluation,
the stress tables' included, goes through `darp evaluate`'s engine (`policies.running.evaluate.evaluate_run`)
or `policies.running.trained.evaluate_policy_run`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray import tune

from policies.running import runs
from policies.running.ray_session import ray_session
from policies.running.registry import ALGOS, GLIMPSING, TrainConfig
from policies.running.registry import DISPLAY as RL_DISPLAY
from sketch_env.atomic import OutputKind, atomic_write, atomic_write_json, atomic_write_text, prepare_output_dir
from sketch_env.errors import ConfigError, DataError, RunStopped
from sketch_env.local_match import DENSE
from sketch_env.locators import LOCATORS
from sketch_env.options import arg

# The triplet network's queries in local match, glimpses by a fixed rule, and densely matched (--match local/dense only)
RULE_MODELS = tuple(f"triplet-local-{rule}" for rule in LOCATORS) + ("triplet-dense", "triplet-dense-ink")
ONCE = ("triplet",) + RULE_MODELS  # evaluated once, no training and no seeds
MODELS = ONCE + ALGOS  # the triplet network (phase 1), the fixed rules, then the RL models in Table III's order
DISPLAY = ({"triplet": "Triplet network"} | {f"triplet-local-{r}": f"Triplet + local match, {r} glimpses" for r in LOCATORS}
           | {"triplet-dense": "Triplet + dense matching", "triplet-dense-ink": "Triplet + dense matching, inked cells"}
           | RL_DISPLAY)
# Table III of the DARP-SBIR paper, Chair-V2 column: (AUIR, acc@5); the ablations are not in it.
PAPER_CHAIR_V2 = {
    "triplet": (21.05, 64.47),
    "vanilla-pg": (25.34, 69.67),
    "ppo": (33.35, 75.44),
    "bdqn": (30.05, 71.45),
    "darp": (35.65, 79.12),
}
METRICS = ("auir", "acc@1", "acc@5", "acc@10", "m_at_a")
TRIPLET_SEED = -1
DONE = "done.json"


@dataclass
class ReportConfig:
    """Train and evaluate the chosen models over seeds with Ray Tune: results.md, curves.png, glimpses.png."""

    train: TrainConfig = arg(
        help="what every trial trains with: darp train's options (--run-dir: the report's directory, rerun with the "
             "same one to resume; --no-resume: unfinished trials start over instead of restoring their Tune and "
             "RLlib state, which is pickles; --embedding: also the triplet row; --val-interval: how often a run "
             "validates on val to keep its best checkpoint)",
        hide=("algo", "seed", "keep_best", "val_split"))
    seeds: int = arg(3, "seeds per model (0 .. seeds - 1)")
    models: tuple[str, ...] = arg(MODELS, "models to report (triplet, darp train's --algo names and, with --match local "
                                          "or dense, triplet-local-RULE and triplet-dense: the triplet network's queries "
                                          "with fixed-rule glimpses or every cell; ignored in global match)")
    split: Literal["auto", "val", "test"] = arg(
        "auto", "split evaluated: test (the data set's test split), val (a fifth of the train photos, held out by "
        "photo; also where each run picks its best checkpoint) or auto (test when the data set has one, else val)")
    max_concurrent: int = arg(2, "trials running at once (2 cores: 1 or 2)")
    n_traces: int = arg(4, "sketches shown in glimpses.png")
    progress_interval_s: float = arg(30.0, "print the running trials' iterations this often")
    locators: tuple[str, ...] = arg(LOCATORS, "fixed locators each model that looks is also evaluated with, in place of "
                                              "its own (the locator-value table); 'none' for no such table")
    noise_strokes: tuple[int, ...] = arg((2, 4), "noise-stroke counts every model is also evaluated with (the "
                                                 "robustness table); 0 alone for no such table")
    noise_seed: int = arg(0, "seed of the noise strokes (the same sketches for every model)")


def trial_dir(run_dir: str | Path, model: str, seed: int) -> Path:
    root = Path(run_dir) / "trials"
    return root / model if model in ONCE else root / f"{model}_seed{seed}"


def trial_train_config(cfg: ReportConfig, model: str, seed: int) -> TrainConfig:
    """The `darp train` configuration of one trial."""
    return dataclasses.replace(
        cfg.train,
        data=str(Path(cfg.train.data).resolve()),
        embedding=str(Path(cfg.train.embedding).resolve()),
        run_dir=str((trial_dir(cfg.train.run_dir, model, seed) / "run").resolve()),
        algo=model,
        seed=seed,
        keep_best=True,
        val_split="val",
    )


def _write_metrics(out: Path, metrics: dict) -> None:
    from policies.running.evaluate import METRIC_KEYS

    atomic_write_json(out / "metrics.json", {k: metrics[k] for k in METRIC_KEYS + ("confidence",) if k in metrics})


def confidence_summary(confidence: dict | None) -> dict | None:
    """What results.md's confidence table reads from `darp evaluate`'s confidence figures (None: none)."""
    if not confidence:
        return None
    return {k: confidence[k] for k in ("ece_top1", "ece_top5", "early_stop", "early_stop_top5")}


def policy_confidence(cfg: ReportConfig, run_dir: Path, result: dict) -> dict | None:
    """Fit a trained trial's confidence on val (RUN/calibration.json; on the evaluated queries themselves
    when cfg.split is val) and judge it on the evaluated queries (cross-fitted by photo when they are the
    ones it was fitted on): `darp evaluate`'s confidence figures, or None where val cannot fit one."""
    from policies.running.calibration import FIT_SPLIT, evaluation_confidence, policy_queries
    from policies.running.calibration import calibrate_run

    queries = policy_queries(result)
    try:
        calibrate_run(run_dir, cfg.train.data, FIT_SPLIT, queries=queries if cfg.split == FIT_SPLIT else None, quiet=True)
    except DataError as e:
        print(f"no confidence for {run_dir}: {e}")
        return None
    _, _, figures, source = evaluation_confidence(run_dir, cfg.train.data, cfg.split, queries, pristine=True)
    return {"source": source, **figures}


def _write_glimpses(out: Path, extras: dict) -> None:
    """The traced sketches' partial images, glimpse centres and ranks, for glimpses.png."""

    trace = extras["trace"]
    images = extras["episodes"].images[trace.sketch_index].numpy().astype(np.uint8)

    def write(path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, images=images, locations=trace.locations, ranks=trace.ranks,
                     sketch_id=np.asarray(extras["episodes"].sketch_id)[trace.sketch_index].astype(str),
                     patch_pixels=np.float32(extras["env_config"].glimpse_size))

    atomic_write(out / "glimpses.npz", write)


def stress_evaluations(cfg: ReportConfig, run_dir: Path, out: Path, looks: bool, **options) -> dict:
    """The run evaluated on cfg.split with each fixed locator (models that look) and with each count of
    noise strokes, through `darp evaluate` (`options`: more of its settings) into out/locator-NAME/ and
    out/noise-N/: {"locators": {name: {"auir", "fovea_on_ink", "glimpse_cells"}}, "noise": {"N": {metric: value}}}; in local
    match also {"dense": metrics of the run ranked densely (out/dense/)}."""
    from policies.running.evaluate import EvaluateConfig, evaluate_run

    def one(folder: str, **options) -> dict:
        evaluate_run(EvaluateConfig(data=Path(cfg.train.data), run=run_dir, split=cfg.split, out=out / folder,
                                    num_threads=cfg.train.num_threads, force=True, **options))
        return json.loads((out / folder / "metrics.json").read_text())

    locators = {}
    for name in (l for l in cfg.locators if looks and l in LOCATORS):
        m = one(f"locator-{name}", locator=name, seed=cfg.noise_seed, **options)
        locators[name] = {"auir": m["auir"], "fovea_on_ink": m["fovea_on_ink"], "glimpse_cells": m["glimpse_cells"]}
    noise = {}
    for n in (n for n in cfg.noise_strokes if n > 0):
        m = one(f"noise-{n}", noise_strokes=n, noise_seed=cfg.noise_seed, **options)
        noise[str(n)] = {k: m[k] for k in METRICS}
    stress = {"locators": locators, "noise": noise}
    if looks and cfg.train.match == "local":  # the same trained networks ranking every (inked) cell, not the glimpses'
        for match in DENSE:
            m = one(match, match=match)
            stress[match] = {k: m[k] for k in METRICS} | {"cost_per_photo": m["cost_per_photo"]}
    return stress


def train_and_evaluate(cfg: ReportConfig, model: str, seed: int) -> dict:
    """Train one model with one seed, evaluate it on cfg.split; writes the trial's files, done.json last."""
    from sketch_env.metrics import retrieval_metrics
    from policies.running.evaluate import write_ranks
    from policies.running.fit import train
    from policies.running.trained import evaluate_policy_run

    out = trial_dir(cfg.train.run_dir, model, seed)
    train_cfg = trial_train_config(cfg, model, seed)
    start = time.time()
    train(train_cfg, quiet=True)
    trained = time.time()
    result = evaluate_policy_run(Path(train_cfg.run_dir), Path(cfg.train.data), cfg.split, n_traces=cfg.n_traces)
    metrics = retrieval_metrics(result["ranks"], result["n_photos"])
    metrics["confidence"] = policy_confidence(cfg, Path(train_cfg.run_dir), result)
    _write_metrics(out, metrics)
    write_ranks(out / "ranks.parquet", result["sketch_id"], np.asarray(result["ranks"]))
    looks = result["fovea_on_ink"] is not None
    if looks:
        _write_glimpses(out, result["extras"])
    evaluated = time.time()
    stress = stress_evaluations(cfg, Path(train_cfg.run_dir), out, looks)
    if looks:
        own = {"auir": metrics["auir"], "fovea_on_ink": result["fovea_on_ink"], "glimpse_cells": result["glimpse_cells"]}
        stress["locators"] = {"policy": own} | stress["locators"]
    from policies.running.evaluate import match_record

    done = {"model": model, "seed": seed, "train_s": trained - start, "eval_s": evaluated - trained,
            "stress_s": time.time() - evaluated, "metrics": {k: metrics[k] for k in METRICS},
            "confidence": confidence_summary(metrics["confidence"]), **stress,
            **match_record(result["extras"]["env_config"], Path(cfg.train.embedding))}
    atomic_write_json(out / DONE, done)
    return done


def evaluate_triplet(cfg: ReportConfig) -> dict:
    """The triplet row: the embedding run evaluated once on cfg.split (darp evaluate)."""
    from policies.running.evaluate import EvaluateConfig, evaluate_run

    kind = runs.read_run(cfg.train.embedding).get("kind")
    if kind != "triplet":
        raise DataError(f"{cfg.train.embedding}: run.json says kind {kind!r}, not a triplet run (darp pretrain); "
                        "leave 'triplet' out of --models or point --embedding at a darp pretrain run")
    out = trial_dir(cfg.train.run_dir, "triplet", TRIPLET_SEED)
    start = time.time()
    metrics = evaluate_run(EvaluateConfig(data=Path(cfg.train.data), run=Path(cfg.train.embedding), split=cfg.split, out=out))
    evaluated = time.time()
    stress = stress_evaluations(cfg, Path(cfg.train.embedding), out, looks=False)
    done = {"model": "triplet", "seed": TRIPLET_SEED, "train_s": 0.0, "eval_s": evaluated - start,
            "stress_s": time.time() - evaluated, "metrics": {k: metrics[k] for k in METRICS},
            "confidence": confidence_summary(metrics["confidence"]), **stress,
            "match": "global", "cost_per_photo": json.loads((out / "metrics.json").read_text())["cost_per_photo"]}
    atomic_write_json(out / DONE, done)
    return done


def evaluate_rule_model(cfg: ReportConfig, model: str) -> dict:
    """A fixed-rule row (RULE_MODELS): the triplet network's queries in local match with glimpses by one rule
    (as many per level as the report's DARP takes), or in dense match; evaluated once (darp evaluate)."""
    from policies.running.registry import with_algo_defaults
    from policies.running.evaluate import EvaluateConfig, evaluate_run

    match = model.removeprefix("triplet-") if model.startswith("triplet-dense") else "local"
    options = {"match": match, "seed": cfg.noise_seed, "local_weight": cfg.train.local_weight,
               "n_glimpses": with_algo_defaults(dataclasses.replace(cfg.train, algo="darp")).n_glimpses}
    if match == "local":  # dense rows look nowhere: `darp evaluate` refuses a --locator outside local match
        options["locator"] = model.removeprefix("triplet-local-")
    out = trial_dir(cfg.train.run_dir, model, TRIPLET_SEED)
    start = time.time()
    metrics = evaluate_run(EvaluateConfig(data=Path(cfg.train.data), run=Path(cfg.train.embedding), split=cfg.split,
                                          out=out, force=True, **options))
    evaluated = time.time()
    stress = stress_evaluations(cfg, Path(cfg.train.embedding), out, looks=False, **options)
    record = json.loads((out / "metrics.json").read_text())
    done = {"model": model, "seed": TRIPLET_SEED, "train_s": 0.0, "eval_s": evaluated - start,
            "stress_s": time.time() - evaluated, "metrics": {k: metrics[k] for k in METRICS}, **stress,
            "match": match, "cost_per_photo": record["cost_per_photo"], "fovea_on_ink": record.get("fovea_on_ink")}
    atomic_write_json(out / DONE, done)
    return done


def run_trial(config: dict) -> None:
    """Tune function trainable: config = {"report": ReportConfig fields, "job": {"model", "seed"}}."""
    import torch

    report = dict(config["report"])
    cfg = ReportConfig(**(report | {"train": TrainConfig(**report["train"])}))
    torch.set_num_threads(cfg.train.num_threads)
    done = train_and_evaluate(cfg, config["job"]["model"], config["job"]["seed"])
    tune.report({**done["metrics"], "train_s": done["train_s"], "eval_s": done["eval_s"]})


def is_done(run_dir: str | Path, model: str, seed: int) -> bool:
    return (trial_dir(run_dir, model, seed) / DONE).is_file()


def _job_name(job: dict) -> str:
    return f"{job['model']}_seed{job['seed']}"


class Progress(tune.Callback):
    """Prints trial starts and ends, and every progress_interval_s the iterations of the running trials
    (read from their training runs' results, policies.running.runs.results)."""

    def __init__(self, cfg: ReportConfig, total: int):
        self.cfg, self.total = cfg, total
        self.start = self.last = time.time()
        self.finished = 0

    def _say(self, text: str) -> None:
        print(f"[{time.time() - self.start:6.0f}s] {text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(f"start {_job_name(trial.config['job'])}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        r = trial.last_result or {}
        self._say(f"done  {_job_name(trial.config['job'])} ({self.finished}/{self.total}): AUIR {r.get('auir', math.nan):.2f}"
                  f"  acc@5 {r.get('acc@5', math.nan):.1f}  train {r.get('train_s', math.nan):.0f}s")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished += 1
        self._say(f"FAILED {_job_name(trial.config['job'])} ({self.finished}/{self.total}); see {trial.path}")

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last < self.cfg.progress_interval_s:
            return
        self.last = time.time()
        parts = []
        for t in trials:
            if t.status == "RUNNING":
                job = t.config["job"]
                n = len(runs.results(trial_dir(self.cfg.train.run_dir, job["model"], job["seed"]) / "run"))
                parts.append(f"{_job_name(job)} iteration {n}/{self.cfg.train.iterations}")
        if parts:
            self._say("running: " + ", ".join(parts))


def run_trials(cfg: ReportConfig, jobs: list[dict]) -> list[str]:
    """Run `jobs` ({"model", "seed"}) as Tune trials; returns the names of the ones that failed."""
    run_dir = Path(cfg.train.run_dir).resolve()
    report = dataclasses.asdict(cfg)
    report["train"] |= {"run_dir": str(run_dir), "data": str(Path(cfg.train.data).resolve()),
                        "embedding": str(Path(cfg.train.embedding).resolve())}
    # A trial mostly waits for its training run, a Tune trial of its own that takes the CPU it needs;
    # Tune wants some resource per trial: a byte of memory holds no CPU back from the runs.
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"memory": 1}),
        param_space={"report": report, "job": tune.grid_search(jobs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent),
        run_config=tune.RunConfig(
            name=time.strftime("report-%Y%m%d-%H%M%S"),
            storage_path=str(run_dir / "tune"),
            callbacks=[Progress(cfg, len(jobs))],
            verbose=0,
        ),
    )
    results = tuner.fit()
    return [_job_name(r.config["job"]) for r in results if r.error]


def collect(cfg: ReportConfig) -> dict[str, list[dict]]:
    """The finished trials of the chosen models in the table's order: done.json plus metrics.json's
    percentile curve and sizes."""
    out = {}
    for model in (m for m in MODELS if m in cfg.models):
        trials = []
        for seed in [TRIPLET_SEED] if model in ONCE else range(cfg.seeds):
            folder = trial_dir(cfg.train.run_dir, model, seed)
            if not (folder / DONE).is_file():
                continue
            metrics = json.loads((folder / "metrics.json").read_text())
            trials.append(json.loads((folder / DONE).read_text()) | {
                "curve": metrics["percentile_curve"], "n_sketches": metrics["n_sketches"], "n_photos": metrics["n_photos"],
            })
        if trials:
            out[model] = trials
    return out


def summarise(trials: list[dict]) -> tuple[dict, dict]:
    """(mean, spread) of each metric over a model's seeds; spread = sample standard deviation (0 for one seed)."""
    values = {k: np.array([t["metrics"][k] for t in trials], float) for k in METRICS}
    mean = {k: float(v.mean()) for k, v in values.items()}
    spread = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
    return mean, spread


def is_chair_v2(manifest: dict) -> bool:
    """Whether a data set is the QMUL Chair-V2 import (its manifest's source and name)."""
    source, name = str(manifest.get("source", "")), str(manifest.get("name", ""))
    return source.startswith("qmul") and "chair" in (name + source).lower()


def _mean_std(values) -> str:
    v = np.asarray(list(values), float)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def locator_table(trials: dict[str, list[dict]]) -> str | None:
    """Locator value per model that looks: AUIR with its own locator and with each fixed one, the
    difference to the best fixed one (per seed, then mean ± std), the share of glimpses on ink and how
    many distinct cells of an 8 x 8 grid an episode's glimpses visit (own locator / the ink rule)."""
    rows = {m: ts for m, ts in trials.items() if all(len(t.get("locators", {})) > 1 for t in ts)}
    if not rows:
        return None
    fixed = [name for name in next(iter(rows.values()))[0]["locators"] if name != "policy"]
    dense = [m for m in DENSE if all(m in t for ts in rows.values() for t in ts)]
    names = {"dense": "dense (every cell)", "dense-ink": "dense (inked cells)"}
    lines = ["| model | own locator | " + " | ".join(fixed) + " | own − best fixed | glimpses on ink (own) | cells per sketch (own / ink) |"
             + "".join(f" {names[m]} | own − {m} |" for m in dense),
             "|---|" + "---|" * (len(fixed) + 4 + 2 * len(dense))]
    for model, ts in rows.items():
        cells = [_mean_std(t["locators"]["policy"]["auir"] for t in ts)]
        cells += [_mean_std(t["locators"][name]["auir"] for t in ts) for name in fixed]
        cells.append(_mean_std(t["locators"]["policy"]["auir"] - max(t["locators"][n]["auir"] for n in fixed) for t in ts))
        cells.append(f"{100 * np.mean([t['locators']['policy']['fovea_on_ink'] for t in ts]):.1f}%")
        cells.append(" / ".join(_mean_cells(ts, name) for name in ("policy", "ink")))
        for m in dense:
            cells.append(_mean_std(t[m]["auir"] for t in ts))
            cells.append(_mean_std(t["locators"]["policy"]["auir"] - t[m]["auir"] for t in ts))
        lines.append(f"| {DISPLAY[model]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_cells(trials: list[dict], locator: str) -> str:
    values = [t["locators"].get(locator, {}).get("glimpse_cells") for t in trials]
    return "–" if any(v is None for v in values) else f"{np.mean(values):.1f}"


def cost_table(trials: dict[str, list[dict]]) -> str | None:
    """Each row's match mode and multiply-adds per gallery photo to score one query at one completion level
    (sketch_env.local_match.local_cost), beside its AUIR; None when every row ranks globally."""
    rows = {m: ts for m, ts in trials.items() if all("cost_per_photo" in t for t in ts)}
    if not rows or all(t.get("match", "global") == "global" for ts in rows.values() for t in ts):
        return None
    lines = ["| model | match | multiply-adds per photo and level | AUIR |", "|---|---|---|---|"]
    for model, ts in rows.items():
        lines.append(f"| {DISPLAY[model]} | {ts[0]['match']} | {ts[0]['cost_per_photo']} | "
                     f"{_mean_std(t['metrics']['auir'] for t in ts)} |")
    for match in DENSE:
        dense = [t[match] for ts in rows.values() for t in ts if match in t]
        if dense:
            lines.append(f"| (models that look, ranked {match}) | {match} | {dense[0]['cost_per_photo']} | "
                         f"{_mean_std(d['auir'] for d in dense)} |")
    return "\n".join(lines)


def robustness_table(trials: dict[str, list[dict]]) -> str | None:
    """AUIR and acc@5 clean and with each count of noise strokes, and what the most noise cost."""
    rows = {m: ts for m, ts in trials.items() if all(t.get("noise") for t in ts)}
    if not rows:
        return None
    counts = sorted({int(n) for ts in rows.values() for t in ts for n in t["noise"]})
    counts = [n for n in counts if all(str(n) in t["noise"] for ts in rows.values() for t in ts)]
    if not counts:
        return None
    head = ["AUIR clean"] + [f"AUIR +{n}" for n in counts] + ["acc@5 clean"] + [f"acc@5 +{n}" for n in counts]
    head += [f"AUIR lost (+{counts[-1]})", f"acc@5 lost (+{counts[-1]})"]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    worst = str(counts[-1])
    for model, ts in rows.items():
        cells = []
        for k in ("auir", "acc@5"):
            cells.append(_mean_std(t["metrics"][k] for t in ts))
            cells += [_mean_std(t["noise"][str(n)][k] for t in ts) for n in counts]
        cells += [_mean_std(t["metrics"][k] - t["noise"][worst][k] for t in ts) for k in ("auir", "acc@5")]
        lines.append(f"| {DISPLAY[model]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _nan_mean_std(values, scale: float = 1.0) -> str:
    v = np.asarray(list(values), float) * scale
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return "–"
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


# (early-stop table, what its confidence is of, threshold, the outcome reported when it fires)
CONFIDENCE_STOPS = (("early_stop", "P(top-1)", 0.9, "top1_right", "top-1 right"),
                    ("early_stop", "P(top-1)", 0.95, "top1_right", "top-1 right"),
                    ("early_stop_top5", "P(top 5)", 0.9, "top5_right", "in top 5"))


def confidence_table(trials: dict[str, list[dict]]) -> str | None:
    """Per model: the confidence's expected calibration error (P(top-1 right), P(in top 5)) and, for
    each stop rule of CONFIDENCE_STOPS (stop each sketch at the first level whose confidence reaches p),
    how often that fires, how often it is then right and the median share of the drawing it saves."""
    rows = {m: ts for m, ts in trials.items() if all(t.get("confidence") for t in ts)}
    if not rows:
        return None
    head = ["ECE top-1", "ECE top-5"]
    for _, event, p, _, outcome in CONFIDENCE_STOPS:
        head += [f"{event} ≥ {p:g}: fires %", f"{outcome} %", "median saved %"]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for model, ts in rows.items():
        cells = [f"{np.mean([t['confidence'][k] for t in ts]):.3f} ± "
                 f"{np.std([t['confidence'][k] for t in ts], ddof=1) if len(ts) > 1 else 0.0:.3f}" for k in ("ece_top1", "ece_top5")]
        for table, _, p, right, _ in CONFIDENCE_STOPS:
            stops = [next((r for r in t["confidence"].get(table, []) if abs(r["threshold"] - p) < 1e-9), None) for t in ts]
            stops = [r for r in stops if r is not None]
            cells += [_nan_mean_std(r["fires"] for r in stops), _nan_mean_std(r[right] for r in stops),
                      _nan_mean_std((r["saved_median"] for r in stops), 100.0)]
        lines.append(f"| {DISPLAY[model]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(cfg: ReportConfig, trials: dict[str, list[dict]], manifest: dict, wall_s: float,
                     failed: list[str]) -> str:
    """results.md: the table (mean ± std over seeds), the paper's Chair-V2 figures, ordering and timings."""
    from policies.running.plots import format_table

    rows, spreads = {}, {}
    for model, ts in trials.items():
        rows[DISPLAY[model]], spreads[DISPLAY[model]] = summarise(ts)
    any_trial = next(iter(trials.values()))[0]
    lines = [
        f"# Results: {manifest.get('name', '?')} ({manifest.get('source', '?')}), {cfg.split} split",
        "",
        f"{any_trial['n_sketches']} sketches, gallery of {any_trial['n_photos']} photos; seeds 0..{cfg.seeds - 1} per model "
        f"({cfg.train.iterations} iterations{f', at most {cfg.train.time_budget_s:.0f} s' if cfg.train.time_budget_s else ''} of "
        f"{cfg.train.episodes_per_batch} episodes each). Mean ± standard deviation over seeds; the triplet row is one "
        "evaluation of the embedding run. AUIR and m@A over the 17 completion levels, acc@q on complete sketches.",
        "",
        format_table(rows, spreads),
        "",
    ]
    if is_chair_v2(manifest):
        lines += ["## Beside the paper (Table III, Chair-V2)", "",
                  "| model | AUIR ours | AUIR paper | acc@5 ours | acc@5 paper |", "|---|---|---|---|---|"]
        for model, (auir, acc5) in PAPER_CHAIR_V2.items():
            if model in trials:
                mean = rows[DISPLAY[model]]
                lines.append(f"| {DISPLAY[model]} | {mean['auir']:.2f} | {auir:.2f} | {mean['acc@5']:.2f} | {acc5:.2f} |")
        lines.append("")
    sections = [  # (title, what the table shows, the table or None where no trial has its figures)
        ("Locator value (models that look)",
         f"AUIR on the {cfg.split} split of the same trained networks, each glimpse located by the policy "
         "itself or by a fixed rule in its place (centre; random: uniform; ink: a random inked pixel; "
         "newest-ink: on the stroke drawn last). Own − best fixed is taken per seed.", locator_table(trials)),
        ("Confidence: when to stop drawing",
         f"The confidence P(top-1 right) of every query on the {cfg.split} split, from the run's calibrator "
         "(fitted on val; on val itself the figures are cross-fitted over folds of photos). ECE: expected "
         "calibration error (15 bins). Stopping each sketch at the first completion level whose confidence "
         "reaches p: the share of sketches where that happens, how often the top-1 photo is then right (or the "
         "right photo in the top 5), and the median share of the drawing left undrawn (of those that stop; "
         "– where none does).", confidence_table(trials)),
        ("Cost of a query",
         "What scoring one query against one gallery photo at one completion level costs in each row: the global "
         "distance (D multiply-adds) plus 9 d per cell compared (the glimpses' cells in local match, every cell in "
         "dense); `benchmarks/bench_local_match.py` measures the time.", cost_table(trials)),
        ("Robustness to unnecessary strokes",
         f"The same networks with noise strokes (random lines and scribbles at random places of the drawing "
         f"order, seed {cfg.noise_seed}) added to every sketch; lost = clean minus noisy, per seed.",
         robustness_table(trials)),
    ]
    for title, text, table in sections:
        if table:
            lines += [f"## {title}", "", text, "", table, ""]
    order = sorted(trials, key=lambda m: -rows[DISPLAY[m]]["auir"])
    lines += ["Ordering by mean AUIR: " + " > ".join(f"{m} ({rows[DISPLAY[m]]['auir']:.2f})" for m in order), "",
              "## Time on this machine", "", "| model | trials | train s (mean) | evaluate s (mean) | stress tables s (mean) |", "|---|---|---|---|---|"]
    for model, ts in trials.items():
        lines.append(f"| {model} | {len(ts)} | {np.mean([t['train_s'] for t in ts]):.0f} | {np.mean([t['eval_s'] for t in ts]):.0f} "
                     f"| {np.mean([t.get('stress_s', 0.0) for t in ts]):.0f} |")
    lines += ["", f"This invocation: {wall_s:.0f} s wall clock, {cfg.max_concurrent} trial(s) at a time."]
    if cfg.split == "val":
        lines += ["", "Caution: each RL run kept its best checkpoint by AUIR on this same val split, so its figures "
                  "are optimistic; report a test split where the data set has one."]
    missing = [f"{m}_seed{s}" for m in cfg.models if m not in ONCE for s in range(cfg.seeds) if not is_done(cfg.train.run_dir, m, s)]
    if failed or missing:
        lines += ["", f"Not in the table (failed or unfinished): {', '.join(sorted(set(failed) | set(missing)))}."]
    return "\n".join(lines) + "\n"


def write_ranks_table(cfg: ReportConfig, trials: dict[str, list[dict]], out: Path) -> Path:
    """Every finished trial's ranks.parquet with its model and seed: model, seed, sketch_id, level, rank."""
    tables = []
    for model, ts in trials.items():
        for t in ts:
            table = pq.read_table(trial_dir(cfg.train.run_dir, model, t["seed"]) / "ranks.parquet")
            n = table.num_rows
            tables.append(pa.table({
                "model": pa.array([model] * n, pa.string()),
                "seed": pa.array(np.full(n, t["seed"], np.int32)),
                "sketch_id": table["sketch_id"],
                "level": table["level"],
                "rank": table["rank"],
            }))
    combined = pa.concat_tables(tables)
    return atomic_write(out, lambda p: pq.write_table(combined, p))


def plot_report_glimpses(cfg: ReportConfig, out: Path) -> Path | None:
    """glimpses.png from the first seed of the first model that looks (darp first); None if none did."""
    from policies.running.plots import plot_glimpses

    for model in sorted(GLIMPSING, key=lambda m: m != "darp"):
        if model not in cfg.models:
            continue
        for seed in range(cfg.seeds):
            path = trial_dir(cfg.train.run_dir, model, seed) / "glimpses.npz"
            if is_done(cfg.train.run_dir, model, seed) and path.is_file():
                with np.load(path, allow_pickle=False) as g:
                    return plot_glimpses(g["images"], g["locations"], g["ranks"], out, float(g["patch_pixels"]),
                                         names=[f"{model} seed {seed}: {s}" for s in g["sketch_id"]])
    return None


def with_split(cfg: ReportConfig, manifest: dict) -> ReportConfig:
    """cfg with split "auto" resolved: test when the data set has test sketches, else val."""
    if cfg.split != "auto":
        return cfg
    return dataclasses.replace(cfg, split="test" if manifest.get("splits", {}).get("test", 0) else "val")


def check_config(cfg: ReportConfig) -> None:
    """Fail before anything is written on options no trial could run with (ConfigError naming the option) or
    inputs that are no directories (DataError)."""
    unknown = [m for m in cfg.models if m not in MODELS]
    if unknown or not cfg.models:
        raise ConfigError(f"--models: unknown {unknown}; choose from {MODELS}")
    if cfg.seeds < 1 or cfg.max_concurrent < 1 or cfg.train.iterations < 1:
        raise ConfigError(f"--seeds, --max-concurrent and --iterations must be >= 1, got "
                          f"{cfg.seeds}, {cfg.max_concurrent}, {cfg.train.iterations}")
    for name in ("data", "embedding"):
        if not Path(getattr(cfg.train, name)).is_dir():
            raise DataError(f"--{name} {getattr(cfg.train, name)} is not a directory")


REPORT_KIND = OutputKind("report", ("trials", "tune", "results.md"))


def run_report(cfg: ReportConfig) -> list[str]:
    """Run the report's missing trials and write its outputs; returns the trials that failed (a rerun retries them)."""
    from sketch_env.data.store import read_manifest
    from policies.running.plots import plot_curves

    check_config(cfg)
    if cfg.train.match == "global":  # the fixed-rule rows rank with local descriptors
        cfg = dataclasses.replace(cfg, models=tuple(m for m in cfg.models if m not in RULE_MODELS))
    else:  # these read the phase-1 features only (policies.running.registry.with_algo_defaults refuses them)
        dropped = [m for m in cfg.models if m in ("vanilla-pg", "ppo")]
        if dropped:
            print(f"--match {cfg.train.match}: leaving out {', '.join(dropped)} (they read the phase-1 features only)")
            cfg = dataclasses.replace(cfg, models=tuple(m for m in cfg.models if m not in dropped))
    start = time.time()
    run_dir = prepare_output_dir(cfg.train.run_dir, REPORT_KIND, inputs=(cfg.train.data, cfg.train.embedding),
                                 force=cfg.train.force)
    manifest = read_manifest(cfg.train.data)
    cfg = with_split(cfg, manifest)
    if "triplet" in cfg.models and not is_done(run_dir, "triplet", TRIPLET_SEED):
        evaluate_triplet(cfg)
    for model in (m for m in RULE_MODELS if m in cfg.models and not is_done(run_dir, m, TRIPLET_SEED)):
        evaluate_rule_model(cfg, model)
    jobs = [{"model": m, "seed": s} for m in cfg.models if m in ALGOS for s in range(cfg.seeds)]
    todo = [job for job in jobs if not is_done(run_dir, job["model"], job["seed"])]
    skipped = [_job_name(job) for job in jobs if job not in todo]
    if skipped:
        print(f"skipping {len(skipped)} finished trial(s): {', '.join(skipped)}", flush=True)
    failed = []
    if todo:
        print(f"running {len(todo)} trial(s), {cfg.max_concurrent} at a time: {', '.join(map(_job_name, todo))}", flush=True)
        with ray_session():
            failed = run_trials(cfg, todo)
    trials = collect(cfg)
    if not trials:
        raise RunStopped(f"no finished trial under {run_dir / 'trials'}; failed: {', '.join(failed) or 'none'}")
    text = results_markdown(cfg, trials, manifest, time.time() - start, failed)
    atomic_write_text(run_dir / "results.md", text)
    curves = {DISPLAY[m]: np.mean([t["curve"] for t in ts], axis=0) for m, ts in trials.items()}
    plot_curves(curves, run_dir / "curves.png", title=f"{manifest.get('name', '')}, {cfg.split} split")
    glimpses = plot_report_glimpses(cfg, run_dir / "glimpses.png")
    write_ranks_table(cfg, trials, run_dir / "ranks.parquet")
    print("\n" + text)
    print(f"wrote {run_dir / 'results.md'}, {run_dir / 'curves.png'}, "
          f"{glimpses if glimpses else '(no glimpses.png: no model that looks)'}, {run_dir / 'ranks.parquet'}")
    if failed:
        print(f"darp report: {len(failed)} trial(s) failed: {', '.join(failed)}; rerun to retry them")
    return failed
