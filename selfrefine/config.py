"""Typed recipe configs. Each recipe's settings are one dataclass, the single source of its flags, defaults, help
and checks: the command line is generated from it (`parse`), a pipeline section is read into it (`from_mapping`),
and every value, whether typed after a flag, written in JSON or given as `key=value`, goes through the same check
(`coerce`), so a flag and a field cannot drift apart.

Precedence on a command line: defaults < `--config FILE` (a JSON object of settings) < flags < `key=value`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import Field, dataclass, field, fields
from typing import Any, Callable, Collection, Sequence, TypeVar

from .errors import UserError, fail
from .files import read_json
from .flags import Parser

S = TypeVar("S", bound="Settings")


class UsageError(UserError):
    """A setting missing or out of place for what was asked (eval.py --compare with a --model): on a command
    line it is reported as argparse reports a missing flag, with the usage hint."""


def setting(default: Any = None, help: str = "", *, parse: Callable[[str], Any] | None = None,
            choices: Sequence[str] | None = None, required: bool = False, repeat: bool = False,
            nargs: int | None = None, metavar: str | tuple[str, ...] | None = None, group: str | None = None) -> Any:
    """A field and its flag. `parse` reads and checks a value given as text (a `selfrefine.flags` type), `choices`
    names the allowed values, `repeat` collects a repeated flag into a list; a bool default makes a switch."""
    meta = {"help": help, "parse": parse, "choices": choices, "required": required, "repeat": repeat,
            "nargs": nargs, "metavar": metavar, "group": group}
    if repeat:
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def coerce(f: Field, value: Any) -> Any:
    """`value` (JSON, or text from the command line) as field `f` holds it; ValueError says what is wrong."""
    m = f.metadata
    if value is None and not m["repeat"] and not isinstance(f.default, bool):
        return None
    if m["repeat"] or m["nargs"]:
        items = value if isinstance(value, list) else [value] if m["repeat"] else None
        if items is None or (m["nargs"] and len(items) != m["nargs"]):
            raise ValueError(f"expected a list of {m['nargs']} values, got {value!r}")
        return [_coerce_one(f, v) for v in items]
    return _coerce_one(f, value)


def _coerce_one(f: Field, value: Any) -> Any:
    m = f.metadata
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(f.default, bool):
        if isinstance(value, bool):
            return value
        if value in ("true", "false"):
            return value == "true"
        raise ValueError(f"must be true or false, got {value!r}")
    if isinstance(value, (bool, dict, list)):
        raise ValueError(f"expected {'a number' if m['parse'] else 'a string'}, got {value!r}")
    text = str(value)
    if m["choices"] is not None and text not in m["choices"]:
        raise ValueError(f"must be one of {', '.join(m['choices'])}, got {text!r}")
    if m["parse"] is not None:
        try:
            return m["parse"](text)
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from None
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


@dataclass
class Settings:
    """Base of every recipe config: each field is checked on construction, then the rules between fields
    (`check`), so a config built by a library caller is held to the same rules as the command line's."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["required"] and value is None:
                fail(f"{flag_name(f.name)} is required")
            try:  # normalised too: a Path becomes its text, an int given for a float a float
                setattr(self, f.name, coerce(f, value))
            except ValueError as e:
                fail(f"setting {f.name}: {e}")
        self.check()

    def check(self) -> None:
        """Rules that involve more than one field (none here)."""

    @classmethod
    def field_map(cls) -> dict[str, Field]:
        return {f.name: f for f in fields(cls)}


def from_mapping(cls: type[S], mapping: Any, source: str, section: str, given: dict[str, Any] | None = None,
                 reserved: Collection[str] = ()) -> S:
    """A config from a pipeline section plus the values the pipeline sets itself (`given`; the section may set
    neither those nor the other `reserved` keys). A wrong key or value is one line naming file, section and key."""
    given = given or {}
    return cls(**checked_values(cls, mapping, source, f"section {section}", {*reserved, *given}), **given)


def checked_values(cls: type[Settings], mapping: Any, source: str, where: str,
                   reserved: set[str] = frozenset()) -> dict[str, Any]:
    """The settings of a JSON object, each checked as its flag would be; `reserved` keys are refused."""
    if not isinstance(mapping, dict):
        fail(f"{where} must be a JSON object", source)
    known, values = cls.field_map(), {}
    for key, value in mapping.items():
        if key not in known:
            fail(f"{where}: unknown key {key!r} (known: {', '.join(sorted(set(known) - reserved))})", source)
        if key in reserved:
            fail(f"{where}: key {key!r} is set by the pipeline itself", source)
        try:
            values[key] = coerce(known[key], value)
        except ValueError as e:
            fail(f"{where}: {key} {e}", source)
    return values


def parse_override(item: str) -> tuple[str, str]:
    """"sft.lr=2e-4" -> ("sft.lr", "2e-4")."""
    key, eq, value = item.partition("=")
    if not eq or not key:
        fail(f"expected key=value (e.g. lr=2e-4), got {item!r}")
    return key, value


def help_text(f: Field) -> str:
    """A flag's help with "(required)" or its default, so --help shows what a run gets without the flag. No default
    is shown for a switch (off), a setting unset by default, or one whose help already says its default."""
    m, default = f.metadata, f.default
    if m["required"]:
        return m["help"] + " (required)"
    unset = default is None or default is False or default == "" or callable(f.default_factory)
    if unset or "default:" in m["help"]:
        return m["help"]
    return f"{m['help']} (default: {default})"


def parser(cls: type[Settings], prog: str, description: str | None,
           formatter_class: type = argparse.HelpFormatter) -> Parser:
    """The command line of `cls`: a flag per field (defaults left out of the namespace, so the flags given can be
    told apart from the defaults), `--config FILE` and `key=value` overrides."""
    p = Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
               formatter_class=formatter_class)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        m = f.metadata
        where = p if m["group"] is None else groups.setdefault(m["group"], p.add_argument_group(m["group"]))
        text = help_text(f).replace("%", "%%")  # argparse reads % as a format
        if isinstance(f.default, bool):
            where.add_argument(flag_name(f.name), action="store_true", help=text)
            continue
        where.add_argument(flag_name(f.name), type=m["parse"], choices=m["choices"], nargs=m["nargs"],
                           action="append" if m["repeat"] else "store", metavar=m["metavar"], help=text)
    p.add_argument("--config", help="JSON object of these settings (names as the flags, with _); "
                                    "the flags and key=value override it")
    p.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                   help="set any setting, e.g. lr=2e-4 (applied after --config and the flags)")
    return p


def parse(cls: type[S], argv: list[str] | None, prog: str, description: str | None = None,
          formatter_class: type = argparse.HelpFormatter) -> S:
    """`cls` from a command line: defaults < --config < flags < key=value."""
    p = parser(cls, prog, description, formatter_class)
    given = vars(p.parse_intermixed_args(argv))
    path = given.pop("config", None)
    values = checked_values(cls, read_json(path), path, "--config") if path else {}
    known = cls.field_map()
    for item in given.pop("overrides", []):
        key, value = parse_override(item)
        if key not in known:
            p.error(f"{item}: unknown setting {key!r}")
        try:
            given[key] = coerce(known[key], value)
        except ValueError as e:
            p.error(f"{item}: {key} {e}")
    merged = {**values, **given}
    missing = [flag_name(f.name) for f in fields(cls) if f.metadata["required"] and merged.get(f.name) is None]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        return cls(**merged)
    except UsageError as e:
        p.error(e.message)
