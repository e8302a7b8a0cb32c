"""The generated `darp` command line (tune_runs/cli.py), driven through a toy command tree."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from sketch_env.data import DataError
from tune_runs import cli
from tune_runs.cli import arg, main

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

    f.write_text(json.dumps({"name": "a", "colour": "red"}))
    with pytest.raises(SystemExit, match=r"unknown keys \['colour'\] for ToyConfig"):
        main(["toy", "--config", str(f)])
    with pytest.raises(SystemExit, match="cannot read config file"):
        main(["toy", "--config", str(tmp_path / "missing.json")])


def test_missing_required_option(toy_commands):
    with pytest.raises(SystemExit, match="missing required option.*--name"):
        main(["toy", "--count", "2"])
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
