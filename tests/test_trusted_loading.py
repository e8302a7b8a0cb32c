"""Loading a trained run runs no code from it: `policies.running.trained.load_module` rebuilds the module from
run.json and reads only plain arrays from module_state.pkl; RLlib's class_and_ctor_args.pkl is never opened.

The fast tests use a run directory RLlib writes without training (`save_untrained_run`); the slow
one puts booby-trapped pickles into a real `darp train` run and runs the four commands that load runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from sketch_env.data import DataError
from tests.rl_fixtures import save_untrained_run
from policies.running.runs import best_module_dir, trial_dir, write_checkpoint_info
from policies.running.trained import load_module, module_weights_path


class Trap:
    """Unpickling this creates `marker`: what a booby-trapped pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Trap(marker)))


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """(data, phase-1 run, a DARP run with RLlib's own module checkpoint)."""
    data, phase1 = tiny
    run = save_untrained_run(tmp_path_factory.mktemp("run") / "darp", data, phase1, n_glimpses=2)
    return data, phase1, run


def test_the_module_comes_back_with_its_weights(saved):
    from ray.rllib.core.rl_module.rl_module import RLModule

    _, _, run = saved
    module = load_module(run)
    reference = RLModule.from_checkpoint(str(best_module_dir(run).resolve()))  # RLlib's own way (trusted here)
    assert type(module) is type(reference) and not module.training
    expected = reference.state_dict()
    assert set(module.state_dict()) == set(expected)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, expected[key])


def resign(run: Path) -> None:
    """checkpoint.json rewritten for the checkpoint's files as they are now: a hostile user edits it too (its
    file sizes only tell a checkpoint torn by a kill from a complete one)."""
    (checkpoint,) = trial_dir(run).glob("checkpoint_*")
    write_checkpoint_info(checkpoint, 0, {})


def test_a_booby_trapped_constructor_pickle_is_never_opened(saved, tmp_path):
    _, _, run = saved
    marker = tmp_path / "ran"
    trapped = tmp_path / "trapped"
    import shutil

    shutil.copytree(run, trapped)
    plant(best_module_dir(trapped) / "class_and_ctor_args.pkl", marker)
    resign(trapped)
    module = load_module(trapped)
    assert not marker.exists(), "loading the run ran code from class_and_ctor_args.pkl"
    assert float(module.std) == pytest.approx(0.3)


