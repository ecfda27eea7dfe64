"""Dataclass configs from YAML files and ``key=value`` overrides, validated strictly.

An unknown key is an error that names it (dotted) and the valid keys; an ill-typed value is an
error that names the key, the expected type and what it got. Never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import json
import os
import platform
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "option",
    "from_dict",
    "load_config",
    "apply_overrides",
    "to_dict",
    "dump_yaml",
    "library_versions",
    "write_resolved",
    "describe",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message says which and what is valid."""


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING) -> Any:  # noqa: A002
    """A dataclass field with a help string (shown by :func:`describe` and ``mm-align ls``)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _bad(path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key '{path}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``tp``; convert int->float, str->Path, mappings->dataclasses."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(e)
        raise _bad(path, tp, value)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{path}' must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
    if origin in (list, Sequence) or tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _bad(path, tp, value)
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(path, tp, value)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _bad(path, tp, value)
        if not args:
            return dict(value)
        return {_coerce(args[0], k, path): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _bad(path, tp, value)
        return from_dict(tp, value, path=path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _bad(path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _bad(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(path, tp, value)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _bad(path, tp, value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _bad(path, tp, value)


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, validating every key and value recursively."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{path or '<top>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            valid = sorted(fields)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; valid keys for {path or 'the top level'}: "
                f"{', '.join(valid)}{hint}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"config key '{prefix}{name}' is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from exc


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.learning_rate=1e-5)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': cannot parse the value: {exc}") from exc
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML file (optional), apply overrides, and validate into ``cls``."""
    data: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    return from_dict(cls, apply_overrides(data, overrides))


def to_dict(cfg: Any) -> Any:
    """A dataclass (recursively) as plain YAML-able values."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a run depends on (from package metadata; nothing imported)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("mm-align", "torch", "torchvision", "torchaudio", "diffusers", "transformers", "peft",
                 "accelerate", "open_clip_torch", "datasets"):
        try:
            out[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = "not installed"
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_resolved(cfg: Any, output_dir: str | Path) -> None:
    """Write ``config.yaml`` (the resolved config) and ``versions.json`` into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "config.yaml", dump_yaml(cfg))
    _atomic_write(out / "versions.json", json.dumps(library_versions(), indent=2) + "\n")


def describe(cls: type, prefix: str = "") -> str:
    """One line per field (dotted for nested sections): name, type, default, help."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(describe(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else "<required>"
        )
        lines.append(f"{prefix}{f.name}: {_type_name(tp)} = {default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
