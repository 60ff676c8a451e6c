"""Generic YAML recipe loader for pydantic v2 schemas.

The loader is schema-agnostic: any ``pydantic.BaseModel`` subclass can be passed as ``schema``.
Pipeline of :func:`load_config`:

1. read the YAML recipe (or take a mapping), resolving ``base:`` inheritance (deep merge, paths
   relative to the file that names them);
2. apply dotted ``key.sub=value`` overrides, each value parsed with ``yaml.safe_load``;
3. validate with the schema.

Every failure (missing file, invalid YAML, unknown key, wrong type, out-of-range value, failed
cross-field check) raises :class:`ConfigError` with one line per problem, the dotted field path first.

Validators may point an error at a sub-field by starting the message with ``@<relative.dotted.path>:``
(see :func:`field_error`); the loader appends that path to the location pydantic reports.
"""

from __future__ import annotations

import copy
import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = [
    "BASE_KEY",
    "ConfigError",
    "apply_overrides",
    "deep_merge",
    "dump_config",
    "field_error",
    "flatten_config",
    "format_validation_error",
    "load_config",
    "read_recipe",
    "save_resolved",
    "suggest",
    "validate",
]

M = TypeVar("M", bound=BaseModel)

#: Key naming the recipe(s) a file inherits from (a path or a list of paths, relative to the file).
BASE_KEY = "base"

_MAX_INPUT_REPR = 80


class ConfigError(ValueError):
    """A recipe could not be read, overridden or validated.

    ``problems`` holds one line per problem, each starting with the dotted field path (or the file).
    ``str(err)`` is a header naming the source followed by the problems, one per line.
    """

    def __init__(self, problems: str | Sequence[str], source: str | None = None) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        if source is not None and len(self.problems) > 1:
            head = f"invalid configuration ({source}): {len(self.problems)} problems"
            message = "\n".join([head, *(f"  {p}" for p in self.problems)])
        elif source is not None:
            message = f"invalid configuration ({source}): {self.problems[0]}"
        else:
            message = "\n".join(self.problems)
        super().__init__(message)


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
# Reading recipes
# --------------------------------------------------------------------------------------------------


def _yaml_load_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = ""
        if path.parent.is_dir():
            hint = suggest(
                path.name, (p.name for p in path.parent.iterdir() if p.suffix in {".yaml", ".yml"})
            )
        raise ConfigError(f"recipe file not found: '{path}'{hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe path is a directory, expected a YAML file: '{path}'") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe file '{path}': {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        detail = f"{context}; {problem}" if context else problem
        raise ConfigError(f"invalid YAML in '{path}'{where}: {detail}") from None


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``update``: mappings merge recursively, anything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_bases(
    data: dict[str, Any], base_dir: Path, origin: str, stack: tuple[Path, ...]
) -> dict[str, Any]:
    if BASE_KEY not in data:
        return data
    data = dict(data)
    bases = data.pop(BASE_KEY)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"{BASE_KEY}: expected a recipe path or a list of recipe paths (in {origin}), got {bases!r}"
        )
    merged: dict[str, Any] = {}
    for name in bases:
        parent = Path(os.path.expanduser(name))
        if not parent.is_absolute():
            parent = base_dir / parent
        merged = deep_merge(merged, _read_file(parent, stack))
    return deep_merge(merged, data)