@pytest.mark.parametrize("damage", ["trap", "truncate", "other_architecture", "not_a_dict", "nan"])
def test_bad_weights_are_refused_with_a_one_line_error_naming_the_file(saved, tmp_path, damage):
    import shutil

    data, phase1, run = saved
    trapped = tmp_path / "run"
    shutil.copytree(run, trapped)
    weights = module_weights_path(trapped)
    marker = tmp_path / "ran"
    if damage == "trap":
        plant(weights, marker)
        message = "refusing to load the pickle: it asks for the global io.open"
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
        message = "not a readable RLModule weights pickle"
    elif damage == "other_architecture":
        other = save_untrained_run(tmp_path / "other", data, phase1, n_glimpses=2, n_heads=3)
        shutil.copy(module_weights_path(other), weights)
        message = "the weights do not fit the module run.json describes"
    elif damage == "not_a_dict":
        weights.write_bytes(pickle.dumps([1, 2]))
        message = "expected a dict of named weights"
    else:  # issue 25, item 7: NaN weights were loaded and ranked with
        from sketch_env.safe_pickle import load_numpy_pickle

        state = load_numpy_pickle(weights, "weights")
        name = sorted(state)[1]
        state[name] = state[name] * float("nan")
        weights.write_bytes(pickle.dumps(state))
        message = f"weight {name!r} holds NaN or infinite values"
    resign(trapped)
    with pytest.raises(DataError) as error:
        load_module(trapped)
    text = str(error.value)
    assert text.startswith(str(weights)) and message in text and "\n" not in text
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    ({"n_heads": -3}, "--n-heads must be an integer in [1, 1024], got -3"),
    ({"glimpse_size": 0}, "--glimpse-size must be an integer in [1, --glimpse-image-size], got 0"),
    ({"n_heads": 1e12}, "'n_heads' (--n-heads): expected an integer, got 1000000000000.0"),
    ({"n_heads": 10**12}, "--n-heads must be an integer in [1, 1024], got 1000000000000"),
    ({"lr": "fast"}, "'lr' (--lr): expected a number"),
])
def test_a_hand_edited_run_json_is_refused_before_anything_is_built(saved, tmp_path, capsys, change, message):
    """Issue 25, item 7: n_heads 1e12 tried a 2 PB allocation, -3 and glimpse_size 0 failed deep inside."""
    import json
    import shutil

    data, _, run = saved
    edited = tmp_path / "run"
    shutil.copytree(run, edited)
    record = json.loads((edited / "run.json").read_text())
    (edited / "run.json").write_text(json.dumps(record | {"config": record["config"] | change}))
    with pytest.raises(DataError) as error:
        load_module(edited)
    assert str(error.value).startswith(str(edited / "run.json")) and message in str(error.value), str(error.value)
    from tune_runs.cli import main

    assert main(["evaluate", "--data", str(data), "--run", str(edited), "--split", "val", "--out", str(tmp_path / "eval")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_evaluate_play_serve_and_report_run_no_code_from_a_booby_trapped_run(ray_local, tmp_path, monkeypatch, capsys):
    """A real `darp report` trial's run, its checkpoint's pickles replaced by ones whose __reduce__ creates
    a file: the constructor pickle is ignored by all four commands, the weights pickle refused by all four."""
    import io
    import json
    import sys
    import urllib.request

    from tune_runs.cli import main
    from policies.running.report import ReportConfig, train_and_evaluate, trial_train_config
    from policies.running.live_service import ServeConfig, start
    from sketch_env.data.generate import generate_dataset
    from tests.rl_fixtures import free_port, make_phase1_run

    data = generate_dataset(tmp_path / "data", n_photos=12, sketches_per_photo=2, seed=0)
    phase1 = make_phase1_run(tmp_path, data)  # serve embeds partial sketches with its network
    from policies.running.registry import TrainConfig

    train = TrainConfig(data=str(data), embedding=str(phase1), run_dir=str(tmp_path / "report"), iterations=1,
                        episodes_per_batch=8, num_envs_per_env_runner=4, n_glimpses=2, val_interval=1)
    cfg = ReportConfig(train=train, seeds=1, models=("darp",), split="val", n_traces=1)
    train_and_evaluate(cfg, "darp", 0)  # one report trial: trains, then evaluates the kept policy
    run = Path(trial_train_config(cfg, "darp", 0).run_dir)
    module_dir = best_module_dir(run)
    weights = module_dir / "module_state.pkl"
    marker = tmp_path / "ran"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))

    def four_commands() -> dict[str, object]:
        """What each command did: its exit code, or the error a report trial raised, or the served answer."""
        out = {
            "evaluate": main(["evaluate", "--data", str(data), "--run", str(run), "--split", "val",
                              "--out", str(tmp_path / "eval")]),
            "play": main(["play", "--data", str(data), "--embedding", str(phase1), "--policy", str(run),
                          "--split", "val", "--max-steps", "2", "--out", str(tmp_path / "frames")]),
        }
        try:
            out["report"] = train_and_evaluate(cfg, "darp", 0)["model"]
        except DataError as e:
            out["report"] = str(e)
        try:
            url = start(ServeConfig(data=data, run=run, split="val", port=free_port()))
        except DataError as e:
            out["serve"] = str(e)
        else:
            from ray import serve

            body = json.dumps({"strokes": [[[10, 10], [200, 300]]], "canvas": [512, 512]}).encode()
            request = urllib.request.Request(url + "api/query", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                out["serve"] = response.status
            serve.shutdown()
        return out

    def plant_consistently(path: Path) -> None:
        """Plant the trap and record the new file sizes in checkpoint.json, as someone replacing files would."""
        from policies.running import runs

        plant(path, marker)
        checkpoint = module_dir.parents[3]
        info = json.loads((checkpoint / runs.CHECKPOINT_INFO).read_text())
        runs.write_checkpoint_info(checkpoint, info["iteration"], info["validation"])

    plant_consistently(module_dir / "class_and_ctor_args.pkl")
    ignored = four_commands()
    assert ignored == {"evaluate": 0, "play": 0, "report": "darp", "serve": 200}, capsys.readouterr().err
    assert not marker.exists()

    plant_consistently(weights)
    trap = weights.read_bytes()
    capsys.readouterr()
    refused = four_commands()
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert refused["evaluate"] == 1 and refused["play"] == 1
    assert [line.split(": error: ")[0] for line in errors] == ["darp evaluate", "darp play"]
    for message in [line.split(": error: ", 1)[1] for line in errors] + [refused["report"], refused["serve"]]:
        assert message.startswith(str(weights)) and "refusing to load the pickle" in message, message
    assert weights.read_bytes() == trap, "the report trial must have read the trapped checkpoint, not replaced it"
    assert not marker.exists()
