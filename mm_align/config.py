"""Dataclass configs from YAML files and ``key=value`` overrides, validated strictly.

Every config is a ``@dataclass`` whose fields are declared with :func:`option` (a default and a help
string). :func:`load_config` reads a YAML file whose keys mirror the fields, applies ``a.b.c=value``
overrides (they win), and validates the result recursively against the type hints:

- an unknown key is an error that names it (dotted) and the valid keys of its section, with a
  "did you mean" when one is close;
- an ill-typed value is an error that names the key, the expected type and the value received;
- a missing required field is an error that names it;
- a ``ValueError`` from a section's own ``__post_init__`` is re-raised as :class:`ConfigError`
  prefixed with the section's dotted path.

Nothing is silently ignored. Values are checked, with a few deliberate conversions: an int is
accepted for a float field; a string that ``float()`` / ``int()`` parses is accepted for a float /
int field (YAML 1.1, hence ``yaml.safe_load``, reads ``1e-5`` as a string); a string is accepted
for a ``Path`` field; a list for a ``tuple`` field. Booleans are strict: only ``true``/``false``
(YAML), never ``0``/``1`` or other strings.
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

from mm_align.atomic import atomic_write_text

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
    "replace_checked",
]

T = TypeVar("T")

# Distributions whose versions are recorded next to every checkpoint and report (package metadata only).
_VERSIONED = (
    "mm-align",
    "torch",
    "torchvision",
    "torchaudio",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "open_clip_torch",
    "datasets",
)


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message says which and what is valid."""


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING) -> Any:
    """
    A dataclass field with a help string; use it for every field of every config.

    Args:
        default (`Any`, *optional*):
            The default value. Leave unset (and no `default_factory`) for a required field.
        help (`str`):
            One line saying what the field does; shown by [`describe`] and `mm-align ls`.
        default_factory (`Callable[[], Any]`, *optional*):
            Builds a mutable default (a list, a dict, a nested config).

    Returns:
        `dataclasses.Field`: the field, with `metadata={"help": help}`.
    """
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """A readable name of a type hint: ``int``, ``list[int]``, ``float | None``, ``one of 'a', 'b'``."""
    if tp is Any:
        return "Any"
    if tp is Ellipsis:
        return "..."
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{args}]" if args else name
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _bad(path: str, tp: Any, value: Any) -> ConfigError:
    hint = ""
    if tp is str and isinstance(value, (int, float, bool)):
        hint = " (quote it to pass a string, e.g. key='1')"
    return ConfigError(f"config key '{path}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_YAML_BOOLS = {True: ("yes", "on", "true", "y"), False: ("no", "off", "false", "n")}


def _coerce(tp: Any, value: Any, path: str, *, lenient: bool = True) -> Any:
    """
    Check ``value`` against the type hint ``tp`` and return it, converted where documented.

    ``lenient=False`` disables the string -> int/float conversions (used for a first, exact pass
    over the members of a union, so that ``int | str`` keeps ``"5"`` a string).
    """
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            # X | None: the error of X (with its inner path, e.g. 'a.b[1]') is the useful one.
            return _coerce(members[0], value, path, lenient=lenient)
        for strict_pass in (True, False) if lenient else (True,):
            for member in members:
                try:
                    return _coerce(member, value, path, lenient=not strict_pass)
                except ConfigError:
                    continue
        raise _bad(path, tp, value)

    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false (yes/on/true) as a bool: map it back
            spelled = [a for a in args if isinstance(a, str) and a.lower() in _YAML_BOOLS[value]]
            if len(spelled) == 1:
                return spelled[0]
        raise ConfigError(
            f"config key '{path}' must be one of {', '.join(repr(a) for a in args)}; "
            f"got {value!r} ({type(value).__name__})"
        )

    if origin in (list, Sequence) or tp in (list, Sequence):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _bad(path, tp, value)
        if not args:
            return list(value)
        return [_coerce(args[0], v, f"{path}[{i}]", lenient=lenient) for i, v in enumerate(value)]

    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(path, tp, value)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            inner = args[0] if args else Any
            return tuple(_coerce(inner, v, f"{path}[{i}]", lenient=lenient) for i, v in enumerate(value))
        if args == ((),):  # tuple[()]
            args = ()
        if len(value) != len(args):
            raise ConfigError(
                f"config key '{path}' expects {_type_name(tp)} ({len(args)} items), got {value!r} ({len(value)} items)"
            )
        return tuple(_coerce(a, v, f"{path}[{i}]", lenient=lenient) for i, (a, v) in enumerate(zip(args, value)))

    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _bad(path, tp, value)
        if not args:
            return dict(value)
        key_tp, val_tp = args
        return {
            _coerce(key_tp, k, f"{path} (key {k!r})", lenient=False): _coerce(
                val_tp, v, f"{path}.{k}", lenient=lenient
            )
            for k, v in value.items()
        }

    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"config section '{path}' expects a mapping of keys for {tp.__name__}, "
                f"got {value!r} ({type(value).__name__})"
            )
        return from_dict(tp, value, path=path)

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(path, tp, value)

    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if lenient and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _bad(path, tp, value)

    if tp is float:
        if _is_number(value):
            return float(value)
        if lenient and isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _bad(path, tp, value)

    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(path, tp, value)

    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
        raise _bad(path, tp, value)

    if tp is type(None):
        if value is None:
            return None
        raise _bad(path, tp, value)

    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _bad(path, tp, value)


