"""The generated `darp` command line (tune_runs/cli.py), driven through a toy command tree."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from sketch_env.data import DataError
from sketch_env.options import arg
from tune_runs import cli
from tune_runs.cli import main

CALLS: list = []


@dataclass
class ToyConfig:
    """A toy command for the CLI tests."""

    name: str = arg(help="a required option")
    count: int = arg(3, "an int")
    ratio: float = arg(0.5, "a float")
    verbose: bool = arg(False, "a bool flag")
    mode: Literal["fast", "slow"] = arg("fast", "a choice")
    sizes: list[int] = arg([64, 256], "a list")
    shape: tuple[int, ...] = arg((2, 3), "a tuple")
    out: Path = arg(Path("runs/x"), "a path")
    limit: int | None = arg(None, "an optional int")
    research: bool = arg(False, "a research switch", experiment=True)
    rarely: int = arg(1, "an option few need", advanced=True)


def toy(cfg: ToyConfig) -> int:
    CALLS.append(cfg)
    if cfg.name == "bad-data":
        raise DataError("toy.pkl: sketch 3: empty")
    return 7 if cfg.name == "seven" else 0


@pytest.fixture
def toy_commands(monkeypatch):
    CALLS.clear()
    target = f"{__name__}:ToyConfig:toy"
    monkeypatch.setattr(cli, "COMMANDS", {"toy": (target, "run the toy"), "group": {"inner": (target, "the toy, nested")}})
    return CALLS


def run(argv) -> ToyConfig:
    CALLS.clear()
    assert main(argv) == 0
    (cfg,) = CALLS
    return cfg


def test_top_level_help_lists_the_real_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("data", "pretrain", "train", "evaluate", "sweep", "demo"):
        assert f"  {name}" in out
    assert main([]) == 2  # no command: usage, non-zero


def test_data_help_lists_the_data_commands(capsys):
    assert main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("generate", "import-qmul", "import-sketchy", "show", "info"):
        assert f"  {name}" in out


def test_every_data_command_has_its_config_and_function():
    for name, (target, _) in cli.COMMANDS["data"].items():
        cls, fn = cli._load(target)
        assert callable(fn) and cls.__dataclass_fields__, name


def test_data_command_help_shows_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "import-qmul", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--coords" in out and "--on-error {skip,fail}" in out and "--split {all,train,test}" in out


def test_defaults_and_types(toy_commands):
    cfg = run(["toy", "--name", "a"])
    assert cfg == ToyConfig(name="a")
    cfg = run(["toy", "--name", "a", "--count", "5", "--ratio", "0.25", "--out", "o/p", "--limit", "9"])
    assert (cfg.count, cfg.ratio, Path(cfg.out), cfg.limit) == (5, 0.25, Path("o/p"), 9)


def test_bool_flag(toy_commands):
    assert run(["toy", "--name", "a", "--verbose"]).verbose is True
    assert run(["toy", "--name", "a", "--no-verbose"]).verbose is False
    assert run(["toy", "--name", "a"]).verbose is False


def test_literal_choice(toy_commands, capsys):
    assert run(["toy", "--name", "a", "--mode", "slow"]).mode == "slow"
    with pytest.raises(SystemExit) as exit_:
        main(["toy", "--name", "a", "--mode", "medium"])
    assert exit_.value.code == 2 and "invalid choice: 'medium'" in capsys.readouterr().err


def test_list_and_tuple_flags(toy_commands, capsys):
    cfg = run(["toy", "--name", "a", "--sizes", "32", "64", "128", "--shape", "4", "5"])
    assert cfg.sizes == [32, 64, 128] and cfg.shape == (4, 5)
    with pytest.raises(SystemExit):
        main(["toy", "--name", "a", "--sizes", "big"])
    assert "invalid int value" in capsys.readouterr().err


def test_config_file_sets_fields_and_flags_override_it(toy_commands, tmp_path):
    f = tmp_path / "best.json"
    f.write_text(json.dumps({"name": "from-file", "count": 7, "mode": "slow", "shape": [1, 2, 3]}))
    cfg = run(["toy", "--config", str(f), "--count", "9"])
    assert (cfg.name, cfg.count, cfg.mode, cfg.shape) == ("from-file", 9, "slow", (1, 2, 3))


def test_a_research_switch_is_no_flag_but_a_config_key(toy_commands, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["toy", "--help"])
    help_text = capsys.readouterr().out
    assert "--research" not in help_text and "set only in a --config file" in help_text and "research" in help_text
    with pytest.raises(SystemExit):
        main(["toy", "--name", "x", "--research"])
    assert "unrecognized arguments: --research" in capsys.readouterr().err
    f = tmp_path / "experiment.json"
    f.write_text(json.dumps({"research": True}))
    assert run(["toy", "--name", "x", "--config", str(f)]).research is True


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.json")), ids=lambda p: p.name)
def test_every_experiment_config_is_a_valid_train_or_pretrain_config(path):
    from policies.phase1.training import Phase1Config
    from sketch_env.options import checked_values
    from policies.running.registry import TrainConfig

    data = json.loads(path.read_text())
    fits = []
    for cls in (TrainConfig, Phase1Config):
        try:
            fits.append(checked_values(cls, data, str(path)))
        except DataError:
            continue
    assert fits, f"{path.name} is neither a darp train nor a darp pretrain config"


def test_an_advanced_option_is_a_flag_that_only_help_all_explains(toy_commands, capsys):
    with pytest.raises(SystemExit):
        main(["toy", "--help"])
    short = capsys.readouterr().out
    assert "an option few need" not in short and "--help-all: --rarely" in short
    assert main(["toy", "--help-all"]) == 0
    full = capsys.readouterr().out
    assert "--rarely N" in full and "an option few need (default: 1)" in full and "--research" not in full
    assert run(["toy", "--name", "x", "--rarely", "5"]).rarely == 5


def test_train_and_pretrain_help_fit_on_one_screen(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    for command in ("train", "pretrain"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) <= 60, f"darp {command} --help: {len(lines)} lines"


def test_train_and_pretrain_help_list_everyday_options_only(capsys):
    for command, research in (("train", ("--cell", "--eval-heads", "--snap-to-ink", "--retina-encoder")),
                              ("pretrain", ("--tta-flip", "--stroke-augment", "--pen-widths"))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert not [flag for flag in research if flag in out], out


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_config_file_errors_are_one_line(toy_commands, tmp_path, capsys):
    f = tmp_path / "best.json"
    f.write_text(json.dumps({"name": "a", "colour": "red"}))
    assert main(["toy", "--config", str(f)]) == 1
    assert "unknown keys ['colour'] for ToyConfig" in error_line(capsys)
    assert main(["toy", "--config", str(tmp_path / "missing.json")]) == 1
    assert "cannot read config file" in error_line(capsys)
    assert CALLS == []


@pytest.mark.parametrize("key, value, expected", [
    ("verbose", "false", 'expected true or false, got "false"'),  # a truthy string acted as the switch
    ("verbose", 0, "expected true or false, got 0"),
    ("count", "ten", 'expected an integer, got "ten"'),
    ("count", 10.7, "expected an integer, got 10.7"),
    ("count", 1e12, "expected an integer, got 1000000000000.0"),
    ("count", None, "expected an integer, got null"),
    ("count", True, "expected an integer, got true"),
    ("ratio", "0.5", 'expected a number, got "0.5"'),
    ("mode", "medium", "expected one of ['fast', 'slow'], got \"medium\""),
    ("sizes", 64, "expected a list, got 64"),
    ("sizes", [64, "big"], 'item 2: expected an integer, got "big"'),
    ("out", 3, "expected a path (a string), got 3"),
])
def test_config_file_values_are_checked_like_flags(toy_commands, tmp_path, capsys, key, value, expected):
    """Issue 25, item 1: {"force": "false"} in a config file acted as --force."""
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"name": "a", key: value}))
    assert main(["toy", "--config", str(f)]) == 1
    line = error_line(capsys)
    assert line.startswith(f"darp toy: error: {f}: '{key}' (--{key})") and expected in line, line
    assert CALLS == []


def test_config_file_null_is_allowed_where_the_option_may_be_unset(toy_commands, tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"name": "a", "limit": None, "ratio": 2, "shape": [4, 5]}))
    cfg = run(["toy", "--config", str(f)])
    assert cfg.limit is None and cfg.ratio == 2.0 and isinstance(cfg.ratio, float) and cfg.shape == (4, 5)


def test_a_real_commands_config_file_is_checked_before_it_runs(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"force": "false", "photos": 2}))
    assert main(["data", "generate", "--out", str(out), "--config", str(f)]) == 1
    assert "'force' (--force): expected true or false" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_missing_required_option(toy_commands, capsys):
    assert main(["toy", "--count", "2"]) == 1
    assert "missing required option(s): --name" in error_line(capsys)
    assert CALLS == []


def test_unknown_command(toy_commands, capsys):
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert main(["group", "nope"]) == 2
    err = capsys.readouterr().err
    assert "darp group: unknown command 'nope'" in err and "inner" in err


def test_nested_command_exit_status_and_data_errors(toy_commands, capsys):
    assert run(["group", "inner", "--name", "x"]).name == "x"
    assert main(["toy", "--name", "seven"]) == 7
    assert main(["toy", "--name", "bad-data"]) == 1
    assert "darp toy: error: toy.pkl: sketch 3: empty" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["data", "generate", "--photos", "0"], "--photos must be in [2, 10000]"),
    (["data", "generate", "--test-fraction", "1.5"], "--test-fraction must be in [0, 1), got 1.5"),
    (["data", "show", "--size", "0"], "--size must be in [16, 2048] pixels, got 0"),
    (["pretrain", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["pretrain", "--batch-size", "0"], "--batch-size must be >= 2, got 0"),
    (["pretrain", "--lr", "nan"], "--lr must be a number > 0, got nan"),
    (["pretrain", "--image-size", "3"], "--image-size must be in [16, 512] pixels, got 3"),
    (["train", "--n-heads", "-3"], "--n-heads must be an integer in [1, 1024], got -3"),
    (["train", "--glimpse-size", "0"], "--glimpse-size must be an integer in [1, --glimpse-image-size], got 0"),
    (["train", "--lr", "inf"], "--lr must be a number > 0, got inf"),
    (["evaluate", "--level-batch", "0"], "--level-batch and --num-threads must be >= 1"),
    (["play", "--max-steps", "0"], "--max-steps must be >= 1, got 0"),
])
def test_option_values_out_of_range_are_one_line_errors(tmp_path, capsys, argv, message):
    """Issue 25, item 7: these arrived as tracebacks (the project's own "--epochs must be >= 1" too)."""
    required = {"generate": ["--out"], "show": ["--data"], "pretrain": ["--data", "--run-dir"],
                "train": ["--data", "--embedding", "--run-dir"], "evaluate": ["--data", "--run"],
                "play": ["--data", "--embedding"]}
    command = argv[1] if argv[0] == "data" else argv[0]
    filled = [x for flag in required[command] for x in (flag, str(tmp_path / flag.strip("-")))]
    assert main(argv + filled) == 1
    line = error_line(capsys)
    assert message in line, line
    assert list(tmp_path.iterdir()) == [], "nothing is written"
