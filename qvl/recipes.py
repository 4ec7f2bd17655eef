"""Settings files — TOML or YAML recipes that fill qvl's settings dataclasses — and the one
place that checks a settings value, whoever set it.

A recipe only fills fields that exist; a misspelt key is an error naming the file and the
key, so a typo never silently falls back to a default. Every value is checked against its
field's type (``min_side = "big"``, ``skip_rules = "emoji"`` — a string where a list
belongs would otherwise be read letter by letter) and then by the dataclass's own range
rules (``__post_init__`` raising ``SettingError``), so options, recipes and code that
builds settings directly all meet the same checks.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from qvl.boundary import read_text
from qvl.errors import QvlError

T = TypeVar("T")


class RecipeError(QvlError):
    pass


class SettingError(QvlError):
    """One setting is out of range: ``key`` names it, the message says what is allowed."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise SettingError(key, message)


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of settings; a larger file is not one
MAX_INT = (1 << 63) - 1  # every integer setting fits in 64 bits


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a recipe never needs them, and a small tree of
    aliases (the "billion laughs") expands to more values than memory holds."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name) are not allowed "
                                              "in a recipe: write each value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key written twice is a mistake (TOML refuses it too): YAML would keep the last silently."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: SafeLoader's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {short(key)} is written twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe's top-level table; anything unreadable, too large, not TOML/YAML, nested too deep
    or using YAML aliases is one RecipeError naming the file."""
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise RecipeError(f"{path}: a recipe is a .toml, .yaml or .yml file")
    text = read_text(path, MAX_RECIPE_BYTES, RecipeError, ": not a recipe")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.load(text, Loader=_NoAliasLoader) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: not valid {path.suffix[1:].upper()}: {short(' '.join(str(e).split()), 300)}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise RecipeError(f"{path}: {short(str(e), 300)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level must be a table of settings")
    return data


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple, _repr.maxset = 2, 4, 4, 4, 4
_repr.maxstring = _repr.maxother = 60
_repr.repr_int = lambda value, level: (f"an integer of {value.bit_length()} bits" if value.bit_length() > 64
                                       else repr(value))  # repr() of a 5000-digit int raises


def short(value: Any, limit: int = 80) -> str:
    """``value`` for an error message: a bounded repr (a huge value never becomes a huge line);
    a string is cut at ``limit`` characters."""
    if isinstance(value, str) and limit > 80:
        return value if len(value) <= limit else value[:limit] + "…"
    return _repr.repr(value).encode("ascii", "backslashreplace").decode()


def name(key: Any) -> str:
    """A key for an error message: as it is when it is short printable ASCII, else ``short``."""
    return key if isinstance(key, str) and len(key) <= 60 and key.isascii() and key.isprintable() else short(key)


def table(data: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """``data[name]`` as a table of settings (absent: empty)."""
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: [{name}] must be a table of settings, not {type(value).__name__}")
    if not all(isinstance(k, str) for k in value):
        raise RecipeError(f"{where}: [{name}]: setting names are text, not {short(next(k for k in value if not isinstance(k, str)))}")
    return value


def _describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value: Any, hint, key: str) -> Any:
    """``value`` as the type ``hint`` names (lists become tuples, ints floats), or SettingError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message (not finite, out of range ...)
            return coerce(value, options[0], key)
        for arg in options:
            try:
                return coerce(value, arg, key)
            except SettingError:
                pass
        raise SettingError(key, f"{short(value)} is not {_describe(hint)}")
    if hint is Any or hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                raise SettingError(key, f"{short(value)}: out of range (at most {MAX_INT})")
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > MAX_INT or not math.isfinite(value):
                raise SettingError(key, f"{short(value)}: not a finite number")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return _text(value, key)
    elif hint is Path:
        if isinstance(value, (str, Path)):
            return Path(_text(str(value), key))
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(v, args[0], key) for v in value)
            if len(value) == len(args):
                return tuple(coerce(v, a, key) for v, a in zip(value, args))
    elif origin is dict:
        if isinstance(value, dict):
            return {coerce(k, args[0], key): coerce(v, args[1], f"{key}.{name(k)}") for k, v in value.items()}
    elif hint is dict:
        if isinstance(value, dict):
            return value
    else:  # a type this checker does not know: taken as it is
        return value
    raise SettingError(key, f"{short(value)} is not {_describe(hint)}")


def _text(value: str, key: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SettingError(key, f"not valid Unicode (a lone surrogate at character {e.start})") from None
    return value


def fill(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from ``values``; an unknown or missing key, a value of the wrong
    type or out of range is an error naming ``where`` (a file and its table) and the key."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(name(k) for k in set(values) - set(names))
    if unknown:
        raise RecipeError(
            f"{where}: unknown setting(s) {', '.join(unknown[:10])}{' …' if len(unknown) > 10 else ''}; "
            f"known: {', '.join(sorted(names))}"
        )
    missing = [name for name, f in names.items() if name not in values and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{where}: missing setting(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{key: coerce(value, hints[key], key) for key, value in values.items()})
    except SettingError as e:
        raise RecipeError(f"{where}: {e}") from None


def merge(*layers: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``layers`` (a previous run's settings, a recipe's table ...; lowest precedence first) and
    then ``options`` as one mapping, a later value replacing an earlier one. In ``options`` None
    means "not given" (an option left out); in a layer it is a value (YAML's ``null``: off)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    merged.update({k: v for k, v in (options or {}).items() if v is not None})
    return merged


def resolve(cls: type[T], *layers: Mapping[str, Any], options: Mapping[str, Any] | None = None, where: str) -> T:
    """Settings ``cls`` from ``layers`` < ``options`` (``merge``), checked by ``fill``: the one
    rule by which a command combines a previous run's settings, a recipe and its options."""
    return fill(cls, merge(*layers, options=options), where)
