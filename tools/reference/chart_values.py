"""docs/reference/chart-values.md: the Helm chart's values, from charts/outrigger.

As helm-docs reads them: a key's description is the comment block above it from its line
starting with `# --` on (continuation lines are plain `#` lines); the type, the accepted
values and the bounds come from values.schema.json, the default from values.yaml itself.
Indented lines of a description (a list of modes under a key) keep their own line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from tools.reference.markdown import code, header, paragraph, table

CHART = Path(__file__).resolve().parents[2] / "charts" / "outrigger"
SOURCES = ("charts/outrigger/values.yaml", "charts/outrigger/values.schema.json")
COLUMNS = ("key", "type", "default", "accepted", "description")
INTRO = (
    "The values of the `outrigger` chart (`helm install ... --set key=value`, or `-f "
    "values.yaml`). `values.schema.json` checks every value at install: an unknown key or a "
    "value out of range fails, naming the key."
)
_NAMES = {"string": "string", "integer": "integer", "boolean": "boolean", "object": "object"}
_NAMES |= {"array": "list", "number": "number"}


def render(chart: Path = CHART) -> str:
    text = (chart / "values.yaml").read_text(encoding="utf-8")
    schema = json.loads((chart / "values.schema.json").read_text(encoding="utf-8"))
    descriptions = _descriptions(text)
    rows = [
        _row(path, value, _schema_at(schema, path), descriptions.get(line, ""))
        for path, line, value in _keys(yaml.compose(text, Loader=yaml.SafeLoader))
    ]
    lines = header("Helm chart values", SOURCES)
    return "\n".join([*lines, *paragraph(INTRO), *table(COLUMNS, rows)])


def _keys(node: yaml.Node | None, path: str = "") -> Iterator[tuple[str, int, Any]]:
    """(dotted path, line of the key, value) of every key, in the file's order."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        full = f"{path}.{key.value}" if path else key.value
        yield full, key.start_mark.line, yaml.safe_load(yaml.serialize(value))
        yield from _keys(value, full)


def _descriptions(text: str) -> dict[int, str]:
    """The `# --` description of each key, by the key's line (0-based)."""
    lines = text.splitlines()
    found = {}
    for number, line in enumerate(lines):
        block = _comment_block(lines, number)
        starts = [i for i, comment in enumerate(block) if comment.startswith(" --")]
        if line.strip() and not line.lstrip().startswith("#") and starts:
            found[number] = _join(block[starts[-1] :])
    return found


def _comment_block(lines: list[str], number: int) -> list[str]:
    """The comment lines right above line `number`, without their `#`."""
    block: list[str] = []
    while number > 0 and lines[number - 1].lstrip().startswith("#"):
        number -= 1
        block.insert(0, lines[number].lstrip().removeprefix("#"))
    return block


def _join(block: list[str]) -> str:
    """One cell: prose lines joined, a line indented deeper than prose (an item of a list
    of modes) on its own line, its further-indented continuations joined to it."""
    text = block[0].removeprefix(" --").strip()
    for comment in block[1:]:
        indent = len(comment) - len(comment.lstrip())
        starts_item = 2 <= indent <= 4
        text += ("<br>" if starts_item else " ") + comment.strip()
    return text


def _schema_at(schema: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    for key in path.split("."):
        schema = schema.get("properties", {}).get(key, {})
    return schema


def _row(path: str, value: Any, schema: Mapping[str, Any], description: str) -> list[str]:
    described = description or schema.get("description", "")
    return [code(path), _type(schema, value), _default(value), _accepted(schema), described]


def _type(schema: Mapping[str, Any], value: Any) -> str:
    kinds = schema.get("type")
    if kinds is None:
        kinds = _yaml_type(schema["enum"][0] if "enum" in schema else value)
    names = [_NAMES.get(kind, kind) for kind in ([kinds] if isinstance(kinds, str) else kinds)]
    items = schema.get("items", {}).get("type")
    if names == ["list"] and items:
        return f"list of {_NAMES.get(items, items)}s"
    return " or ".join(names)


def _yaml_type(value: Any) -> str:
    for kind, python in (("boolean", bool), ("integer", int), ("string", str), ("array", list)):
        if isinstance(value, python):
            return kind
    return "object"


def _default(value: Any) -> str:
    if isinstance(value, str) and "\n" in value:
        return f"({len(value.splitlines())} lines of text, see `values.yaml`)"
    if isinstance(value, dict) and value:
        return ""  # its keys have rows of their own
    return code(json.dumps(value))


def _accepted(schema: Mapping[str, Any]) -> str:
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(code(value) for value in schema["enum"]))
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None or high is not None:
        parts.append(f"{low} to {high}" if low is not None and high is not None else "")
        parts[-1] = parts[-1] or (f"at least {low}" if low is not None else f"at most {high}")
    if "maxLength" in schema:
        parts.append(f"at most {schema['maxLength']} characters")
    if "pattern" in schema:
        parts.append(f"matches {code(schema['pattern'])}")
    items = schema.get("items", {})
    if "pattern" in items:
        parts.append(f"each matches {code(items['pattern'])}")
    if schema.get("required"):
        parts.append("requires " + ", ".join(map(code, schema["required"])))
    return "; ".join(parts)