def _section_name(path: str) -> str:
    return path or "the top level"


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """
    Build the dataclass `cls` from a mapping, validating every key and value recursively.

    Type hints are resolved with `typing.get_type_hints`, so modules that use
    `from __future__ import annotations` work. Supported hints: `int`, `float` (an int is
    converted), `str`, `bool` (strict), `X | None`, `list[X]`, `tuple[X, ...]`, fixed tuples,
    `dict[str, X]`, `Any`, `Literal[...]`, `Path` (from a string) and nested dataclasses (from
    a mapping).

    Args:
        cls (`type`):
            The dataclass to build.
        data (`Mapping[str, Any]`):
            Keys mirroring the fields of `cls`; absent keys take the field defaults.
        path (`str`, *optional*, defaults to `""`):
            The dotted path of this section, used in error messages (e.g. `"train"`).

    Returns:
        An instance of `cls`.

    Raises:
        [`ConfigError`]: on an unknown key (naming the valid keys), an ill-typed value, a missing
            required field, or a `ValueError`/`TypeError` from the dataclass's `__post_init__`.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config section '{_section_name(path)}' must be a mapping of keys, got {data!r} ({type(data).__name__})"
        )
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:
        raise TypeError(f"cannot resolve the type hints of {cls.__qualname__}: {exc}") from exc
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""

    for key in data:
        if key not in fields:
            valid = sorted(fields)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; valid keys for {_section_name(path)}: {', '.join(valid)}{hint}"
            )

    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(
                f"config key '{prefix}{name}' is required (no default); expected {_type_name(hints[name])}"
            )
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Overrides and files
# --------------------------------------------------------------------------------------------------


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """
    Apply `a.b.c=value` overrides to a nested dict, in place (and return it).

    Each value is parsed with `yaml.safe_load`: `=3` is an int, `=[x, y]` a list, `=null` None,
    `=true` a bool, `=` (nothing) the empty string. `=1e-5` stays the string `"1e-5"` (YAML 1.1)
    and becomes a float in [`from_dict`] when the field is a float. Missing sections are created;
    a `null` section is replaced by a mapping. Unknown keys are reported later, by [`from_dict`].

    Args:
        data (`dict[str, Any]`):
            The config as loaded from YAML.
        overrides (`Sequence[str]`):
            `key=value` strings, applied in order (a later one wins).

    Returns:
        `dict[str, Any]`: `data`, updated.

    Raises:
        [`ConfigError`]: on an override without `=`, an empty key part, an unparsable value, or a
            key inside a value that is not a section.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.learning_rate=1e-5)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if any(not p.strip() for p in parts):
            raise ConfigError(f"override '{item}': the key '{key}' has an empty part")
        parts = [p.strip() for p in parts]
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': cannot parse the value {raw!r} as YAML: {exc}") from exc
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override '{item}': '{'.'.join(parts[: i + 1])}' is {child!r} ({type(child).__name__}), "
                    "not a section, so it has no key "
                    f"'{parts[i + 1]}'"
                )
            node = child
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """
    Read a YAML file (optional), apply `key=value` overrides, and validate into `cls`.

    Args:
        cls (`type`):
            The config dataclass.
        yaml_path (`str` or `Path`, *optional*):
            A YAML file whose top level is a mapping mirroring the fields of `cls`. `None` starts
            from the dataclass defaults.
        overrides (`Sequence[str]`, *optional*):
            `a.b.c=value` strings; they win over the file. See [`apply_overrides`].

    Returns:
        An instance of `cls`.

    Raises:
        [`ConfigError`]: when the file is missing, is not valid YAML (the message gives the file,
            line and column), its top level is not a mapping, or any key/value is invalid.
    """
    data: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or str(exc)
            context = getattr(exc, "context", None)
            cmark = getattr(exc, "context_mark", None)
            if context and cmark is not None:
                context = f"{context} started at line {cmark.line + 1}, column {cmark.column + 1}"
            detail = f"{context}: {problem}" if context else problem
            raise ConfigError(f"invalid YAML in {where}: {detail}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file '{path}' is not UTF-8 text: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of keys (key: value), got {type(loaded).__name__}"
            )
        data = loaded
    return from_dict(cls, apply_overrides(data, overrides))


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> Any:
    """
    A config as plain YAML-able values, recursively.

    Dataclasses become dicts (every field, in declaration order), tuples become lists, `Path`s
    strings; mappings and lists are converted element-wise; scalars are returned as they are.

    Args:
        cfg (`Any`):
            A dataclass instance (or any nested value of one).

    Returns:
        `dict` (for a dataclass) of plain values, which [`from_dict`] turns back into an equal config.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    return cfg


def dump_yaml(cfg: Any) -> str:
    """
    A config as YAML text (fields in declaration order), loadable by [`load_config`].

    Args:
        cfg (`Any`):
            A dataclass instance.

    Returns:
        `str`: the YAML document.
    """
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def library_versions() -> dict[str, str]:
    """
    Versions of Python, the platform and the libraries a run depends on.

    Read from package metadata (`importlib.metadata`); nothing heavy is imported.

    Returns:
        `dict[str, str]`: keys `python`, `platform`, `mm_align`, `torch`, `torchvision`,
        `torchaudio`, `diffusers`, `transformers`, `peft`, `accelerate`, `open_clip_torch`,
        `datasets`; `"not installed"` for an absent library.
    """
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in _VERSIONED:
        key = dist.replace("-", "_")
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "not installed"
    return out


def write_resolved(cfg: Any, output_dir: str | Path) -> None:
    """
    Write the resolved config and the library versions next to a checkpoint or report.

    Writes `output_dir/config.yaml` ([`dump_yaml`]; loads back with [`load_config`] into an equal
    config) and `output_dir/versions.json` ([`library_versions`]), each atomically (a temporary
    file, then `os.replace`). `output_dir` is created if needed.

    Args:
        cfg (`Any`):
            The config dataclass instance.
        output_dir (`str` or `Path`):
            The directory to write into.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    atomic_write_text(out / "versions.json", json.dumps(library_versions(), indent=2) + "\n")


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        return repr(to_dict(f.default))
    if f.default_factory is not MISSING:
        try:
            return repr(to_dict(f.default_factory()))
        except Exception:  # a factory that needs more than nothing: say so rather than fail
            return "<factory>"
    return "<required>"


