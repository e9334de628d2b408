"""Typed stage configs: one dataclass per stage, shared by the CLI, the jobs and the pipeline.

A field's default lives in its dataclass and nowhere else. ``option()`` documents a field; argparse
flags are built from the fields (``--field-name``, ``--flag/--no-flag`` for booleans); a YAML or JSON
file (``--config``) sets fields, and flags given on the command line override it. Each dataclass
validates itself in ``__post_init__`` through :func:`validate`, collecting every problem before raising.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem found."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,  # noqa: A002
           flag: str | None = None, cli: bool = True) -> Any:
    """A documented dataclass field. ``cli=False`` keeps it out of argparse (file/API only)."""
    metadata = {"help": help, "flag": flag, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def validate(config: object, checks: Sequence[tuple[bool, str]]) -> None:
    """Raise one :class:`ConfigError` listing each message whose condition is False."""
    problems = [message for ok, message in checks if not ok]
    if problems:
        name = type(config).__name__
        raise ConfigError(f"invalid {name}:\n  - " + "\n  - ".join(problems))


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a flag per field of ``cls``; flags default to "not given" so a config file is not overridden."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if default not in (None, "", dataclasses.MISSING) and not isinstance(default, bool):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = help_text + f" (default: {'on' if default else 'off'})"
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            kwargs.update(choices=choices, type=type(choices[0]))
        elif typing.get_origin(tp) in (list, tuple):
            (item,) = typing.get_args(tp)[:1]
            kwargs.update(nargs="*", type=item if item in (int, float, str) else str)
        elif tp in (int, float, str):
            kwargs["type"] = tp
        elif tp is dict or typing.get_origin(tp) is dict:
            kwargs["type"] = json.loads
            kwargs["metavar"] = "JSON"
        else:
            kwargs["type"] = str
        parser.add_argument(_flag(f), **kwargs)


def read_config_file(path: str | os.PathLike, section: str | None = None) -> dict:
    """Read a YAML or JSON config file; with ``section``, take that top-level key when present."""
    import yaml

    path = str(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) if not path.endswith(".json") else json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot parse: {err}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field names to values")
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return data


def config_from_dict(cls: type[C], values: dict, source: str = "config") -> C:
    """Build ``cls`` from a mapping, rejecting unknown keys by name (``my-key`` and ``my_key`` both work)."""
    names = {f.name for f in dataclasses.fields(cls)}
    clean = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(clean) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) for {cls.__name__}: {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    try:
        return cls(**clean)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None


def config_from_args(cls: type[C], args: argparse.Namespace, section: str | None = None) -> C:
    """Merge ``--config FILE`` (if the parser had it) with the flags given, flags winning."""
    values: dict = {}
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(read_config_file(config_path, section))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return config_from_dict(cls, values, source=config_path or "command line")


def config_to_dict(config: object) -> dict:
    """A JSON-safe dict of a config (for checkpoints, ``stats.json`` and job arguments)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def config_to_argv(config_or_values: object | dict, cls: type | None = None) -> list[str]:
    """Turn a config (or a mapping of its fields) into CLI flags, e.g. for a job's entrypoint."""
    values = config_to_dict(config_or_values) if dataclasses.is_dataclass(config_or_values) else dict(config_or_values)
    fields = {f.name: f for f in dataclasses.fields(cls or config_or_values)}
    argv: list[str] = []
    for name, value in values.items():
        name = name.replace("-", "_")
        f = fields.get(name)
        if f is None:
            raise ConfigError(f"unknown field {name!r}")
        if not f.metadata.get("cli", True) or value is None:
            continue
        flag = _flag(f)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def make_parser(prog: str, description: str, cls: type, with_config_file: bool = True) -> argparse.ArgumentParser:
    """A parser with ``--config FILE`` and one flag per config field."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if with_config_file:
        parser.add_argument("--config", help="YAML or JSON file setting any of the fields below; flags override it")
    add_config_args(parser, cls)
    return parser


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI body, turning expected user errors into one clear line and exit status 2."""
    from alpaca_ray.records import RecordError

    try:
        return main() or 0
    except (ConfigError, RecordError, UserError) as err:
        import sys

        print(f"error: {err}", file=sys.stderr)
        return 2


class UserError(RuntimeError):
    """A problem the user can fix (bad input, unreachable endpoint, wrong key); shown without a traceback."""
