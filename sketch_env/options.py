"""Config fields and their values as the `darp` flags take them.

`arg` makes a config dataclass field with what the generated CLI (`tune_runs.cli`) shows: its help, whether it is
an everyday option (`--help`) or a further one (`--help-all` only), or a research switch set only in a --config file.
A value is checked by its config field's type (`checked_value`: true/false for a switch, an integer for an int,
null only where the option may be left unset); `checked_values` checks a whole mapping of field names, a composed
config's given flat or under its name. `tune_runs.cli` reads config files through it, `policies.running.trained`
rebuilds a trained run's TrainConfig through it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

EXPERIMENT = "experiment"  # field metadata: a research switch, set only in a --config file
ADVANCED = "advanced"  # field metadata: a flag `--help` only names (`--help-all` explains it)


def arg(default: Any = dataclasses.MISSING, help: str = "", hide: tuple[str, ...] = (), experiment: bool = False,
        advanced: bool = False, **kwargs) -> Any:
    """A config field with its help text for the generated CLI. `advanced`: a flag that `--help` only names, so the
    everyday options fit on one screen; `experiment`: a research switch whose verdict is measured, set only in a
    --config file (experiments/); `hide`: for a composed config, its fields that are not flags of this command."""
    metadata = {"help": help, "hide": tuple(hide), EXPERIMENT: experiment, ADVANCED: advanced}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def checked_values(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` (option values by field name, as in a config file: a composed config's flat or under its
    name) with every value checked and converted as its flag would be (`checked_value`). ConfigError
    naming `where` and the key for an unknown key or a value of the wrong type."""
    from sketch_env.errors import ConfigError  # here, not at import: `darp --help` imports this module

    hints = typing.get_type_hints(cls)
    composed = {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}
    types_of = _leaf_types(cls)
    unknown = sorted(k for k in data if k not in types_of and k not in composed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} for {cls.__name__}")
    out = {}
    for key, value in data.items():
        if key in composed:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key!r}: expected an object of {composed[key].__name__} options, got {value!r}")
            out[key] = checked_values(composed[key], value, f"{where}: {key}")
        else:
            out[key] = checked_value(types_of[key], value, f"{where}: {key!r} ({flag(key)})")
    return out


def _leaf_types(cls) -> dict[str, Any]:
    """Type of every option of config `cls` by name, composed configs' included (hidden ones too)."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            out |= _leaf_types(tp) if dataclasses.is_dataclass(tp) else {name: tp}
    return out


def checked_value(tp, value: Any, where: str) -> Any:
    """A JSON value for a field of type `tp` as its flag takes it: a switch true or false, an int an
    integer (not 10.7, "ten" or true), a float any number, a path or text a string, a choice one of its
    values, a list a list of such; null only for an optional field. ConfigError naming `where` otherwise."""
    from sketch_env.errors import ConfigError

    inner, optional = unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if value is None and optional:
        return None
    if origin is Literal:
        choices = typing.get_args(inner)
        if any(type(value) is type(c) and value == c for c in choices):
            return value
        raise ConfigError(f"{where}: expected one of {list(choices)}, got {json.dumps(value)}")
    if origin in (list, tuple):
        (item,) = typing.get_args(inner)[:1] or (str,)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {json.dumps(value)}")
        items = [checked_value(item, v, f"{where}, item {i + 1}") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        Path: lambda v: isinstance(v, str),
    }
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (a string)"}
    if inner not in ok:
        raise TypeError(f"unsupported option type {inner!r}")
    if not ok[inner](value):
        raise ConfigError(f"{where}: expected {expected[inner]}, got {json.dumps(value)}")
    return float(value) if inner is float else value


__all__ = ["ADVANCED", "EXPERIMENT", "arg", "checked_value", "checked_values", "flag", "unwrap_optional"]
