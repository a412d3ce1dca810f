"""Recipe options: one documented dataclass, filled from ``--config FILE.yaml`` and then ``--key value`` overrides.

Why not plain argparse: recipes keep all their settings in YAML files (one per task or model) and users override a
few on the command line, including nested per-method options (``--method_options.gsoft.block_size 16``). The
dataclass stays the single place where an option is declared, typed, documented and bounded: a field's ``metadata``
holds its help text and the values it allows (``min``, ``max``, ``above``, ``below``, ``choices``), which
:func:`check_options` enforces from the dataclass's ``__post_init__``, so a bad value is refused when the options are
made, before a recipe reads data or writes anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")

_NONE_WORDS = {"none", "null", "~", ""}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class _ArgError(Exception):
    pass


def _fail(prog: str, message: str) -> typing.NoReturn:
    raise SystemExit(f"{prog}: error: {message}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        return tp, type(None) in typing.get_args(tp)
    return tp, tp is Any


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        name = "|".join(str(a) for a in typing.get_args(inner))
    elif origin in (list, tuple):
        (item,) = typing.get_args(inner)[:1] or (Any,)
        name = f"list[{getattr(item, '__name__', item)}]"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def _coerce(value: Any, tp: Any, from_cli: bool) -> Any:
    """Convert a YAML value (or a raw CLI string when ``from_cli``) to the field type ``tp``."""
    inner, optional = _unwrap_optional(tp)
    if from_cli and optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
        return None
    if value is None:
        if optional:
            return None
        raise _ArgError(f"expected {_type_name(tp)}, got null")
    origin = typing.get_origin(inner)
    if inner is Any:
        return yaml.safe_load(value) if from_cli and isinstance(value, str) else value
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise _ArgError(f"expected one of {list(choices)}, got {value!r}")
    if inner is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE_WORDS:
            return True
        if text in _FALSE_WORDS:
            return False
        raise _ArgError(f"expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise _ArgError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _ArgError(f"expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise _ArgError(f"expected an integer, got {value!r}")
        return int(number)
    if inner is float:
        if isinstance(value, bool):
            raise _ArgError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _ArgError(f"expected a number, got {value!r}") from None
    if inner is str:
        if not isinstance(value, str):  # YAML reads 123, 1.5, no, on as numbers and booleans
            raise _ArgError(f"expected a string, got {value!r}; quote it in YAML ('{value}') if it is meant as text")
        return value
    if origin in (list, tuple):
        item_type = (typing.get_args(inner) or (Any,))[0]
        if from_cli and isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [part.strip() for part in text.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(item, item_type, from_cli=False) for item in value]
    if inner is dict or origin is dict:
        if from_cli and isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise _ArgError(f"expected a mapping, got {value!r}")
        return value
    if inner is Path:
        return Path(value)
    raise _ArgError(f"unsupported option type {tp!r}")


def _script_name() -> Optional[str]:
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else None


def _help_text(cls: type, prog: str, description: Optional[str]) -> str:
    hints = typing.get_type_hints(cls)
    lines = [f"usage: {_script_name() or prog} [--config FILE.yaml] [--OPTION VALUE ...]", ""]
    if description:
        lines += [description.strip(), ""]
    lines += [
        "Options are read from --config (a YAML mapping) first, then from the command line. Values are YAML",
        "(lists as [a, b] or a,b; null for none); a bool option alone means true; dotted keys set entries of",
        "mapping options (--method_options.gsoft.block_size 16).",
        "",
        "  --config FILE.yaml",
    ]
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else "(required)"
        )
        allowed = _allowed_text(field.metadata)
        lines.append(f"  --{field.name} ({_type_name(hints[field.name])}{', ' + allowed if allowed else ''}, "
                     f"default: {default!r})")
        help_ = field.metadata.get("help", "")
        if help_:
            lines.append(f"        {help_}")
    return "\n".join(lines)


def _split_cli(argv: Sequence[str], bool_fields: set[str], prog: str) -> tuple[Optional[str], list[tuple[str, Optional[str]]]]:
    config_path: Optional[str] = None
    pairs: list[tuple[str, Optional[str]]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            _fail(prog, f"unexpected argument {token!r}: options are --key value")
        key, eq, inline = token[2:].partition("=")
        key = key.replace("-", "_") if "." not in key else key
        if eq:
            value: Optional[str] = inline
            i += 1
        elif i + 1 < len(argv) and not (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2):
            value = argv[i + 1]
            i += 2
        else:
            value = None
            i += 1
        if key == "config":
            if value is None:
                _fail(prog, "--config needs a YAML file path")
            config_path = value
        else:
            if value is None and key.split(".")[0] not in bool_fields:
                _fail(prog, f"option --{key} needs a value")
            pairs.append((key, value))
    return config_path, pairs


def _unknown(prog: str, key: str, known: list[str], where: str) -> typing.NoReturn:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help for the options"
    _fail(prog, f"unknown option {key!r} in {where}{hint}")


def parse_recipe_args(cls: type[T], argv: Optional[Sequence[str]] = None, description: Optional[str] = None,
                      prog: Optional[str] = None) -> T:
    """Fill the dataclass ``cls`` from ``--config FILE.yaml`` then ``--key value`` overrides (see module docstring).

    Bad input exits with ``<prog>: error: <message>`` naming the option: unknown keys (with close matches), wrong
    types, a missing or unreadable config file, a value the dataclass refuses. ``prog`` defaults to the script's file
    name; recipes pass their name, the prefix of their other errors too (``common.loop.run_recipe``).
    """
    prog = prog or _script_name() or cls.__name__
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(_help_text(cls, prog, description))
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    bool_fields = {name for name in fields if _unwrap_optional(hints[name])[0] is bool}
    config_path, pairs = _split_cli(argv, bool_fields, prog)

    values: dict[str, Any] = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            _fail(prog, f"config file {config_path!r} not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            _fail(prog, f"config file {config_path!r} is not valid YAML: {exc}")
        loaded = loaded or {}
        if not isinstance(loaded, dict):
            _fail(prog, f"config file {config_path!r} must hold a mapping of option: value, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if key not in fields:
                _unknown(prog, str(key), list(fields), config_path)
            try:
                values[key] = _coerce(value, hints[key], from_cli=False)
            except _ArgError as exc:
                _fail(prog, f"option {key!r} in {config_path}: {exc}")

    for key, raw in pairs:
        root, *path_keys = key.split(".")
        if root not in fields:
            _unknown(prog, root, list(fields), "the command line")
        if path_keys:
            inner = _unwrap_optional(hints[root])[0]
            if not (inner is dict or typing.get_origin(inner) is dict):
                _fail(prog, f"--{key}: option {root!r} is not a mapping, dotted keys only apply to mappings")
            current = values.get(root)
            if current is None:
                default = fields[root]
                current = default.default_factory() if default.default_factory is not dataclasses.MISSING else (
                    dict(default.default) if isinstance(default.default, dict) else {}
                )
            target = current = _deep_copy(current)
            for part in path_keys[:-1]:
                node = target.get(part)
                if node is None:
                    node = target[part] = {}
                elif not isinstance(node, dict):
                    _fail(prog, f"--{key}: {part!r} is not a mapping (it is {node!r})")
                target = node
            target[path_keys[-1]] = yaml.safe_load(raw) if raw is not None else True
            values[root] = current
            continue
        try:
            values[root] = True if raw is None else _coerce(raw, hints[root], from_cli=True)
        except _ArgError as exc:
            _fail(prog, f"option --{root}: {exc}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        _fail(prog, str(exc))


#: The bounds of a seed option: numpy's seed range, which accelerate's ``set_seed`` feeds.
SEED_RANGE = {"min": 0, "max": 2**32 - 1}
#: accelerate's mixed-precision modes, the choices of a ``mixed_precision`` option.
MIXED_PRECISIONS = ("no", "fp16", "bf16")

#: The ``metadata`` keys that bound an option, with the comparison each one states.
_BOUNDS = {"min": ">=", "above": ">", "max": "<=", "below": "<"}


def _choices(metadata: typing.Mapping[str, Any]) -> Optional[tuple[Any, ...]]:
    choices = metadata.get("choices")
    return tuple(choices() if callable(choices) else choices) if choices is not None else None


def _allowed_text(metadata: typing.Mapping[str, Any]) -> str:
    """``>= 0 and < 1``, ``> 0``, ``one of linear, cosine``: what a field's metadata allows ('' when unbounded)."""
    choices = _choices(metadata)
    if choices is not None:
        return "one of " + ", ".join(str(c) for c in choices)
    return " and ".join(f"{op} {metadata[key]}" for key, op in _BOUNDS.items() if key in metadata)


