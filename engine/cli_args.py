"""Command-line flags generated from `EngineConfig`'s fields, so that the flags, their help
and their defaults are the config's and cannot drift from it.

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    config = engine_config(parser.parse_args())

A field `max_num_seqs` is the flag `--max-num-seqs`; its `Meta` gives the help text and,
in `extra`, the flag's group and, for a feature that is on by default, the name of the
flag that turns it off (`--no-prefix-caching`). Bounds are checked by `EngineConfig`
itself when the parsed values build it, with the same messages as `LLM(...)`.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec.inspect as mi

from splitinfer.engine.config import EngineConfig
from splitinfer.protocol.structs import value_type


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `EngineConfig` field to `parser` (grouped as the fields say)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in mi.type_info(EngineConfig).fields:
        meta = field.type if isinstance(field.type, mi.Metadata) else None
        help_text = (meta.extra_json_schema or {}).get("description", "") if meta else ""
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: a '{%' is text
        extra = (meta.extra or {}) if meta else {}
        group_name = extra.get("group")
        target = parser if group_name is None else groups.setdefault(group_name, parser.add_argument_group(group_name))
        _add_flag(target, field, value_type(field.type), help_text, extra.get("flag"))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The `EngineConfig` of parsed flags (raises `ConfigError` naming a field out of bounds)."""
    return EngineConfig(**{name: getattr(args, name) for name in EngineConfig.__struct_fields__})


def _add_flag(target: Any, field: mi.Field, kind: mi.Type, help_text: str, flag: str | None) -> None:
    name = field.name
    if isinstance(kind, mi.BoolType):
        if field.default is True:  # a feature on by default: its flag turns it off
            target.add_argument(
                flag or f"--no-{name.replace('_', '-')}", action="store_false", dest=name, help=help_text
            )
        else:
            target.add_argument(flag or f"--{name.replace('_', '-')}", action="store_true", dest=name, help=help_text)
        return
    options: dict[str, Any] = {"dest": name, "help": help_text}
    if field.required:
        options["required"] = True
    else:
        options["default"] = field.default
        if field.default is not None:
            options["help"] = f"{help_text} (default: %(default)s)"
    if isinstance(kind, mi.LiteralType):
        options["choices"] = list(kind.values)
    elif isinstance(kind, mi.IntType):
        options["type"] = int
    elif isinstance(kind, mi.FloatType):
        options["type"] = float
    target.add_argument(flag or f"--{name.replace('_', '-')}", **options)
