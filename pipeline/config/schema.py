"""The config machinery: strict dataclass <-> dict conversion, YAML text and fingerprints.

:func:`from_dict` builds a dataclass tree from plain data and is strict: an unknown key is an error naming
the full dotted path and the closest valid name; every value is checked against its annotation (PyYAML reads
``1e-3`` as a string, so numbers given as strings are converted when they parse, and rejected when they do
not). It knows nothing of the run config's sections (``pipeline.config.run`` does).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from typing import Any, Literal

import yaml

__all__ = ["ConfigError", "from_dict", "to_dict", "to_yaml", "fingerprint", "strict_yaml_load"]


class ConfigError(ValueError):
    """A configuration problem; the message names the config key (and file) at fault."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error: plain PyYAML keeps the
    last one, so a section written twice silently drops the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in first:
                raise ConfigError(f"duplicate key '{key}' at line {line} (first written at line {first[key]})")
            if isinstance(key, typing.Hashable):
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def strict_yaml_load(text: str) -> Any:
    """``yaml.safe_load``, but a mapping key written twice raises :class:`ConfigError` naming the key and lines."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass


_ALIASES = {
    "learning_rate": "lr",
    "lr_scheduler_type": "lr_scheduler",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "max_grad_norm": "grad_clip",
}
"""Common names from other trainers (transformers' TrainingArguments) for keys that have a name of their own here."""


def _closest(name: str, options: list[str]) -> str:
    """The valid key a mistyped ``name`` most likely meant: a known alias, else a close spelling, else nothing."""
    if _ALIASES.get(name) in options:
        return _ALIASES[name]
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return match[0] if match else ""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert what is safe to convert."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _coerce(value, a, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} does not match {tp}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        return _finite_float(value, path)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def _finite_float(value: Any, path: str) -> float:
    """A float field's value: a number, or a string that parses as one (``1e-3``); never NaN or inf.

    No float field of the config has a use for a non-finite value, and one such as ``reward.dpo_beta=nan``
    would train a model of NaNs without an error, so every float field refuses them here.
    """
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None:
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{path} must be a number other than NaN or inf, got {value!r}")
    return number


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, strictly: unknown keys and wrong types raise."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            hint = _closest(str(key), names)
            raise ConfigError(
                f"unknown config key '{where}'"
                + (f"; did you mean '{(path + '.') if path else ''}{hint}'?" if hint else "")
                + f" Valid keys{' of ' + path if path else ''}: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path + ': ' if path else ''}{e}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists), for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def fingerprint(*parts: Any) -> str:
    """Stable short hash of config sections (dataclasses or plain data) and input fingerprints."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
