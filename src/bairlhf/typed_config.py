"""Build typed dataclasses from YAML mappings: one validator for every config section.

``build(cls, data, where, error)`` checks ``data`` against the fields of dataclass ``cls``, before
any work: an unknown key, a missing required field (no default) or a value of the wrong type
raises ``error`` (the caller's exception class) naming the dotted key. Nested dataclass fields
recurse (``None`` gives the defaults); ``X | None``, ``list[T]``, ``tuple[...]`` and ``dict``
(``dict[K, V]``: each key and value, named ``where.key``) fields are checked; floats also accept
ints and numeric strings (YAML reads ``5e-5`` as a string) and must be finite; other annotations
(``Any``) pass through. Imports only the standard library.

A field is read from the YAML key of its name, or from ``metadata={YAML_KEY: "lambda"}`` when the
key cannot be a Python name (``lam: float = field(default=1.0, metadata={YAML_KEY: "lambda"})``);
messages, ``known`` and ``field_ranges`` use the YAML key. ``coerce(tp, value, key, error)``
checks one value against an annotation as ``build`` checks a field (for a key that selects the
rest of the schema, such as a merge ``method``).

Valid ranges and enums are part of the type, so they are checked at load and documented where
the field is: ``gamma: Annotated[float, Range(0, 1)] = 1.0`` (closed bounds by default,
``Range(0, None, lo_open=True)`` for ``> 0``), ``arch: Literal["llama", "qwen2"] = "llama"``.
``field_ranges(cls)`` lists every constrained field of a config tree (for docs and tests).

Message wording is the caller's choice (``unknown=`` / ``missing=`` format strings with the
fields ``where``, ``path`` (``where.key``), ``key``, ``keys`` (list of unknown keys) and ``known``
(sorted known keys, comma-separated)), so existing error messages stay as they were.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

UNKNOWN = "{path}: unknown key (known: {known})"
"""Default message of an unknown key."""
MISSING = "{path}: required"
"""Default message of a missing field that has no default."""
YAML_KEY = "yaml_key"
"""Field metadata key naming the YAML key a field is read from (default: the field's name)."""


def yaml_key(f: dataclasses.Field) -> str:
    """The YAML key of a dataclass field."""
    return f.metadata.get(YAML_KEY, f.name)


def yaml_keys(cls) -> list[str]:
    """The YAML keys of dataclass ``cls``, in field order."""
    return [yaml_key(f) for f in dataclasses.fields(cls)]


@dataclasses.dataclass(frozen=True)
class Range:
    """Valid interval of a numeric field, used as ``Annotated[float, Range(lo, hi)]``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v) -> bool:
        if self.lo is not None and not (v > self.lo if self.lo_open else v >= self.lo):
            return False
        if self.hi is not None and not (v < self.hi if self.hi_open else v <= self.hi):
            return False
        return v == v  # NaN fails

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "any"


def field_ranges(cls, where: str = "") -> dict[str, str]:
    """Dotted key -> its valid range or choices, for every constrained field of ``cls`` (recursive)."""
    out = {}
    keys = {f.name: yaml_key(f) for f in dataclasses.fields(cls)}
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        if name not in keys:
            continue
        key = _path(where, keys[name])
        base, extras = _unannotate(tp)
        if typing.get_origin(base) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(base) if a is not type(None)]
            if len(inner) == 1:
                base, extras = _unannotate(inner[0])
        if typing.get_origin(base) is list and typing.get_args(base) and not extras:
            item, item_extras = _unannotate(typing.get_args(base)[0])   # list[Annotated[float, Range]]
            if item_extras:
                base, extras = item, item_extras
        for r in extras:
            if isinstance(r, Range):
                out[key] = str(r)
        if typing.get_origin(base) is typing.Literal:
            out[key] = " | ".join(map(str, typing.get_args(base)))
        inner = [a for a in typing.get_args(base) if a is not type(None)] or [base]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            out.update(field_ranges(inner[0], key))
    return out


def _unannotate(tp):
    if typing.get_origin(tp) is typing.Annotated:
        return typing.get_args(tp)[0], tp.__metadata__
    return tp, ()


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def build(cls, data, where: str = "", error: type[Exception] = ValueError, *,
          unknown: str = UNKNOWN, missing: str = MISSING):
    """Return ``cls(**data)`` with every key and value checked; ``where`` is the dotted section
    name (``""`` at the top level). Raises ``error`` naming the first bad key."""
    if data is None:
        data = {}
    if not isinstance(data, typing.Mapping):
        raise error(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}
    bad = sorted((k for k in data if k not in fields), key=str)
    if bad:
        raise error(unknown.format(where=where, path=_path(where, str(bad[0])), key=bad[0], keys=bad,
                                   known=", ".join(sorted(fields))))
    for key, f in fields.items():
        if key not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(missing.format(where=where, path=_path(where, key), key=key))
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {fields[k].name: _coerce(v, hints.get(fields[k].name, typing.Any), _path(where, k), error, unknown,
                                      missing)
              for k, v in data.items()}
    return cls(**kwargs)


def coerce(tp, value, key: str, error: type[Exception] = ValueError):
    """``value`` checked against the annotation ``tp`` as ``build`` checks a field (``Literal``
    choices, ``Range``, types); raises ``error`` naming ``key``."""
    return _coerce(value, tp, key, error, UNKNOWN, MISSING)


def _coerce(value, tp, key: str, error, unknown: str, missing: str):
    tp, extras = _unannotate(tp)
    value = _coerce_plain(value, tp, key, error, unknown, missing)
    for r in extras:
        if isinstance(r, Range) and value is not None and not r.ok(value):
            raise error(f"{key}: must be {'in ' if r.lo is not None and r.hi is not None else ''}{r}, got {value!r}")
    return value


def _coerce_plain(value, tp, key: str, error, unknown: str, missing: str):
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is bool and True not in choices:
            raise error(f"{key}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, error, unknown, missing) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, error, unknown=unknown, missing=missing)
    if tp is dict or origin is dict:
        if not isinstance(value, typing.Mapping):
            raise error(f"{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (typing.Any, typing.Any)
        return {_coerce(k, kt, f"{key}.{k}", error, unknown, missing): _coerce(v, vt, f"{key}.{k}", error, unknown,
                                                                                  missing)
                for k, v in value.items()}
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise error(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (typing.Any,)
        return [_coerce(v, item, f"{key}[{i}]", error, unknown, missing) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise error(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, key, error, unknown, missing) for v, a in zip(value, args))
    if tp is float:
        num = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            num = float(value)
        elif isinstance(value, str):
            try:
                num = float(value)
            except ValueError:
                pass
        if num is not None:
            if not math.isfinite(num):
                raise error(f"{key}: must be a finite number, got {value!r}")
            return num
    elif tp in (int, str, bool):
        if type(value) is tp:
            return value
    else:
        return value
    raise error(f"{key}: expected {tp.__name__}, got {value!r}")
