"""Command-line options derived from config dataclass fields, and a command's config from its recipe.

A field's flag, type, default and help come from the field itself (see :func:`viscon_hub.recipe.opt`),
so the CLI writes no default of its own. A flag's destination is the field's dotted path in the
config (``generate.engine.max_concurrency``); only the flags given on the command line are kept, and
they win over the recipe.

>>> import argparse
>>> from viscon_hub.build.merge import MergeConfig
>>> parser = argparse.ArgumentParser()
>>> paths = add_flags(parser, MergeConfig, ["configs", "dedup.threshold"])
>>> given = vars(parser.parse_args(["--dedup-threshold", "0.8"]))
>>> resolve(MergeConfig, None, ("merge",), overrides={p: given[p] for p in paths if p in given}).dedup.threshold
0.8
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING
from typing import Any, Literal

from viscon_hub.errors import ConfigError
from viscon_hub.recipe import field_at, from_mapping, read_recipe, set_path


def add_flags(parser: argparse.ArgumentParser, cls: type, entries: Sequence[Any]) -> list[str]:
    """Add an option per entry (a dotted field path, or ``(path, metadata changes)``); their paths."""
    return [_add_flag(parser, cls, entry) for entry in entries]


def resolve(
    cls: type,
    recipe: str | None,
    sections: Sequence[str],
    *,
    overrides: Mapping[str, Any],
    inherit: str | None = None,
) -> Any:
    """``cls`` from the ``sections`` of the ``recipe`` file (later ones win), then ``overrides`` on top.

    ``inherit`` names a field that takes the recipe's ``build.output`` when no section sets it (the
    publishing commands read the folder the build wrote).
    """
    data: dict[str, Any] = {}
    if recipe is not None:
        book = read_recipe(recipe)
        if not any(s in book for s in sections):
            have = ", ".join(book) or "none"
            raise ConfigError(f"recipe {recipe}: expected a section '{sections[-1]}'; got sections: {have}")
        if (
            inherit
            and "output" in book.get("build", {})
            and not any(inherit in book.get(s, {}) for s in sections)
        ):
            data[inherit] = book["build"]["output"]
        for s in sections:
            data.update(book.get(s, {}))
    for path, value in overrides.items():
        set_path(data, path, value)
    return from_mapping(cls, data, where=sections[-1])


def _base(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _text_type(tp: Any) -> Callable[[str], Any]:
    """Parse one command-line word as ``tp``; argparse turns a failure into exit status 2."""
    names = {int: "a whole number", float: "a number"}

    def parse(text: str) -> Any:
        if tp in names:
            try:
                return tp(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {names[tp]}, got {text!r}") from None
        return text

    return parse


def _add_flag(parser: argparse.ArgumentParser, cls: type, entry: Any) -> str:
    path, extra = (entry, {}) if isinstance(entry, str) else entry
    f, tp = field_at(cls, path)
    meta = {**f.metadata, **extra}
    flag = meta.get("flag") or "--" + path.rsplit(".", 1)[-1].replace("_", "-")
    default = f.default if f.default is not MISSING else None
    help_text = meta.get("help", "").replace("%", "%%")  # argparse formats help with %
    if default not in (None, (), False, True, "") and "(default" not in help_text:
        help_text += f" (default {default})"
    base = _base(tp)
    common = {"dest": path, "default": argparse.SUPPRESS, "help": help_text}
    metavar = meta.get("metavar") or flag.lstrip("-").upper().replace("-", "_")
    if base is bool:
        if meta.get("off"):
            parser.add_argument(flag, action="store_const", const=True, **common)
            parser.add_argument(
                meta["off"],
                action="store_const",
                const=False,
                dest=path,
                default=argparse.SUPPRESS,
                help=f"the opposite of {flag}",
            )
        else:
            parser.add_argument(flag, action="store_const", const=not default, **common)
        return path
    if typing.get_origin(base) is tuple:
        item = _text_type(typing.get_args(base)[0])
        if meta.get("sep"):
            sep = meta["sep"]
            parser.add_argument(
                flag,
                type=lambda t: [item(x.strip()) for x in t.split(sep) if x.strip()],
                metavar=metavar,
                **common,
            )
        else:
            parser.add_argument(flag, type=item, action="append", metavar=metavar, **common)
        return path
    if typing.get_origin(base) is Literal:
        parser.add_argument(flag, choices=typing.get_args(base), **common)
        return path
    parse = str if meta.get("size") else _text_type(base)
    parser.add_argument(flag, type=parse, metavar=metavar, **common)
    return path


__all__ = ["add_flags", "resolve"]
