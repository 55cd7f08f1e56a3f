"""Values read from YAML (recipes, data jobs, overrides) checked against dataclass field annotations, with a suggestion
for a misspelt key; and annotations written as JSON, so a table of a stage's fields can be kept on disk."""

import dataclasses
import difflib
import enum
import functools
import operator
import types
import typing
from typing import Any, Literal

from .errors import UserError


def literal_choices(annotation) -> tuple | None:
    """The allowed values of a `Literal[...]` annotation (a flag's `choices`), or None for any other annotation."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None


def _members(annotation) -> tuple:
    """The parts of a union, or the annotation alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def is_text(annotation) -> bool:
    """Whether `annotation` is `str` or `str | None`: whatever a value for it looks like (`1.10`, `010`), it is text."""
    return set(_members(annotation)) - {type(None)} == {str}


def _string_enum(annotation):
    """The enum of an `Enum | str` annotation, or None. TrainingArguments turns such a string into the enum by value
    in its __post_init__ (`SchedulerType("cosinee")` is a ValueError), so only the enum's values are valid strings,
    although the annotation says `str`; checked here, a typo is refused before any work, not when the stage starts."""
    members = set(_members(annotation)) - {type(None)}
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    return enums[0] if len(enums) == 1 and members == {enums[0], str} else None


def _enum_values(annotation) -> list | None:
    string_enum = _string_enum(annotation)
    return [m.value for m in string_enum] if string_enum else None


def field_types(classes) -> dict[str, Any]:
    """name -> type annotation of every init field of `classes` (the first class that has a name wins)."""
    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                out.setdefault(f.name, hints.get(f.name, Any))
    return out


def suggest(key: str, fields) -> str:
    """' (did you mean ...?)' for a misspelt key, or ''."""
    # str: YAML reads a key such as `8:`, `on:` or `null:` as a number, a bool or None
    close = difflib.get_close_matches(str(key), [str(f) for f in fields], n=3, cutoff=0.75)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _type_ok(value, annotation) -> bool:
    if annotation is Any or annotation is None:
        return True
    origin = typing.get_origin(annotation)
    string_enum = _string_enum(annotation)
    if string_enum:
        return value in [m.value for m in string_enum] or (value is None and type(None) in _members(annotation))
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in literal_choices(annotation)
    if annotation is type(None):
        return value is None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in [m.value for m in annotation] or (isinstance(value, str) and value in annotation.__members__)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        args = typing.get_args(annotation)
        return isinstance(value, list) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True  # exotic annotations (callables, classes): let the config's own __post_init__ judge


def check_type(value, annotation, where: str):
    """Raise naming `where` unless `value` fits `annotation`; returns the value as the field takes it: YAML 1.1's
    string floats (`1e-4` is a string to PyYAML, `1.0e-4` a float) as floats where a float is expected, also inside
    lists, and a lone value where a list is expected as a list of one (TRL's `loss_type: sigmoid`,
    `lora_target_modules: all-linear`, as TRL's own parser takes them)."""
    fitted = _fit(value, annotation)
    if fitted is _MISFIT:
        choices = literal_choices(annotation) or _enum_values(annotation)
        if choices:
            raise UserError(f"{where}: {value!r}; expected one of: {', '.join(map(str, choices))}")
        shown = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        raise UserError(f"{where}: {value!r} ({type(value).__name__}) is not a valid {shown}")
    return fitted


_MISFIT = object()


def _fit(value, annotation):
    """`value` as `check_type` returns it, or `_MISFIT`."""
    if _type_ok(value, annotation):
        return value
    if isinstance(value, str) and _type_ok(0.5, annotation):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if _type_ok(number, annotation):
                return number
    for member in _members(annotation):
        if member is list or typing.get_origin(member) is list:
            if value is None:
                continue
            item = (typing.get_args(member) or (Any,))[0]
            items = [_fit(v, item) for v in (value if isinstance(value, list) else [value])]  # lone: a list of one
            if all(v is not _MISFIT for v in items):
                return items
    return _MISFIT


_PLAIN = {kind.__name__: kind for kind in (bool, int, float, str, list, dict, tuple)}


def annotation_to_json(annotation):
    """`annotation` in a JSON form that keeps what `check_type` judges by: plain types, unions, literals and the
    element type of lists. An enum becomes the literal of its values and member names (what `check_type` accepts for
    it); any other class becomes Any, which `check_type` leaves to the config's own `__post_init__` as before."""
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and _PLAIN.get(annotation.__name__) is annotation:
        return annotation.__name__
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    values = _enum_values(annotation)
    if values:  # `Enum | str`: the enum's values (see `_string_enum`)
        return {"union": [{"literal": values}, "None"]} if type(None) in args else {"literal": values}
    if origin in (typing.Union, types.UnionType):
        return {"union": [annotation_to_json(arg) for arg in args]}
    if origin is typing.Literal:
        return {"literal": list(args)}
    if origin in (list, tuple, dict):
        return {origin.__name__: [annotation_to_json(arg) for arg in args]}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"literal": [member.value for member in annotation] + list(annotation.__members__)}
    return "Any"


def annotation_from_json(spec):
    """The annotation `annotation_to_json` wrote (`str | None` again, so error messages read the same)."""
    if spec == "None":
        return type(None)
    if spec == "Any":
        return Any
    if isinstance(spec, str):
        return _PLAIN[spec]
    ((kind, args),) = spec.items()
    if kind == "literal":
        return Literal[tuple(args)]
    parts = [annotation_from_json(arg) for arg in args]
    if kind == "union":
        try:
            return functools.reduce(operator.or_, parts)
        except TypeError:  # a part without `|`
            return typing.Union[tuple(parts)]  # noqa: UP007 (built from parts, `|` is what failed)
    return _PLAIN[kind][tuple(parts)] if parts else _PLAIN[kind]
