"""Command-line flags generated from a config dataclass's fields (`EngineConfig`'s, for workers).

Each field says in its metadata whether it is a flag: `field(default=..., metadata=flag(help))`,
or `metadata=not_a_flag(reason)` for a field set some other way (a service flag, the role, the
environment). A field that says neither is a `TypeError` when a parser is built, so a new field
cannot silently miss its flag.

The flag is the field's name in kebab case (`max_total_tokens` -> `--max-total-tokens`), plus any
older spellings kept as aliases; the type gives the parsing: a `Literal` its choices, `X | None`
an optional X, a bool defaulting to False `--flag`, any other bool `--flag/--no-flag`. Defaults
are the dataclass's own, so `options(parse_args([]))` builds the default config.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

_KEY = "cli"
_METAVARS: dict[type, str] = {int: "N", float: "X", str: "VALUE"}


@dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line."""

    help: str
    aliases: tuple[str, ...] = ()  # older spellings that keep working, listed first in --help
    roles: tuple[str, ...] | None = None  # the parsers that offer it (e.g. "prefill"); None: every one
    metavar: str | None = None  # default: N for ints, X for floats, VALUE for strings


@dataclass(frozen=True)
class NotAFlag:
    """A field deliberately left off the command line, and why (shown by tests and errors)."""

    reason: str


def flag(
    help: str,
    *,
    aliases: tuple[str, ...] = (),
    roles: tuple[str, ...] | None = None,
    metavar: str | None = None,
) -> dict[str, Any]:
    """Field metadata: this field is a flag."""
    return {_KEY: Flag(help, aliases, roles, metavar)}


def not_a_flag(reason: str) -> dict[str, Any]:
    """Field metadata: this field is set another way (`reason` says which)."""
    return {_KEY: NotAFlag(reason)}


def flag_fields(cls: type, role: str) -> list[tuple[dataclasses.Field[Any], Flag]]:
    """The fields of dataclass `cls` that are flags for `role`, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_KEY)
        if isinstance(spec, NotAFlag):
            continue
        if not isinstance(spec, Flag):
            raise TypeError(
                f"{cls.__name__}.{f.name} needs metadata=flag(help) or metadata=not_a_flag(reason)"
            )
        if spec.roles is None or role in spec.roles:
            out.append((f, spec))
    return out


def option_strings(f: dataclasses.Field[Any], spec: Flag) -> list[str]:
    """A field's flags: its aliases, then `--field-name`."""
    return [*spec.aliases, "--" + f.name.replace("_", "-")]


def add_arguments(group: argparse._ActionsContainer, cls: type, role: str) -> None:
    """Add a flag for each of `cls`'s flag fields for `role` to a parser or argument group."""
    hints = typing.get_type_hints(cls)
    for f, spec in flag_fields(cls, role):
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a flag needs a plain default (not a factory)")
        kind = _parsing(hints[f.name], f.default)
        if "type" in kind and "choices" not in kind:
            kind["metavar"] = spec.metavar or _METAVARS[kind["type"]]
        group.add_argument(
            *option_strings(f, spec), dest=f.name, default=f.default, help=_help(spec.help, f.default), **kind
        )


def options(args: argparse.Namespace, cls: type, role: str) -> dict[str, Any]:
    """The values of `cls`'s flag fields for `role` from parsed `args`, as keyword options."""
    return {f.name: getattr(args, f.name) for f, _ in flag_fields(cls, role)}


def _parsing(tp: Any, default: Any) -> dict[str, Any]:
    """add_argument's type/choices/action for a field annotated `tp`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"cannot make a flag of {tp}")
        tp = rest[0]
    if tp is bool:
        return {"action": "store_true"} if default is False else {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return {"type": type(choices[0]), "choices": choices}
    if tp in _METAVARS:
        return {"type": tp}
    raise TypeError(f"cannot make a flag of {tp}")


def _help(text: str, default: Any) -> str:
    text = text.replace("%", "%%")  # argparse %-formats help
    if default is None or isinstance(default, bool):
        return text  # the help says what None means; bools are off unless given
    return f"{text} (default: {default})"
