"""Dataclass configs as `--kebab-case` command-line flags.

Each field of a config dataclass becomes a flag with its type, its default and, as help text,
the one-line docstring written under the field. Booleans become `--flag / --no-flag`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import cache


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source), inherited fields included
    (a config that extends another dataclass, e.g. `experiments.study.engines.EngineSettings`)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass `cls` (except `skip`)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse formats help with %
        tp = hints[f.name]
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(tp) is tuple:  # tuple[T, ...]: one or more values of type T
            parser.add_argument(flag, dest=f.name, nargs="+", type=typing.get_args(tp)[0], default=default, help=help_)
        else:
            conv = next((t for t in typing.get_args(tp) if t is not type(None)), tp) if typing.get_args(tp) else tp
            parser.add_argument(flag, dest=f.name, type=conv, default=default, help=help_)


def config_from_args(cls: type, args: argparse.Namespace, **overrides):
    """Build `cls` from parsed flags (fields missing from `args` keep their defaults)."""
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for k, v in kwargs.items():
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    kwargs.update(overrides)
    return cls(**kwargs)
