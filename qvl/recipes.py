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
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

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


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe ({e.strerror})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise RecipeError(f"{path}: a recipe is a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: not valid {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level must be a table of settings")
    return data


def table(data: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """``data[name]`` as a table of settings (absent: empty)."""
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: [{name}] must be a table of settings, not {type(value).__name__}")
    return value


def _describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(value: Any, hint, key: str) -> Any:
    """``value`` as the type ``hint`` names (lists become tuples, ints floats), or SettingError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except SettingError:
                pass
        raise SettingError(key, f"{value!r} is not {_describe(hint)}")
    if hint is Any or hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(v, args[0], key) for v in value)
            if len(value) == len(args):
                return tuple(coerce(v, a, key) for v, a in zip(value, args))
    elif origin is dict:
        if isinstance(value, dict):
            return {coerce(k, args[0], key): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    elif hint is dict:
        if isinstance(value, dict):
            return value
    else:  # a type this checker does not know: taken as it is
        return value
    raise SettingError(key, f"{value!r} is not {_describe(hint)}")


def fill(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from ``values``; an unknown or missing key, a value of the wrong
    type or out of range is an error naming ``where`` (a file and its table) and the key."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise RecipeError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
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
