"""Run directories: the one place that knows their layout, reads and writes run.json, and picks checkpoints.

Every run directory holds `run.json` (what was trained, from what, and its validation figures):
`darp pretrain` writes one for phase 1 (kind "triplet"), `darp train` for the RL models (kind = the
model's name). An RL run is one Ray Tune trial:

    RUN/run.json                         status "running" while it trains, "finished" after ("failed": the trial failed)
    RUN/tune-XXXXXXXX/                   Tune's experiment (what --resume restores)
    RUN/tune-XXXXXXXX/train/             the trial: result.json (one line per iteration), progress.csv,
                                         events.out.tfevents.* (tensorboard --logdir RUN), params.json
    RUN/tune-XXXXXXXX/train/checkpoint_NNNNNN/   an RLlib Algorithm checkpoint (Tune numbers them in order)
                                         with checkpoint.json: its iteration, validation figures, file sizes
    .../checkpoint_NNNNNN/learner_group/learner/rl_module/default_policy/   the RLModule (module_state.pkl)

The experiment's name is drawn once per run (new_experiment_name): Tune stages an experiment's files
under the Ray session by name and start second, so a fixed name made two runs started in the same
second (darp report's concurrent trials) share one staging directory and mix up their trials.

Tune's CheckpointConfig keeps the checkpoint with the best validation AUIR and the latest one.
`best_checkpoint` picks among the complete ones (all files of checkpoint.json present with their
sizes: a kill while Tune copies a checkpoint leaves an incomplete one, never chosen): the best
validation AUIR, else the latest. Reading a run directory unpickles nothing.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sketch_env.atomic import OutputKind, atomic_write_json, read_json_object
from sketch_env.confidence import Confidence
from sketch_env.data import DataError

RUN_FILE = "run.json"
CALIBRATION_FILE = "calibration.json"  # the run's confidence (policies.running.calibration.calibrate_run), both kinds of run
EXPERIMENT_PREFIX = "tune-"
TRIAL = "train"
CHECKPOINT_INFO = "checkpoint.json"
RESULTS = "result.json"
PROGRESS = "progress.csv"
MODULE_PATH = Path("learner_group") / "learner" / "rl_module" / "default_policy"
# The output kind of `darp train` (sketch_env.atomic.prepare_output_dir: a run directory is one it stamped).
RL_RUN_KIND = OutputKind("RL run", (RUN_FILE,))
EXPERIMENT_NAME = re.compile(re.escape(EXPERIMENT_PREFIX) + r"[0-9a-f]{8}")  # new_experiment_name's names only


def read_run(run_dir: str | Path) -> dict:
    """run.json of a run directory; DataError naming the file when it is missing or not a JSON object."""
    return read_json_object(Path(run_dir) / RUN_FILE, f"{run_dir}: not a run directory (no run.json); "
                                                       "train one with `darp train` or `darp pretrain`")


def write_run(run_dir: str | Path, record: dict) -> Path:
    """Write run.json atomically."""
    return atomic_write_json(Path(run_dir) / RUN_FILE, record)


def new_experiment_name() -> str:
    return f"{EXPERIMENT_PREFIX}{uuid.uuid4().hex[:8]}"


def experiment_dirs(run_dir: str | Path) -> list[Path]:
    """Every Tune experiment directory in a run directory (one, unless a kill interrupted a start-over):
    directories named as `new_experiment_name` names them, so that a folder of the user's that merely
    starts with "tune-" is never taken for one (and deleted by a start-over)."""
    return sorted(p for p in Path(run_dir).glob(f"{EXPERIMENT_PREFIX}*")
                  if EXPERIMENT_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def experiment_dir(run_dir: str | Path) -> Path | None:
    """The run's Tune experiment directory (the newest if there are several), or None."""
    found = experiment_dirs(run_dir)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def trial_dir(run_dir: str | Path) -> Path:
    """The run's trial directory (inside a not yet existing experiment when there is none)."""
    return (experiment_dir(run_dir) or Path(run_dir) / f"{EXPERIMENT_PREFIX}none") / TRIAL


@dataclass
class Checkpoint:
    """One checkpoint of an RL run: its directory, iteration and validation figures ({} if none)."""

    path: Path
    iteration: int
    validation: dict = field(default_factory=dict)

    @property
    def auir(self) -> float:
        return float(self.validation.get("auir", math.nan))

    @property
    def module_dir(self) -> Path:
        return self.path / MODULE_PATH


