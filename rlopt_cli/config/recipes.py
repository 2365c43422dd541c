"""Recipes to configs: TOML files and dotted `key=value` overrides in, validated `RunConfig` out, and back.

Errors are for people: an unknown key names the close matches, a malformed file names its line. No torch here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from rlopt_cli.config.schema import RunConfig
from rlopt_cli.errors import RloptError, close_matches


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check one TOML value against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple and typing.get_args(hint)[-1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise RloptError(f"{key} must be a list, e.g. [10, 50]; got {value!r}")
        return tuple(_coerce(v, typing.get_args(hint)[0], key) for v in value)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RloptError(f"{key} must be a list of {len(args)} numbers, e.g. [0.9, 0.999]; got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise RloptError(f"{key} must be a table, e.g. {{enable_thinking = false}}; got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise RloptError(f"{key} must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RloptError(f"{key} must be an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RloptError(f"{key} must be a number; got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RloptError(f"{key} must be a string; got {value!r}")
        return value
    return value


def valid_keys() -> list[str]:
    """Every dotted key a recipe or `--set` may name."""
    return [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(RunConfig)
        for f in dataclasses.fields(_field_types(RunConfig)[section.name])
    ]


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts; unknown sections or keys are errors naming close matches."""
    sections = _field_types(RunConfig)
    built: dict[str, Any] = {}
    for name, values in data.items():
        if name not in sections:
            raise RloptError(
                f"unknown config section [{name}]; valid: {', '.join(sections)}"
                f"{close_matches(name, sections)}"
            )
        if not isinstance(values, dict):
            raise RloptError(f"[{name}] must be a table of keys, got {values!r}")
        cls = sections[name]
        hints = _field_types(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise RloptError(
                    f"unknown config key {name}.{key}{close_matches(f'{name}.{key}', valid_keys())}"
                    f" (valid keys in [{name}]: {', '.join(hints)})"
                )
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        built[name] = cls(**kwargs)
    return RunConfig(**built)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Nested plain dict of every field; unset optional fields (None) are left out, as TOML has no null."""
    out: dict[str, Any] = {}
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        out[section.name] = {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(obj)
            if (v := getattr(obj, f.name)) is not None
        }
    return out


def to_toml(cfg: RunConfig) -> str:
    return tomli_w.dumps(to_dict(cfg))


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a one-line error with the line number."""
    path = Path(path)
    if path.is_dir():
        raise RloptError(f"{path} is a folder; give a recipe file, e.g. recipes/default.toml")
    if not path.is_file():
        raise RloptError(f"recipe not found: {path} (check the path; recipes live in recipes/)")
    try:
        text = path.read_text()
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        where = str(err).replace("at end of document", f"at line {text.count(chr(10)) + 1}, end of document")
        raise RloptError(f"malformed TOML in {path}: {where}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RloptError(f"cannot read {path}: {err}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """`'grpo.beta=0.04'` -> `('grpo.beta', 0.04)`; values are TOML literals, bare words are strings."""
    if "=" not in item:
        raise RloptError(f"override {item!r} must look like section.key=value, e.g. grpo.beta=0.04")
    key, raw = (s.strip() for s in item.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `section.key` in a nested dict, rejecting keys the config does not have."""
    if key not in valid_keys():
        raise RloptError(
            f"unknown config key {key!r}{close_matches(key, valid_keys())}"
            " (run `rlopt train --help` or read recipes/default.toml for the valid keys)"
        )
    section, name = key.split(".", 1)
    data.setdefault(section, {})[name] = value


def load_config(
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> RunConfig:
    """recipe -> dict, then `--set` overrides, then CLI flags (dotted keys, None = not given), then validation."""
    data: dict[str, Any] = read_toml(recipe) if recipe else {}
    for item in overrides or []:
        set_dotted(data, *parse_override(item))
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    return from_dict(data)


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first `section.key: old -> new` where two config dicts differ; empty when they are equal."""
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}"
    return ""