def show_value(value: Any) -> str:
    """An option's value as a user would type it: ``1e-08``, ``-1``, ``nan`` (floats in ``g`` format)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_error(name: str, value: Any, problem: str) -> ValueError:
    """The error of a refused option, ``--name value: problem`` (the recipe prefixes ``<recipe>: error:``)."""
    return ValueError(f"--{name} {show_value(value)}: {problem}")


def check_options(options: Any) -> None:
    """Refuse option values outside the bounds their fields declare; call it first in ``__post_init__``.

    A field's ``metadata`` may hold ``min`` / ``max`` (inclusive), ``above`` / ``below`` (exclusive) and
    ``choices`` (a collection, or a function returning one, for choices read from a library). A bounded float must
    be finite; a null value of an optional field passes. The error names the option and its value, says what is
    allowed and gives the default: ``--warmup_steps -5: must be >= 0 (default: 0)``.
    """
    hints = typing.get_type_hints(type(options))
    for field in dataclasses.fields(options):
        metadata, value = field.metadata, getattr(options, field.name)
        allowed = _allowed_text(metadata)
        if value is None or not allowed:
            continue
        optional = _unwrap_optional(hints[field.name])[1]
        fix = "" if field.default is dataclasses.MISSING else \
            f" (default: {'null' if field.default is None else show_value(field.default)})"
        choices = _choices(metadata)
        if choices is not None:
            if value not in choices:
                close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise option_error(field.name, value, f"not one of {', '.join(map(str, choices))}{hint}{fix}")
            continue
        in_bounds = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and all(
            _compare(value, op, metadata[key]) for key, op in _BOUNDS.items() if key in metadata
        )
        if not in_bounds:
            finite = "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""
            raise option_error(field.name, value, f"must be {finite}{allowed}{' or null' if optional else ''}{fix}")


def _compare(value: float, op: str, bound: float) -> bool:
    return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]


def check_model_path(value: Optional[str], option: str, expects: str) -> None:
    """Refuse a model location that is meant as a local directory but is none, before a library reads it as a hub id
    (whose error, "Repo id must be in the form ...", hides the typo). A value is meant as a directory when it starts
    with ``.``, ``~`` or ``/``, holds a backslash or more than one ``/`` (a hub id is ``org/name``), or its parent
    directory exists. ``expects`` says what the option takes (the end of the message)."""
    if not value:
        return
    path = Path(value).expanduser()
    parent = path.parent
    meant_as_path = (value.startswith((".", "~", "/")) or "\\" in value or value.count("/") > 1
                     or (str(parent) not in (".", "") and parent.is_dir()))
    if meant_as_path and not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "no such directory"
        raise ValueError(f"{option} {value!r}: {what}; {expects}")


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def config_to_dict(instance: Any) -> dict[str, Any]:
    """The options as a JSON-serialisable dict (paths become strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
