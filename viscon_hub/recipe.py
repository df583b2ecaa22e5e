"""One loader for every config: a YAML recipe (or CLI flags) into the frozen config dataclasses.

A recipe is a mapping of command name to that command's options, e.g. ``build: {source: ..., dedup:
{threshold: 0.9}}``; nested mappings fill nested configs, lists fill tuples, sizes such as ``500MB``
fill the fields that take sizes. A default lives only in its dataclass field; :func:`opt` attaches the
help text (and the flag name, when it is not the field's own) that the CLI derives its options from.
An unknown key or a wrong type is a :class:`~viscon_hub.errors.ConfigError` of one line naming the key,
what was expected and what arrived.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True, slots=True, kw_only=True)
... class Demo:
...     name: str = opt("x", "a name")
...     sizes: tuple[int, ...] = opt((), "some numbers")
>>> from_mapping(Demo, {"sizes": [1, 2]})
Demo(name='x', sizes=(1, 2))
>>> from_mapping(Demo, {"nmae": "y"}, where="demo")
Traceback (most recent call last):
...
viscon_hub.errors.ConfigError: demo.nmae: unknown key; expected one of name, sizes; got 'y' (str)
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

from viscon_hub.errors import ConfigError, redact

SECTIONS = ("prepare", "generate", "build", "export", "card", "push", "release", "cache")
"""Top-level keys a recipe may hold: one per command that runs a stage."""

MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_NODES = 10_000

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def opt(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Any = MISSING,
    flag: str | None = None,
    off: str | None = None,
    metavar: str | None = None,
    sep: str | None = None,
    size: bool = False,
    local: bool = False,
) -> Any:
    """A dataclass field with what the CLI and the recipe loader need to know about it.

    ``flag``: the option's spelling when it is not ``--field-name``; ``off``: for a ``bool | None``
    field, the flag that sets it False (``flag`` sets it True); ``sep``: a tuple field given as one
    separated string on the command line (without it the flag repeats); ``size``: an int of bytes that
    also takes ``500MB``; ``local``: a machine-specific value (a path) kept out of ``viscon_build.json``.
    """
    meta = {
        "help": help,
        "flag": flag,
        "off": off,
        "metavar": metavar,
        "sep": sep,
        "size": size,
        "local": local,
    }
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def parse_size(value: str | int) -> int:
    """Bytes of a size such as ``500MB``, ``200KB``, ``1GiB`` or a plain number of bytes (> 0).

    >>> parse_size("500MB"), parse_size("1KiB"), parse_size(7)
    (500000000, 1024, 7)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m[2].upper() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ConfigError(
                f"cannot read the size {value!r}; expected a number with an optional unit "
                f"({', '.join(u for u in _SIZE_UNITS if u)}), e.g. 500MB or 200KB"
            )
        n = int(float(m[1]) * _SIZE_UNITS[unit])
    if n <= 0:
        raise ConfigError(f"a size must be above 0 bytes; got {value!r}")
    return n


def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class (``from __future__ import annotations`` included)."""
    return typing.get_type_hints(cls)


def describe(tp: Any) -> str:
    """What a type expects, in words, for error messages and help."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _arrived(value: Any) -> str:
    shown = redact(repr(value), limit=80)
    return f"{shown} ({type(value).__name__})" if not isinstance(value, (dict, list)) else shown


class _NoMatch(Exception):
    pass


def coerce(value: Any, tp: Any, *, key: str, size: bool = False) -> Any:
    """``value`` (from YAML) as type ``tp``; a ConfigError naming ``key`` when it does not fit."""
    try:
        return _coerce(value, tp, key=key, size=size)
    except _NoMatch:
        raise ConfigError(f"{key}: expected {describe(tp)}; got {_arrived(value)}") from None


