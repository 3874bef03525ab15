"""Command-line options written once: as dataclass fields with their help.

A field made with :func:`option` is a setting of a run (its default, its type, its help) and a
command-line option at once; :func:`add_options` builds the argparse options of a dataclass and
:func:`from_args` the dataclass back from the parsed namespace. The flag is the field's name with
dashes (``eval_every`` -> ``--eval-every``); a bool that defaults to True becomes ``--no-NAME``.
A few lines over :func:`dataclasses.fields` rather than a parser library: the commands keep
argparse's behaviour and help output, subcommands stay lazily imported, and the dataclasses stay
plain (checkpoints store them as dicts).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Iterable, Optional, Sequence, Union

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, flag: Optional[str] = None, metavar: Optional[str] = None,
           choices: Union[Sequence, Callable[[], Sequence], None] = None, cli_default: Any = _MISSING,
           repeatable: bool = False, nargs: Union[str, int, None] = None, positional: bool = False,
           required: bool = False, default_factory: Any = _MISSING) -> Any:
    """A dataclass field that is also a command-line option.

    ``cli_default``: the parser's default when it differs from the field's (e.g. None, for a value
    the command computes from other options); ``choices`` may be a callable, evaluated when the
    parser is built; ``repeatable``: an ``append`` option (its values a tuple in the dataclass)."""
    meta = {"help": help, "flag": flag, "metavar": metavar, "choices": choices, "cli_default": cli_default,
            "repeatable": repeatable, "nargs": nargs, "positional": positional, "required": required}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": meta})


def _value_type(annotation) -> type:
    """int for ``Optional[int]``, str for a Literal of strings, and so on."""
    if typing.get_origin(annotation) is Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    if annotation in (tuple, list):  # values of a repeatable or multi-value option: strings
        return str
    if typing.get_origin(annotation) in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return args[0] if args else str
    return annotation


def add_options(parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup], cls: type,
                include: Optional[Iterable[str]] = None, defaults: Optional[dict] = None) -> None:
    """Adds an option for every :func:`option` field of ``cls`` (only those in ``include`` when
    given, in field order); ``defaults`` replaces parser defaults by field name."""
    hints = typing.get_type_hints(cls)
    wanted = None if include is None else set(include)
    for field in dataclasses.fields(cls):
        meta = field.metadata.get("option")
        if meta is None or (wanted is not None and field.name not in wanted):
            continue
        if defaults and field.name in defaults:
            default = defaults[field.name]
        elif meta["cli_default"] is not _MISSING:
            default = meta["cli_default"]
        elif field.default is not _MISSING:
            default = field.default
        elif field.default_factory is not _MISSING:
            default = field.default_factory()
        else:
            default = None
        value_type = _value_type(hints[field.name])
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        kwargs: dict = {"help": meta["help"]}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if value_type is bool and not meta["positional"]:
            if default:
                parser.add_argument(meta["flag"] or "--no-" + field.name.replace("_", "-"), dest=field.name,
                                    action="store_false", **kwargs)
            else:
                parser.add_argument(flag, dest=field.name, action="store_true", **kwargs)
            continue
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        if choices is not None:
            kwargs["choices"] = list(choices)
        if meta["repeatable"]:
            kwargs.update(action="append", default=list(default or []))
        else:
            kwargs.update(type=value_type, default=default)
        if meta["nargs"] is not None:
            kwargs["nargs"] = meta["nargs"]
        if meta["positional"]:
            kwargs.pop("default")
            parser.add_argument(field.name, **kwargs)
        else:
            if meta["required"]:
                kwargs["required"] = True
            parser.add_argument(flag, dest=field.name, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **values):
    """``cls`` from the parsed options of its fields (lists of repeatable or multi-value options
    become tuples where the field is a tuple), with ``values`` taking precedence."""
    hints = typing.get_type_hints(cls)
    found = {}
    for field in dataclasses.fields(cls):
        if field.name in values or not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        annotation = hints[field.name]
        if isinstance(value, list) and (annotation is tuple or typing.get_origin(annotation) is tuple):
            value = tuple(value)
        found[field.name] = value
    return cls(**{**found, **values})