def _read_file(path: Path, stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError(f"{BASE_KEY}: recipe inheritance cycle: {chain}")
    data = _yaml_load_file(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must contain a mapping at top level, got {type(data).__name__}")
    return _resolve_bases(data, path.parent, str(path), (*stack, resolved))


def read_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any], base_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Read a recipe into a plain dict with ``base:`` inheritance resolved (no overrides, no validation).

    ``source`` is a YAML file path or a mapping; for a mapping, ``base:`` paths are relative to
    ``base_dir`` (default: the current directory).
    """
    if isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
        root = Path(base_dir) if base_dir is not None else Path.cwd()
        return _resolve_bases(data, root, "<mapping>", ())
    return _read_file(Path(os.path.expanduser(os.fspath(source))))


# --------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------


def _parse_override(item: str) -> tuple[list[str], Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r}: expected 'dotted.key=value'")
    key, _, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {item!r}: expected 'dotted.key=value' with a non-empty dotted key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{key}: override value {raw!r} is not valid YAML ({problem})") from None
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied in order.

    Missing intermediate mappings are created (unknown keys are then reported by validation);
    an integer path component indexes into an existing list.
    """
    out = copy.deepcopy(dict(data))
    for item in overrides:
        parts, value = _parse_override(item)
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            node = _descend(node, part, parts[: depth + 1], item)
        _assign(node, parts[-1], value, parts, item)
    return out


def _descend(node: Any, part: str, path: list[str], item: str) -> Any:
    if isinstance(node, dict):
        if node.get(part) is None:
            node[part] = {}
        child = node[part]
        if not isinstance(child, (dict, list)):
            raise ConfigError(
                f"{'.'.join(path)}: override {item!r} goes below this key, but it holds "
                f"{child!r}, not a mapping"
            )
        return child
    if isinstance(node, list):
        return node[_list_index(node, part, path, item)]
    raise ConfigError(f"{'.'.join(path[:-1])}: override {item!r} goes below a {type(node).__name__}")


def _assign(node: Any, part: str, value: Any, path: list[str], item: str) -> None:
    if isinstance(node, dict):
        node[part] = value
    elif isinstance(node, list):
        node[_list_index(node, part, path, item)] = value
    else:  # pragma: no cover - _descend guarantees containers
        raise ConfigError(f"{'.'.join(path)}: cannot apply override {item!r}")


def _list_index(node: list[Any], part: str, path: list[str], item: str) -> int:
    try:
        index = int(part)
    except ValueError:
        raise ConfigError(
            f"{'.'.join(path)}: override {item!r} uses key '{part}' on a list; expected an integer index"
        ) from None
    if not -len(node) <= index < len(node):
        raise ConfigError(
            f"{'.'.join(path)}: override {item!r}: index {index} out of range for a list of {len(node)}"
        )
    return index


# --------------------------------------------------------------------------------------------------
# Validation errors -> ConfigError
# --------------------------------------------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``Optional`` wrappers."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


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


def _walk(schema: type[BaseModel], loc: Sequence[int | str]) -> _Located:
    """Map a pydantic error location onto the user's dotted path, skipping union branch labels."""
    out = _Located()
    tp: Any = schema
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
            continue
        out.field_description = None
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (list, tuple, set, frozenset, Sequence) and args:
            tp = args[0]
        elif origin in (dict, Mapping) and len(args) == 2:
            tp = args[1]
        else:
            tp = None
    out.tp = _unwrap(tp) if tp is not None else None
    return out


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


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def validate(
    data: Mapping[str, Any],
    schema: type[M],
    source: str | None = None,
    override_paths: Mapping[str, str] | None = None,
) -> M:
    """Validate a plain mapping with ``schema``, converting failures into :class:`ConfigError`."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, schema, override_paths), source=source) from None


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Sequence[str] | None = (),
    schema: type[M] | None = None,
    *,
    base_dir: str | os.PathLike[str] | None = None,
) -> M:
    """Read a YAML recipe (or mapping), apply dotted overrides and validate it with ``schema``.

    ``schema`` defaults to :class:`senseflow.config.schema.DistillConfig`. Overrides look like
    ``optim.generator.lr=1e-6``, ``method.ida.enabled=false`` or ``model.anchors.values=[999,749,499,249]``;
    the value is parsed with ``yaml.safe_load``. Raises :class:`ConfigError` on any problem.
    """
    if schema is None:
        from senseflow.config.schema import DistillConfig

        schema = typing.cast(type[M], DistillConfig)
    if overrides is None:
        overrides = ()
    elif isinstance(overrides, str):
        overrides = [overrides]
    label = "<mapping>" if isinstance(source, Mapping) else os.fspath(source)
    try:
        data = read_recipe(source, base_dir=base_dir)
        data = apply_overrides(data, overrides)
    except ConfigError as exc:
        if exc.source is None:
            raise ConfigError(exc.problems, source=label) from None
        raise
    override_paths = {item.partition("=")[0].strip(): item for item in overrides}
    return validate(data, schema, source=label, override_paths=override_paths)


class _RecipeDumper(yaml.SafeDumper):
    """Block-style mappings; short lists of scalars in flow style (``[999, 749, 499, 249]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(
        isinstance(x, (int, float, bool)) or x is None or (isinstance(x, str) and len(x) <= 32) for x in data
    )
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)
_RecipeDumper.add_representer(tuple, _represent_list)


def dump_config(cfg: BaseModel) -> str:
    """Serialise a validated config as YAML (field order preserved) that :func:`load_config` reads back."""
    data = cfg.model_dump(mode="json")
    return yaml.dump(
        data, Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100
    )


def save_resolved(cfg: BaseModel, path: str | os.PathLike[str], header: str | None = None) -> Path:
    """Write the fully resolved config (defaults filled, bases merged, overrides applied) to ``path``.

    Parent folders are created. The file round-trips: ``load_config(path, schema=type(cfg)) == cfg``.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Resolved senseflow configuration (all defaults filled in); loadable as a recipe."]
    if header:
        lines.extend(f"# {line}" for line in header.splitlines())
    out.write_text("\n".join(lines) + "\n" + dump_config(cfg), encoding="utf-8")
    return out


def flatten_config(cfg: BaseModel | Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """Flatten a config into ``{'dotted.key': scalar}`` (lists become strings), e.g. for hparam logging."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)
    flat: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(f"{prefix}{sep}{key}" if prefix else str(key), value)
        elif isinstance(node, (list, tuple)):
            flat[prefix] = str(list(node))
        else:
            flat[prefix] = node

    visit("", data)
    return flat