def write_checkpoint_info(checkpoint_dir: str | Path, iteration: int, validation: dict) -> Path:
    """checkpoint.json: the iteration, validation figures and the size of every file, written last."""
    root = Path(checkpoint_dir)
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    files.pop(CHECKPOINT_INFO, None)
    clean = {k: float(v) for k, v in validation.items() if not (isinstance(v, float) and math.isnan(v))}
    return atomic_write_json(root / CHECKPOINT_INFO, {"iteration": int(iteration), "validation": clean, "files": files})


def _complete(path: Path) -> Checkpoint | None:
    """The checkpoint at `path` if its checkpoint.json is readable and every file it lists is there in full."""
    try:
        info = json.loads((path / CHECKPOINT_INFO).read_text())
        files = info["files"]
        if not (path / MODULE_PATH / "module_state.pkl").is_file():
            return None
        for name, size in files.items():
            if (path / name).stat().st_size != size:
                return None
        return Checkpoint(path, int(info["iteration"]), dict(info.get("validation") or {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """The complete checkpoints of an RL run, oldest first."""
    found = [_complete(p) for p in sorted(trial_dir(run_dir).glob("checkpoint_*")) if p.is_dir()]
    return sorted((c for c in found if c is not None), key=lambda c: c.iteration)


def best_checkpoint(run_dir: str | Path, keep_best: bool = True) -> Checkpoint:
    """The checkpoint evaluation uses: the best validation AUIR (later wins ties), else the latest.

    keep_best=False: the latest. DataError when the run has no complete checkpoint.
    """
    found = checkpoints(run_dir)
    if not found:
        raise DataError(f"{run_dir}: no complete checkpoint under {trial_dir(run_dir)}; train it with `darp train`")
    validated = [c for c in found if not math.isnan(c.auir)]
    if keep_best and validated:
        return max(reversed(validated), key=lambda c: c.auir)
    return found[-1]


def best_module_dir(run_dir: str | Path) -> Path:
    """The RLModule directory (holding module_state.pkl) of the best, else the latest, checkpoint,
    as run.json's `keep_best` says."""
    try:
        keep_best = bool(read_run(run_dir).get("config", {}).get("keep_best", True))
    except DataError:
        keep_best = True
    return best_checkpoint(run_dir, keep_best).module_dir


def results(run_dir: str | Path) -> list[dict]:
    """The trial's results, one per iteration (Tune's result.json; NaN stands for "not validated")."""
    path = trial_dir(run_dir) / RESULTS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill ends what is readable
    return out


def trim_results(folder: str | Path, iteration: int) -> None:
    """Cut result.json and progress.csv of a trial after `iteration`, in place.

    Why: a trial restored from the checkpoint of iteration k reruns the iterations after k, and
    Tune's loggers append; lines after k (logged before a kill, never checkpointed) would appear
    twice. Truncated in place, not replaced, because Tune's loggers may already hold the files
    open for appending.
    """
    folder = Path(folder)
    _truncate_after(folder / RESULTS, lambda line: json.loads(line).get("training_iteration", 0) <= iteration)
    progress = folder / PROGRESS
    if progress.is_file():
        with open(progress, "rb") as f:
            header = f.readline().decode().rstrip("\r\n").split(",")
        if "training_iteration" in header:
            column = header.index("training_iteration")
            first = [True]

            def keep(line: str) -> bool:
                if first[0]:
                    first[0] = False
                    return True
                return float(next(csv.reader([line]))[column]) <= iteration

            _truncate_after(progress, keep)


def _truncate_after(path: Path, keep) -> None:
    """Truncate `path` at its first line that `keep` rejects or cannot read (a cut-off line)."""
    if not path.is_file():
        return
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                ok = raw.endswith(b"\n") and keep(raw.decode())
            except (ValueError, IndexError, AttributeError):
                ok = False
            if not ok:
                break
            offset += len(raw)
    if offset < path.stat().st_size:
        os.truncate(path, offset)


def load_run_confidence(run_dir: str | Path) -> Confidence | None:
    """RUN/calibration.json, or None when the run has none (runs made before it existed)."""
    path = Path(run_dir) / CALIBRATION_FILE
    return Confidence.load(path) if path.is_file() else None


__all__ = ["CALIBRATION_FILE", "CHECKPOINT_INFO", "Checkpoint", "MODULE_PATH", "RUN_FILE", "best_checkpoint", "best_module_dir",
           "checkpoints", "experiment_dir", "experiment_dirs", "load_run_confidence", "new_experiment_name", "read_run", "results", "trial_dir", "trim_results",
           "write_checkpoint_info", "write_run"]
