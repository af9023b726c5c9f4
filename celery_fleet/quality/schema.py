"""A minimal JSON Schema checker: enough to tell a model's JSON from garbage.

Supports ``type`` (one or a list: object, array, string, number, integer, boolean, null;
as in JSON Schema, ``1.0`` is an integer and ``true`` is neither an integer nor a number),
``properties``, ``required``, ``additionalProperties: false``, ``items`` and ``enum``;
every other keyword is ignored (a schema the checker does not understand never fails an
answer). No dependency: ``jsonschema`` is not one of the package's requirements.

Example::

    schema_errors({"a": 1}, {"type": "object", "required": ["a", "b"]})
    # -> ["$: missing required 'b'"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["schema_errors"]

_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is(value: Any, name: str) -> bool:
    if isinstance(value, bool):  # a subclass of int in Python, never a number in JSON
        return name == "boolean" or name not in _KNOWN
    if name == "integer":  # JSON Schema: a number with no fractional part (1.0 is one)
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float))
    kind = _TYPES.get(name)
    return kind is None or isinstance(value, kind)


_KNOWN = frozenset({*_TYPES, "integer", "number"})


def _same(a: Any, b: Any) -> bool:
    """JSON equality (``enum``): ``true`` is not ``1``, ``1.0`` is ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def schema_errors(value: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """What in ``value`` does not match ``schema`` (empty: it matches); at most a few."""
    if not isinstance(schema, Mapping):
        return []
    errors: list[str] = []
    kind = schema.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else None
    if kinds and not any(_is(value, k) for k in kinds):
        return [f"{path}: expected {'/'.join(map(str, kinds))}, got {type(value).__name__}"]
    enum = schema.get("enum")
    if isinstance(enum, list) and not any(_same(value, choice) for choice in enum):
        errors.append(f"{path}: {value!r} is not one of {enum}")
    if isinstance(value, dict):
        errors += _object_errors(value, schema, path)
    items = schema.get("items")
    if isinstance(value, list) and isinstance(items, Mapping):
        for i, item in enumerate(value):
            errors += schema_errors(item, items, f"{path}[{i}]")
            if len(errors) >= 5:
                break
    return errors[:5]


def _object_errors(value: dict[str, Any], schema: Mapping[str, Any], path: str) -> list[str]:
    errors = [
        f"{path}: missing required {name!r}"
        for name in schema.get("required") or ()
        if isinstance(name, str) and name not in value
    ]
    properties = schema.get("properties")
    if isinstance(properties, Mapping):
        for name, sub in properties.items():
            if name in value:
                errors += schema_errors(value[name], sub, f"{path}.{name}")
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: unexpected {k!r}" for k in value if k not in properties]
    return errors
