"""Run directories (policies.running.runs) and the Ray start helper (policies.running.ray_session), without Ray."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from policies.running import runs
from policies.running.ray_session import _sigterm_as_sigint, ray_descendants, shutdown_ray
from sketch_env.data import DataError


def fake_checkpoint(run_dir, index: int, iteration: int, auir: float | None, module_bytes: bytes = b"weights"):
    path = runs.trial_dir(run_dir) / f"checkpoint_{index:06d}"
    (path / runs.MODULE_PATH).mkdir(parents=True)
    (path / runs.MODULE_PATH / "module_state.pkl").write_bytes(module_bytes)
    (path / "rllib_checkpoint.json").write_text("{}")
    runs.write_checkpoint_info(path, iteration, {} if auir is None else {"auir": auir, "acc@5": 50.0})
    return path


def test_best_checkpoint_is_the_best_complete_one_else_the_latest(tmp_path):
    with pytest.raises(DataError, match="no complete checkpoint"):
        runs.best_checkpoint(tmp_path)
    fake_checkpoint(tmp_path, 0, 1, None)
    assert runs.best_checkpoint(tmp_path).iteration == 1, "nothing validated: the latest"
    fake_checkpoint(tmp_path, 1, 5, 40.0)
    fake_checkpoint(tmp_path, 2, 10, 45.0)
    fake_checkpoint(tmp_path, 3, 12, None)
    assert runs.best_checkpoint(tmp_path).iteration == 10
    assert runs.best_checkpoint(tmp_path, keep_best=False).iteration == 12
    assert runs.best_module_dir(tmp_path) == runs.trial_dir(tmp_path) / "checkpoint_000002" / runs.MODULE_PATH

    # a kill while Tune copied a checkpoint: a file shorter than checkpoint.json says, or missing
    cut = fake_checkpoint(tmp_path, 4, 15, 99.0, module_bytes=b"weights of the best")
    (cut / runs.MODULE_PATH / "module_state.pkl").write_bytes(b"weights")
    gone = fake_checkpoint(tmp_path, 5, 16, 98.0)
    (gone / "rllib_checkpoint.json").unlink()
    assert [c.iteration for c in runs.checkpoints(tmp_path)] == [1, 5, 10, 12]
    assert runs.best_checkpoint(tmp_path).iteration == 10


def test_only_experiments_darp_named_are_the_runs_own(tmp_path):
    """A user's folder `tune-notes/` in a run directory was taken for Tune's experiment and deleted by a
    start-over (issue 25, item 2)."""
    (tmp_path / "tune-notes").mkdir()
    (tmp_path / "tune-1234").mkdir()
    (tmp_path / "tune-0123456789").mkdir()
    assert runs.experiment_dirs(tmp_path) == [] and runs.experiment_dir(tmp_path) is None
    name = runs.new_experiment_name()
    (tmp_path / name).mkdir()
    assert runs.experiment_dirs(tmp_path) == [tmp_path / name]


def test_a_run_json_that_is_not_an_object_is_named(tmp_path):
    with pytest.raises(DataError, match="no run.json"):
        runs.read_run(tmp_path)
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="run.json: expected a JSON object"):
        runs.read_run(tmp_path)
    runs.write_run(tmp_path, {"kind": "darp", "config": {"keep_best": False}})
    assert runs.read_run(tmp_path)["kind"] == "darp"


def test_trim_results_cuts_after_the_restored_iteration_in_place(tmp_path):
    lines = [json.dumps({"training_iteration": i, "time_total_s": float(i), "evaluation": {"auir": math.nan}})
             for i in (1, 2, 3, 4)]
    (tmp_path / "result.json").write_text("\n".join(lines) + "\n" + '{"training_iteration": 5, "ti')  # cut by a kill
    (tmp_path / "progress.csv").write_text(
        'time_total_s,training_iteration,trial_id\n1.0,1,"a,b"\n2.0,2,"a,b"\n3.0,3,x\n4.0,4,x\n')
    with open(tmp_path / "result.json", "a") as held:  # Tune's logger holds the file open for appending
        runs.trim_results(tmp_path, 2)
        held.write(json.dumps({"training_iteration": 3}) + "\n")
        held.flush()
    kept = [json.loads(line)["training_iteration"] for line in (tmp_path / "result.json").read_text().splitlines()]
    assert kept == [1, 2, 3], "the rerun's iteration 3 follows the kept ones"
    assert (tmp_path / "progress.csv").read_text().splitlines()[1:] == ['1.0,1,"a,b"', '2.0,2,"a,b"']
    runs.trim_results(tmp_path, 0)
    assert (tmp_path / "progress.csv").read_text() == "time_total_s,training_iteration,trial_id\n", "the header stays"
    assert (tmp_path / "result.json").read_text() == ""


def test_sigterm_reaches_the_sigint_path_and_both_handlers_come_back():
    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.getsignal(signal.SIGTERM)
    try:
        restore = _sigterm_as_sigint()
        try:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            signal.signal(signal.SIGINT, lambda *a: None)  # as Tune leaves its handler behind
        finally:
            restore()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == before[1]
    finally:
        signal.signal(signal.SIGINT, before[0])


def test_shutdown_kills_ray_processes_that_ignore_sigterm():
    """Like ray::DashboardAgent after its raylet is gone: a child that ignores SIGTERM."""
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); time.sleep(120)", "ray::DashboardAgent"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.5)
        candidates = [p.pid for p in ray_descendants()]
        assert stubborn.pid in candidates and bystander.pid not in candidates, "only Ray's processes are candidates"
        killed = shutdown_ray(grace_s=0.5)
        assert stubborn.pid in killed and stubborn.wait(timeout=5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (stubborn, bystander):
            p.kill()
            p.wait()


def test_building_a_module_logs_no_rlmoduleconfig_deprecation():
    """RLlib's RLModule.__init__ logs it for every module (its own RLModuleConfig); ours use the current
    constructor, so policies filters that one message. A fresh process: RLlib logs it once per process."""
    code = ("from tests.module_batches import make_module; make_module(); "
            "import logging; logging.getLogger('ray._common.deprecation').warning('another deprecation')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RLModuleConfig" not in out.stderr and "another deprecation" in out.stderr


def test_resuming_a_run_saved_by_another_layout_is_one_clear_error(tmp_path):
    """Issue 25: a run whose Tune state names classes this version moved (policies.darp_module before the
    subpackages) is refused with the run named and --no-resume offered, not a traceback from Tune's unpickling."""
    from policies.running import fit
    from policies.running.registry import TrainConfig

    cfg = TrainConfig(data="d", embedding="e", run_dir=str(tmp_path))
    experiment = tmp_path / runs.new_experiment_name()
    experiment.mkdir()
    (experiment / "tuner.pkl").write_bytes(b"cpolicies.darp_module\nDARPModule\n.")  # a pickled reference, nothing else
    record = {"kind": "darp", "config": dataclasses.asdict(cfg)}
    runs.write_run(tmp_path, record)
    with pytest.raises(DataError, match=r"cannot resume .*another version.*darp_module.*--no-resume"):
        fit._tuner(cfg, tmp_path, record)
