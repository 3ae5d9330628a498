"""Load YAML and validate it with pydantic, reporting errors as ``file:line: field: message``.

PyYAML gives us node positions; pydantic gives us the failing field path. Joining the two is
what lets a user jump straight to the bad line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kmodtest.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the node at ``loc`` (or of the deepest ancestor found)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            if match is None:
                return line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _yaml_error(exc: yaml.YAMLError) -> str:
    """``line: malformed YAML: what`` (and where the construct it broke began)."""
    mark = getattr(exc, "problem_mark", None)
    reason = getattr(exc, "problem", None) or str(exc)
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        reason = f"{context}, {reason}"
    if context and start is not None and mark is not None and start.line != mark.line:
        reason += f" (it started at line {start.line + 1})"
    return f"{mark.line + 1 if mark else 1}: malformed YAML: {reason}"


def _duplicate_key(
    node: yaml.Node | None, loc: tuple[int | str, ...]
) -> tuple[int, tuple[int | str, ...]] | None:
    """(line, field) of the first key given twice in one mapping: PyYAML keeps the last one
    silently, so a copy-paste slip would change a cell without a word."""
    if isinstance(node, yaml.MappingNode):
        seen: set[object] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    return key.start_mark.line + 1, (*loc, key.value)
                seen.add(key.value)
            if found := _duplicate_key(value, (*loc, getattr(key, "value", "?"))):
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            if found := _duplicate_key(item, (*loc, i)):
                return found
    return None


@dataclass(frozen=True)
class Located(Generic[M]):
    """A validated model and the YAML nodes it came from, to name the line of a field that a
    check after validation (one across cells or files) finds wrong."""

    model: M
    path: Path
    node: yaml.Node | None

    def where(self, loc: tuple[int | str, ...]) -> str:
        """``file:line: field`` of ``loc``, the prefix of every message about it."""
        return f"{self.path}:{_line_of(self.node, loc) or 1}: {_field_path(loc)}"


def load_located(path: Path, model: type[M], fix: str) -> Located[M]:
    """Parse ``path`` into ``model``; any problem becomes a ConfigError naming file and line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", fix) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({exc.reason})", fix) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}:{_yaml_error(exc)}", fix) from None
    if duplicate := _duplicate_key(node, ()):
        line, loc = duplicate
        raise ConfigError(f"{path}:{line}: {_field_path(loc)}: given twice in one mapping", fix)
    try:
        return Located(model.model_validate(data if data is not None else {}), path, node)
    except ValidationError as exc:
        empty = " (the file is empty)" if node is None else ""
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = _line_of(node, loc) or 1
            lines.append(f"{path}:{line}: {_field_path(loc)}: {err['msg']}{empty}")
        raise ConfigError("\n".join(lines), fix) from None


def load_model(path: Path, model: type[M], fix: str) -> M:
    """:func:`load_located`'s model, when no later check needs lines."""
    return load_located(path, model, fix).model
