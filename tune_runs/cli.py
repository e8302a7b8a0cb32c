"""The `darp` command line, generated from each subcommand's config dataclass.

Every subcommand is a config dataclass (fields with defaults that work and a `help` in their
metadata, see `arg`) and a function taking that config, in a module of `tune_runs`. This file only knows the tree of
names; modules are imported when their command is chosen, so `darp --help` stays instant.

Any subcommand also takes `--config FILE.json`: the file's keys set the dataclass fields, and flags
given on the command line override them (how `darp sweep`'s best config is re-used by `darp train`).
A file's values are checked as their flags would be (`sketch_env.options.checked_value`: true/false for a switch, an
integer for an int, null only where the option may be left unset), and a config's `check()` (its
ranges) runs before its command, for flags and files alike.

Errors are raised below as `DataError` (bad input, refused output; `ConfigError` for an option value)
or `RunStopped` (a run that failed or was interrupted); `main` prints them as one line, exit status 1.

`--help` explains the everyday options and only names the others: a field marked `advanced`
(`arg(..., advanced=True)`) is a flag that `--help-all` explains; a field marked `experiment` is a research switch
whose verdict is measured (README, experiments/README.md): no flag, only a key of a `--config` file
(experiments/*.json name the recipes).

A field whose type is itself a config dataclass composes it: its fields become flags of the command
(`darp sweep` takes every `darp train` option), except the ones its `hide` names (the command sets
those itself); a config file gives them flat or under the field's name.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall 4-5x whenever anything else runs on a 2-core machine;
# passive waiting costs nothing when idle. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses
import importlib
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from sketch_env.options import ADVANCED, EXPERIMENT, checked_values, flag, unwrap_optional

# name -> ("module:ConfigClass:function", one-line help); nested dicts are command groups.
COMMANDS: dict[str, Any] = {
    "data": {
        "generate": ("tune_runs.data_cmd:GenerateConfig:generate", "generate the built-in fine-grained chair data set"),
        "import-qmul": ("tune_runs.data_cmd:ImportQMULConfig:import_qmul", "import QMUL Chair/Shoe-V2 coordinate pickles + photos"),
        "import-sketchy": ("tune_runs.data_cmd:ImportSketchyConfig:import_sketchy", "import Sketchy SVG sketches + photos"),
        "show": ("tune_runs.data_cmd:ShowConfig:show", "draw the 17 partial sketches of one sketch beside its photo"),
        "info": ("tune_runs.data_cmd:InfoConfig:info", "print what a data set directory holds"),
    },
    "pretrain": ("tune_runs.pretrain:PretrainConfig:run", "phase 1: train the triplet embedding network and export embeddings"),
    "train": ("tune_runs.train:TrainConfig:run", "phase 2: train DARP (or a baseline) with RLlib"),
    "evaluate": ("tune_runs.evaluate:EvaluateConfig:run", "evaluate a run on a split: metrics.json, curve.png"),
    "calibrate": ("tune_runs.calibrate:CalibrateConfig:run", "fit a run's confidence (when to stop drawing) on the val split"),
    "play": ("tune_runs.play:PlayConfig:run", "step one episode of the environment by hand in the terminal"),
    "sweep": ("tune_runs.sweep:SweepConfig:run", "Ray Tune search over DARP's std schedule"),
    "report": ("tune_runs.report:ReportConfig:run", "train + evaluate all models over seeds: the results table"),
    "demo": ("tune_runs.demo:DemoConfig:run", "the whole pipeline on the built-in data set (the README's first command)"),
    "serve": ("tune_runs.serve:ServeConfig:run", "live on-the-fly retrieval in the browser (Ray Serve)"),
    "embed-photos": ("tune_runs.embed_photos:EmbedPhotosConfig:run",
                     "embed a photo collection on Ray workers into Parquet shards (a gallery for evaluate/serve)"),
}


def _options(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of every flag of config `cls`: its own fields, composed configs' fields in place."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            hidden = set(f.metadata.get("hide", ()))
            out += [(sub, tp) for sub, tp in _options(hints[f.name]) if sub.name not in hidden]
        else:
            out.append((f, hints[f.name]))
    return out


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _load(target: str):
    module_name, cls_name, fn_name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name), getattr(module, fn_name)


def _metavar(f: dataclasses.Field, tp) -> str:
    """A short placeholder for the flag's value: N (an integer), X (a number), PATH or TEXT."""
    if tp is int:
        return "N"
    if tp is float:
        return "X"
    return "PATH" if tp is Path or any(w in f.name for w in PATH_WORDS) else "TEXT"


