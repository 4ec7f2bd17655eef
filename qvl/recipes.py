"""Settings files: TOML or YAML recipes that fill qvl's settings dataclasses.

A recipe only fills fields that exist; a misspelt key is an error naming the file and
the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class RecipeError(ValueError):
    pass


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe ({e.strerror})") from None
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


def fill(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys are an error naming ``where``."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise RecipeError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    # TOML and YAML have lists, not tuples: a tuple-typed setting takes a list
    coerced = {
        key: tuple(value) if isinstance(value, list) and str(names[key].type).startswith("tuple") else value
        for key, value in values.items()
    }
    return cls(**coerced)
