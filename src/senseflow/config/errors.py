"""Configuration errors: :class:`ConfigError` and the pydantic-error formatter.

:func:`format_validation_error` turns a pydantic ``ValidationError`` into one ``'dotted.path: problem'``
line per problem, mapping pydantic's error locations back onto the user's recipe keys (skipping union
branch labels) and suggesting close matches for unknown keys and tags. A number out of its range (or
not finite, or not a number) is reported with the bound the schema gives it:
``optim.generator.lr: must be a finite number > 0, got inf``.

Validators may point an error at a sub-field by starting the message with ``@<relative.dotted.path>:``
(see :func:`field_error`); the formatter appends that path to the location pydantic reports.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

__all__ = [
    "ConfigError",
    "field_error",
    "format_validation_error",
    "number_expectation",
    "suggest",
]

_MAX_INPUT_REPR = 80


class ConfigError(ValueError):
    """A recipe could not be read, overridden or validated.

    ``problems`` holds one line per problem, each starting with the dotted field path (or the file).
    ``str(err)`` is always a single line (the command line prints ``error: <message>``): one problem
    followed by ``(in <source>)``, or ``N problems in <source>: p1; p2; ...``.
    """

    def __init__(self, problems: str | Sequence[str], source: str | None = None) -> None:
        items = [problems] if isinstance(problems, str) else list(problems)
        self.problems: list[str] = [_one_line(p) for p in items] or ["invalid configuration"]
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        joined = "; ".join(self.problems)
        if self.source is None:
            return joined
        if len(self.problems) == 1:
            problem = self.problems[0]
            return problem if self.source in problem else f"{problem} (in {self.source})"
        return f"{len(self.problems)} problems in {self.source}: {joined}"


def _one_line(text: str) -> str:
    """``text`` on one line: its lines (stripped, blank ones dropped) joined with '; '."""
    text = str(text)
    if "\n" not in text and "\r" not in text:
        return text.strip()
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def field_error(path: str, message: str) -> ValueError:
    """Build a ``ValueError`` for a validator that points at ``path`` (relative to the validated model).

    Example, inside a model validator of ``method.ida``: ``raise field_error("lam", "required when ...")``
    is reported as ``method.ida.lam: required when ...``.
    """
    return ValueError(f"@{path}: {message}")


def suggest(word: str, candidates: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest candidate (difflib), or ``""`` when none is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


# --------------------------------------------------------------------------------------------------
# Validation errors -> ConfigError
# --------------------------------------------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``Optional`` wrappers."""
    return _constraints(tp)[0]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _union_members(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [_unwrap(a) for a in typing.get_args(tp) if a is not type(None)]
    return []


def _tag_of(model: type[BaseModel]) -> set[str]:
    tags: set[str] = set()
    for field in model.model_fields.values():
        ann = _unwrap(field.annotation)
        if typing.get_origin(ann) is typing.Literal:
            tags.update(str(a) for a in typing.get_args(ann))
    return tags


class _Located:
    """Result of walking a schema along an error location."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.field_description: str | None = None
        self.tp: Any = None  # schema type at the location (None when unknown)
        self.metadata: list[Any] = []  # constraints on it (annotated-types objects, validators)


def _constraints(tp: Any, metadata: Sequence[Any] = ()) -> tuple[Any, list[Any]]:
    """Strip ``Annotated`` and ``Optional`` from ``tp``, collecting the constraints met on the way."""
    found = list(metadata)
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            base, *extras = typing.get_args(tp)
            for extra in extras:
                found.extend(extra.metadata if isinstance(extra, FieldInfo) else [extra])
            tp = base
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp, found


def _element(tp: Any, part: int | str) -> Any:
    """The type of item ``part`` of a container type (None when unknown)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis and isinstance(part, int):
        return args[part] if 0 <= part < len(args) else None
    if origin in (list, tuple, set, frozenset, Sequence) and args:
        return args[0]
    if origin in (dict, Mapping) and len(args) == 2:
        return args[1]
    return None


def _walk(schema: type[BaseModel], loc: Sequence[int | str]) -> _Located:
    """Map a pydantic error location onto the user's dotted path, skipping union branch labels."""
    out = _Located()
    tp: Any = schema
    metadata: list[Any] = []
    for part in loc:
        tp = _unwrap(tp)
        members = _union_members(tp)
        if members and isinstance(part, str):
            chosen = next((m for m in members if _is_model(m) and part in _tag_of(m)), None)
            if chosen is not None:
                tp = chosen
                continue
            if not any(_is_model(m) and part in m.model_fields for m in members):
                continue  # a smart-union branch label such as 'int' or 'float'
            tp = next(m for m in members if _is_model(m) and part in m.model_fields)
        out.parts.append(str(part))
        if _is_model(tp):
            field = tp.model_fields.get(str(part))
            out.field_description = field.description if field is not None else None
            tp = field.annotation if field is not None else None
            metadata = list(field.metadata) if field is not None else []
            continue
        out.field_description = None
        tp = _element(tp, part)
        metadata = []
    if tp is not None:
        out.tp, out.metadata = _constraints(tp, metadata)
    return out


# pydantic error types about a number: wrong type, not finite, out of range (``number_bool`` is raised
# by the number types of senseflow.config.common for a boolean).
_NUMBER_ERRORS = frozenset(
    {
        "number_bool",
        "finite_number",
        "float_type",
        "float_parsing",
        "int_type",
        "int_parsing",
        "int_parsing_size",
        "int_from_float",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
    }
)


def _fmt_bound(value: Any) -> str:
    if isinstance(value, int) and value >= 2**31 and (value + 1).bit_count() == 1:
        return f"2**{(value + 1).bit_length() - 1} - 1"  # 9223372036854775807 -> 2**63 - 1
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def number_expectation(tp: Any, metadata: Sequence[Any]) -> str | None:
    """``'a finite number > 0'``, ``'an integer >= 0 and <= 999'``... for a numeric schema type, or None.

    The tightest bound of each side is taken from the annotated-types constraints in ``metadata``.
    """
    if tp is bool or tp not in (int, float):
        return None
    lower: tuple[Any, str] | None = None
    upper: tuple[Any, str] | None = None
    for item in metadata:
        for attr, symbol in (("gt", ">"), ("ge", ">=")):
            value = getattr(item, attr, None)
            if value is not None and (
                lower is None or value > lower[0] or (value == lower[0] and symbol == ">")
            ):
                lower = (value, symbol)
        for attr, symbol in (("lt", "<"), ("le", "<=")):
            value = getattr(item, attr, None)
            if value is not None and (
                upper is None or value < upper[0] or (value == upper[0] and symbol == "<")
            ):
                upper = (value, symbol)
    noun = "an integer" if tp is int else "a finite number"
    bounds = [f"{bound[1]} {_fmt_bound(bound[0])}" for bound in (lower, upper) if bound is not None]
    return " ".join([noun, " and ".join(bounds)]) if bounds else noun


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_INPUT_REPR else text[: _MAX_INPUT_REPR - 3] + "..."


_COMPARISONS = (
    ("greater than or equal to ", ">= "),
    ("less than or equal to ", "<= "),
    ("greater than ", "> "),
    ("less than ", "< "),
)


def _expectation(msg: str) -> str:
    """Rephrase pydantic's message as an expectation ('Input should be X' -> 'expected X')."""
    for prefix, repl in (("Value error, ", ""), ("Assertion failed, ", "")):
        if msg.startswith(prefix):
            return repl + msg[len(prefix) :]
    if msg.startswith("Input should be "):
        rest = msg[len("Input should be ") :]
        for words, symbol in _COMPARISONS:
            if rest.startswith(words):
                return f"expected a value {symbol}{rest[len(words) :]}"
        return "expected " + rest
    return msg[:1].lower() + msg[1:]


def _first_sentence(text: str) -> str:
    head = text.split(". ")[0].strip()
    return head.rstrip(".")


def _origin_note(path: str, override_paths: Mapping[str, str]) -> str:
    for key, item in override_paths.items():
        if path == key or path.startswith(key + ".") or key.startswith(path + "."):
            return f" (from override '{item}')"
    return ""


def format_validation_error(
    error: ValidationError, schema: type[BaseModel], override_paths: Mapping[str, str] | None = None
) -> list[str]:
    """Turn a pydantic ``ValidationError`` into ``'dotted.path: problem'`` lines (deduplicated)."""
    override_paths = override_paths or {}
    lines: list[str] = []
    for err in error.errors(include_url=False):
        loc = list(err.get("loc", ()))
        kind = err.get("type", "")
        msg = str(err.get("msg", ""))
        located = _walk(schema, loc)
        parts = list(located.parts)
        body = _expectation(msg)

        if kind in {"value_error", "assertion_error"} and body.startswith("@") and ":" in body:
            rel, _, body = body[1:].partition(":")
            parts.extend(p for p in rel.strip().split(".") if p)
            body = body.strip()
            path = ".".join(parts) or "<root>"
            line = f"{path}: {body}"
        elif kind == "extra_forbidden":
            key = parts[-1] if parts else "?"
            path = ".".join(parts)
            container = _walk(schema, loc[:-1]).tp
            valid = list(container.model_fields) if _is_model(container) else []
            hint = suggest(key, valid)
            listing = f" Valid keys here: {', '.join(sorted(valid))}." if valid and len(valid) <= 16 else ""
            line = f"{path}: unknown key '{key}'{hint or '.'}{listing}"
        elif kind == "missing":
            path = ".".join(parts)
            what = f" ({_first_sentence(located.field_description)})" if located.field_description else ""
            line = f"{path}: required field is missing{what}"
        elif kind in {"union_tag_invalid", "union_tag_not_found"}:
            disc = str((err.get("ctx") or {}).get("discriminator", "")).strip("'\"")
            path = ".".join([*parts, disc] if disc else parts)
            expected = (err.get("ctx") or {}).get("expected_tags")
            if kind == "union_tag_invalid":
                tag = (err.get("ctx") or {}).get("tag")
                hint = (
                    suggest(str(tag), [t.strip("' ") for t in str(expected).split(",")]) if expected else ""
                )
                line = f"{path}: unknown {disc or 'kind'} {tag!r}, expected one of {expected}{hint}"
            else:
                line = f"{path}: required field is missing (selects the variant)"
        elif kind in _NUMBER_ERRORS and (expected := number_expectation(located.tp, located.metadata)):
            path = ".".join(parts) or "<root>"
            line = f"{path}: must be {expected}, got {_short(err.get('input'))}"
        else:
            path = ".".join(parts) or "<root>"
            value = err.get("input")
            shown = _short(value)
            got = (
                f" (got {shown})"
                if "input" in err and not isinstance(value, Mapping) and shown not in body
                else ""
            )
            line = f"{path}: {body}{got}"
        line += _origin_note(path, override_paths)
        if line not in lines:
            lines.append(line)
    return lines