PATH_WORDS = ("data", "dir", "embedding", "out", "weights", "gallery", "photos", "coords", "svgs", "file")


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp, shown: bool = True) -> None:
    """Flag `--NAME` for field `f`; `shown` False: parsed but left out of the help."""
    tp, optional = unwrap_optional(tp)
    help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
    required = _required(f)
    default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
    default_text = str(default).replace("%", "%%")
    kw: dict[str, Any] = {"dest": f.name, "help": help_text if required or default is None else f"{help_text} (default: {default_text})"}
    if not shown:
        kw["help"] = argparse.SUPPRESS
    origin = typing.get_origin(tp)
    if tp is bool:
        parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, **kw)
        return
    if origin is Literal:
        choices = list(typing.get_args(tp))
        kw.update(choices=choices, type=type(choices[0]))
    elif origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        kw.update(nargs="+", type=inner if inner is not Path else str, metavar=_metavar(f, inner))
    elif tp in (int, float, str, Path):
        kw.update(type=str if tp is Path else tp, metavar=_metavar(f, tp))
    else:
        raise TypeError(f"config field {f.name}: unsupported type {tp!r} for the CLI")
    parser.add_argument(flag(f.name), default=argparse.SUPPRESS, **kw)


def build_config(cls, values: dict[str, Any], config_file: str | None = None):
    """Instantiate config `cls` from a JSON file's keys overridden by command-line values.

    DataError naming the file for one that is missing, unreadable or not a JSON object; ConfigError naming the
    file and the key for keys `cls` does not know or values its flags would not take."""
    from sketch_env.atomic import read_json_object
    from sketch_env.errors import ConfigError

    merged: dict[str, Any] = {}
    if config_file:
        data = read_json_object(config_file, f"cannot read config file {config_file}: no such file")
        merged.update(checked_values(cls, data, config_file))
    merged.update(values)
    missing = [flag(f.name) for f, _ in _options(cls) if f.name not in merged and _required(f)]
    if missing:
        raise ConfigError(f"missing required option(s): {' '.join(missing)}")
    return _instantiate(cls, merged)


def _instantiate(cls, values: dict[str, Any]):
    """cls from flat option values (a composed config's given flat or as a dict under its name)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested = values.get(f.name) if isinstance(values.get(f.name), dict) else {}
            own = {sub.name for sub in dataclasses.fields(tp)}
            kwargs[f.name] = _instantiate(tp, {k: v for k, v in values.items() if k in own} | nested)
        elif f.name in values:
            value = values[f.name]
            inner, _ = unwrap_optional(tp)
            kwargs[f.name] = tuple(value) if typing.get_origin(inner) is tuple and isinstance(value, list) else value
    return cls(**kwargs)


HELP_ALL = "--help-all"


def _parser_for(cls, prog: str, help_line: str, show_all: bool = False) -> argparse.ArgumentParser:
    """The command's parser; its help explains the everyday options (`show_all`: the advanced ones too) and
    names the rest."""
    options = _options(cls)
    advanced = [flag(f.name) for f, _ in options if f.metadata.get(ADVANCED) and not f.metadata.get(EXPERIMENT)]
    experiments = [f.name for f, _ in options if f.metadata.get(EXPERIMENT)]
    epilog = []
    if advanced and not show_all:
        epilog.append(f"more options, explained by {prog} {HELP_ALL}: " + " ".join(advanced))
    if experiments:
        epilog.append("research switches, set only in a --config file (see experiments/README.md): " + ", ".join(experiments))
    parser = argparse.ArgumentParser(
        prog=prog, usage=f"{prog} [options]", description=(cls.__doc__ or help_line).strip(),
        epilog="\n\n".join(epilog) or None,
        formatter_class=lambda prog: _Formatter(prog, max_help_position=30))
    for f, tp in options:
        if not f.metadata.get(EXPERIMENT):
            _add_field(parser, f, tp, shown=show_all or not f.metadata.get(ADVANCED))
    parser.add_argument("--config", dest="__config", metavar="FILE.json", default=None,
                        help="JSON file with option values; flags given here override it")
    if advanced:
        parser.add_argument(HELP_ALL, action="store_true", dest="__help_all", help="show every option and exit")
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help with the epilog's paragraphs kept apart and each wrapped to the terminal."""

    def _fill_text(self, text, width, indent):
        import textwrap

        return "\n\n".join(textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent,
                                          break_on_hyphens=False)
                            for p in text.split("\n\n"))


def _usage(tree: dict, prog: str) -> str:
    width = max(len(n) for n in tree)
    lines = [f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for its options)", "", "commands:"]
    for name, entry in tree.items():
        text = entry[1] if isinstance(entry, tuple) else "commands: " + ", ".join(entry)
        lines.append(f"  {name.ljust(width)}  {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tree: Any = COMMANDS
    prog = "darp"
    while isinstance(tree, dict):
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(tree, prog))
            return 0 if argv else 2
        name = argv.pop(0)
        if name not in tree:
            print(f"{prog}: unknown command {name!r}\n\n{_usage(tree, prog)}", file=sys.stderr)
            return 2
        tree, prog = tree[name], f"{prog} {name}"
    target, help_line = tree
    cls, fn = _load(target)
    if HELP_ALL in argv:
        _parser_for(cls, prog, help_line, show_all=True).print_help()
        return 0
    ns = vars(_parser_for(cls, prog, help_line).parse_args(argv))
    config_file = ns.pop("__config", None)
    ns.pop("__help_all", None)
    from sketch_env.errors import DataError, RunStopped

    try:
        config = build_config(cls, ns, config_file)
        if callable(getattr(config, "check", None)):
            config.check()
        result = fn(config)
    except (DataError, RunStopped) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
