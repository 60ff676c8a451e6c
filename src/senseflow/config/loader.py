"""Generic YAML recipe loader for pydantic v2 schemas.

The loader is schema-agnostic: any ``pydantic.BaseModel`` subclass can be passed as ``schema``.
Pipeline of :func:`load_config`:

1. read the YAML recipe (or take a mapping), resolving ``base:`` inheritance (deep merge, paths
   relative to the file that names them);
2. apply dotted ``key.sub=value`` overrides, each value parsed as YAML;
3. validate with the schema.

YAML is read with :class:`RecipeLoader`, a ``yaml.SafeLoader`` that refuses a key repeated in one
mapping and reads ``1e-5`` as a number (YAML 1.2), for files and override values alike.

Every failure (missing file, invalid YAML, duplicate key, unknown key, wrong type, out-of-range or
non-finite value, failed cross-field check) raises :class:`ConfigError`: one problem per entry of
``problems``, the dotted field path first, and a one-line message.
The error type and the formatting of pydantic errors live in :mod:`senseflow.config.errors`; their
names are re-exported here.
"""

from __future__ import annotations

import copy
import os
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from senseflow.config.errors import ConfigError, field_error, format_validation_error, suggest
from senseflow.config.recipes import resolve_recipe, shipped_recipe, shipped_recipes

__all__ = [
    "BASE_KEY",
    "ConfigError",
    "DuplicateKeyError",
    "RecipeLoader",
    "apply_overrides",
    "deep_merge",
    "dump_config",
    "field_error",
    "flatten_config",
    "format_validation_error",
    "load_config",
    "load_yaml",
    "read_recipe",
    "save_resolved",
    "suggest",
    "validate",
]

M = TypeVar("M", bound=BaseModel)

#: Key naming the recipe(s) a file inherits from (a path or a list of paths, relative to the file).
BASE_KEY = "base"


# --------------------------------------------------------------------------------------------------
# Reading recipes
# --------------------------------------------------------------------------------------------------


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (``path`` is the dotted key, ``line``/``first`` 1-based)."""

    def __init__(self, path: str, key: Any, at: yaml.Mark, first: yaml.Mark) -> None:
        self.path, self.key = path, key
        self.line, self.first = at.line + 1, first.line + 1
        if self.line == self.first:  # a flow mapping on one line: say the columns
            self.where = f"line {self.line}, column {at.column + 1} (first at column {first.column + 1})"
        else:
            self.where = f"line {self.line} (first at line {self.first})"
        super().__init__(f"duplicate key {key!r} at {self.where}")

    def describe(self, source: str) -> str:
        return f"{self.path}: duplicate key {self.key!r} in {source}, {self.where}"


# A YAML 1.2 float without a dot ('1e-5', '3E+2'), which PyYAML's YAML 1.1 rules read as a string.
_EXPONENT_FLOAT = re.compile(r"[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+\Z")


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (instead of keeping the last)
    and reads ``1e-5`` as a float, as YAML 1.2 does."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_duplicates(node, [], set())
        return super().construct_document(node)

    def _check_duplicates(self, node: yaml.Node, path: list[str], seen: set[int]) -> None:
        if id(node) in seen:  # an alias met again (recursive anchors end here)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._check_duplicates(item, [*path, str(index)], seen)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Mark] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base': later keys override it
                    self._check_duplicates(value_node, path, seen)
                    continue
                key = (
                    self.construct_object(key_node, deep=True)
                    if isinstance(key_node, yaml.ScalarNode)
                    else None
                )
                mark = key_node.start_mark
                try:
                    earlier = first.get(key) if key is not None else None
                except TypeError:  # an unhashable key; construct_mapping reports it
                    earlier = None
                if earlier is not None:
                    raise DuplicateKeyError(".".join([*path, str(key)]), key, mark, earlier)
                if key is not None:
                    first[key] = mark
                self._check_duplicates(value_node, [*path, str(key)], seen)


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """Parse one YAML document with :class:`RecipeLoader` (safe: plain data only)."""
    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_load_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = ""
        if path.parent.is_dir():
            hint = suggest(
                path.name, (p.name for p in path.parent.iterdir() if p.suffix in {".yaml", ".yml"})
            )
        raise ConfigError(
            f"recipe file not found: '{path}'{hint} (shipped recipes, usable by name: "
            f"{', '.join(shipped_recipes())})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"recipe path is a directory, expected a YAML file: '{path}'") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe file '{path}': {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"recipe file '{path}' is not UTF-8 text (bad byte at offset {exc.start}); expected a YAML file"
        ) from None
    try:
        return load_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(exc.describe(f"'{path}'")) from None
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
        if not parent.is_absolute():  # beside the recipe, else a shipped recipe of that name
            local = base_dir / parent
            parent = local if local.is_file() else (shipped_recipe(name) or local)
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
        value = load_yaml(raw) if raw.strip() else None
    except DuplicateKeyError as exc:
        raise ConfigError(f"{key}.{exc.path}: duplicate key {exc.key!r} in override {item!r}") from None
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
    the value is parsed as YAML. Raises :class:`ConfigError` on any problem.
    """
    if schema is None:
        from senseflow.config.schema import DistillConfig

        schema = typing.cast(type[M], DistillConfig)
    if overrides is None:
        overrides = ()
    elif isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(source, Mapping):
        source = resolve_recipe(source)
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