def describe(cls: type, prefix: str = "") -> str:
    """
    A help listing of a config: one line per field, nested sections flattened to dotted names.

    Each line reads `name: type = default  # help`; a nested dataclass section gets a header line
    `name:  # help` followed by its fields as `name.field`. Required fields show `<required>`.

    Args:
        cls (`type`):
            The config dataclass.
        prefix (`str`, *optional*, defaults to `""`):
            Prepended to every name (used for the recursion, e.g. `"train."`).

    Returns:
        `str`: the listing, one field per line.
    """
    hints = typing.get_type_hints(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:  # {help_text}" if help_text else f"{prefix}{f.name}:")
            lines.append(describe(tp, f"{prefix}{f.name}."))
            continue
        line = f"{prefix}{f.name}: {_type_name(tp)} = {_default_repr(f)}"
        lines.append(f"{line}  # {help_text}" if help_text else line)
    return "\n".join(lines)


def replace_checked(config: T, overrides: Mapping[str, Any], what: str) -> T:
    """``dataclasses.replace(config, **overrides)``, with an unknown key an error naming it and the valid ones.

    ``what`` names the settings in the message, e.g. ``"bench speech option"``.
    """
    valid = [f.name for f in dataclasses.fields(config)]  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(f"unknown {what}(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return dataclasses.replace(config, **overrides)  # type: ignore[type-var]