def _coerce(value: Any, tp: Any, *, key: str, size: bool) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise _NoMatch
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key=key, size=size)
            except _NoMatch:
                continue
        raise _NoMatch
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise _NoMatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _NoMatch
        item = typing.get_args(tp)[0]
        return tuple(coerce(v, item, key=f"{key}[{i}]") for i, v in enumerate(value))
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _NoMatch
        return from_mapping(tp, value, where=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _NoMatch
    if tp is int:
        if size and isinstance(value, str):
            return parse_size(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _NoMatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _NoMatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _NoMatch
    if tp is Any:
        return value
    raise _NoMatch


def from_mapping(cls: type, data: Mapping[str, Any], *, where: str = "") -> Any:
    """An instance of the config dataclass ``cls`` from a mapping of its field names (nested ones too)."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where or cls.__name__}: expected a mapping of option to value; got {_arrived(data)}"
        )
    known = {f.name: f for f in fields(cls) if f.init}
    types_ = hints(cls)
    values: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise ConfigError(
                f"{redact(path, limit=120)}: unknown key; expected one of {', '.join(known)}; got {_arrived(value)}"
            )
        f = known[key]
        values[key] = coerce(value, types_[key], key=path, size=bool(f.metadata.get("size")))
    for name, f in known.items():
        if name not in values and f.default is MISSING and f.default_factory is MISSING:
            flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
            raise ConfigError(
                f"{where + '.' if where else ''}{name}: expected {describe(types_[name])} (flag {flag}); got nothing"
            )
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def to_mapping(config: Any, *, portable: bool = False) -> dict[str, Any]:
    """The fields of ``config`` as plain YAML/JSON values (tuples as lists, nested configs as mappings).

    Credentials in URLs and token-shaped strings are removed; with ``portable`` the machine-specific
    fields (paths marked ``local``) are left out, so the record is the same on every machine.
    """
    from viscon_hub.resources import PACKAGE_DATA

    bundled = str(PACKAGE_DATA / "cache")

    def plain(value: Any) -> Any:
        if is_dataclass(value):
            return to_mapping(value, portable=portable)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, str):
            return "bundled" if value == bundled else redact(value, limit=10_000)
        return value

    out: dict[str, Any] = {}
    for f in fields(config):
        if not f.init or (portable and f.metadata.get("local")):
            continue
        out[f.name] = plain(getattr(config, f.name))
    return out


class _Loader:
    """YAML's safe loader with YAML 1.2 booleans: ``on``, ``off``, ``yes`` and ``no`` stay strings.

    (``on`` is a field name, ``relevance.on``; YAML 1.1 would read that key as ``True``.)
    """

    _cls: Any = None

    @classmethod
    def load(cls, text: str, path: str) -> Any:
        import yaml

        if cls._cls is None:

            class Strict(yaml.SafeLoader):
                pass

            bool_tag = "tag:yaml.org,2002:bool"
            Strict.yaml_implicit_resolvers = {
                first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
                for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
            }
            Strict.add_implicit_resolver(
                bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
            )
            cls._cls = Strict
        try:
            return yaml.load(text, Loader=cls._cls)  # noqa: S506 - a SafeLoader subclass
        except RecursionError:
            raise ConfigError(f"recipe {path}: nested too deep to read") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"recipe {path}: not valid YAML{where}: {problem}") from None


def _check_shape(data: Any, path: str) -> None:
    """Refuse a document deeper than MAX_DEPTH or larger than MAX_NODES once its aliases are expanded."""
    budget = [MAX_NODES]
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(
                f"recipe {path}: expected at most {MAX_NODES} values (anchors expanded); got more"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(f"recipe {path}: expected at most {MAX_DEPTH} levels of nesting; got more")
        if isinstance(node, dict):
            for k, v in node.items():
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping of section -> options of a YAML recipe file, checked for shape and section names."""
    shown = str(path)
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise ConfigError(f"recipe {shown}: expected a YAML file; got a folder or special file")
        if size > MAX_RECIPE_BYTES:
            raise ConfigError(f"recipe {shown}: expected at most {MAX_RECIPE_BYTES} bytes; got {size}")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"recipe {shown}: expected a YAML file; got no such file") from None
    except OSError as e:
        raise ConfigError(f"recipe {shown}: cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"recipe {shown}: expected UTF-8 text; got byte 0x{raw[e.start]:02x} at offset {e.start}"
        ) from None
    data = _Loader.load(text, shown)
    if data is None:
        data = {}
    _check_shape(data, shown)
    if not isinstance(data, dict):
        raise ConfigError(
            f"recipe {shown}: expected a mapping of command ({', '.join(SECTIONS)}) to options; got {_arrived(data)}"
        )
    for key, value in data.items():
        if key not in SECTIONS:
            raise ConfigError(
                f"recipe {shown}: {redact(key, limit=80)}: unknown section; expected one of {', '.join(SECTIONS)}"
            )
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"recipe {shown}: {key}: expected a mapping of option to value; got {_arrived(value)}"
            )
    return {k: v or {} for k, v in data.items()}


def load(
    cls: type, path: str | os.PathLike[str] | None, section: str, *, overrides: Mapping[str, Any] = ()
) -> Any:
    """``cls`` from the ``section`` of the recipe at ``path`` (none: defaults), then ``overrides`` on top.

    ``overrides`` maps dotted field paths (``dedup.threshold``) to values, e.g. the flags given on the
    command line; they win over the recipe.
    """
    data: dict[str, Any] = {}
    if path is not None:
        recipe = read_recipe(path)
        if section not in recipe:
            have = ", ".join(recipe) or "none"
            raise ConfigError(f"recipe {path}: expected a section '{section}'; got sections: {have}")
        data = _deep_copy(recipe[section])
    for dotted, value in dict(overrides).items():
        set_path(data, dotted, value)
    return from_mapping(cls, data, where=section)


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings, making the inner mappings as needed."""
    *parents, last = dotted.split(".")
    node = data
    for name in parents:
        if not isinstance(node.get(name), dict):
            node[name] = {}
        node = node[name]
    node[last] = value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def field_at(cls: type, dotted: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field (and its resolved type) at a dotted path below ``cls``."""
    *parents, last = dotted.split(".")
    for name in parents:
        cls = _strip_optional(hints(cls)[name])
    f = next((f for f in fields(cls) if f.name == last), None)
    if f is None:
        raise KeyError(f"{cls.__name__} has no field {last!r}")
    return f, hints(cls)[last]


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


__all__ = [
    "SECTIONS",
    "coerce",
    "field_at",
    "from_mapping",
    "load",
    "opt",
    "parse_size",
    "read_recipe",
    "to_mapping",
]
