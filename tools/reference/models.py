"""Reference pages from pydantic models: a section per object, a row per field.

A field's description is its `Field(description=...)`, else the comments right above its
annotated assignment in the source (and one at the end of its line), else the docstring of
the model it holds: the models document their fields with comments, and reading those keeps
one text for the code's readers and the reference's. A comment's lines from one starting
with `<note>:` (such as `Envoy:`) on go to a column of their own.

The type, default and bounds come from the annotations: `Literal` values, `Field` constraints
(ge, le, min_length, max_length, pattern), and what a validator accepts, from its docstring.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import re
import sys
import tokenize
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo

from tools.reference.markdown import anchor, code, paragraph, table

_PRAGMAS = ("fmt:", "noqa", "type:", "pragma:")
_SCALARS = {str: "string", int: "integer", bool: "boolean", float: "number"}


@dataclass(frozen=True)
class Shape:
    """What a type annotation tells a reader: a name, bounds, and the models inside it (each
    with the path suffix that leads to it: "" for the object itself, "[]" for a list's item,
    ".<name>" for a map's value)."""

    text: str
    bounds: tuple[str, ...] = ()
    models: tuple[tuple[str, type[BaseModel]], ...] = ()
    nullable: bool = False


def field_shape(model: type[BaseModel], name: str) -> Shape:
    """The shape of field `name`, its own constraints included; a map's keys are named after
    the alias of their type in the model's module (`dict[Resource, ...]`: `<resource>`)."""
    info = model.model_fields[name]
    found = shape(info.annotation, vars(sys.modules[model.__module__]))
    return replace(found, bounds=found.bounds + constraints(info.metadata, found.text))


def shape(annotation: Any, aliases: Mapping[str, Any]) -> Shape:
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *metadata = get_args(annotation)
        base = shape(inner, aliases)
        return replace(base, bounds=base.bounds + constraints(metadata, base.text))
    if origin in (Union, types.UnionType):
        return _union(get_args(annotation), aliases)
    if origin is Literal:
        return _literal(get_args(annotation))
    if origin in (tuple, list):
        return _list(shape(get_args(annotation)[0], aliases))
    if origin is dict:
        key, value = get_args(annotation)
        return _map(key, value, aliases)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return Shape("object", models=(("", annotation),))
    return Shape(_SCALARS.get(annotation, "any" if annotation is Any else str(annotation)))


def _union(members: tuple[Any, ...], aliases: Mapping[str, Any]) -> Shape:
    present = [member for member in members if member is not type(None)]
    nullable = len(present) < len(members)
    if len(present) == 1:
        return replace(shape(present[0], aliases), nullable=nullable)
    shapes = [shape(member, aliases) for member in present]
    bounds = tuple(f"{s.text}: {', '.join(s.bounds)}" for s in shapes if s.bounds)
    models = tuple(model for s in shapes for model in s.models)
    return Shape(" or ".join(s.text for s in shapes), bounds, models, nullable)


def _literal(values: tuple[Any, ...]) -> Shape:
    name = _SCALARS.get(type(values[0]), "string")
    if len(values) == 1:
        return Shape(name, (f"exactly {code(values[0])}",))
    return Shape(name, ("one of " + ", ".join(code(value) for value in values),))


def _list(item: Shape) -> Shape:
    text = f"list of {item.text}s" if " " not in item.text else f"list of ({item.text})"
    bounds = tuple(f"each: {bound}" for bound in item.bounds)
    return Shape(text, bounds, tuple((f"[]{suffix}", m) for suffix, m in item.models))


def _map(key: Any, value: Any, aliases: Mapping[str, Any]) -> Shape:
    if value is Any:
        return Shape("object")
    keys = get_args(key) if get_origin(key) is Literal else ()
    alias = next((name for name, known in aliases.items() if keys and known == key), "name")
    placeholder = f"<{alias.lower()}>"
    item = shape(value, aliases)
    bounds: tuple[str, ...] = (f"keys: one of {', '.join(map(code, keys))}",) if keys else ()
    bounds += tuple(f"each value: {bound}" for bound in item.bounds)
    models = tuple((f".{placeholder}{suffix}", m) for suffix, m in item.models)
    return Shape(f"map of {item.text}s", bounds, models)


def constraints(metadata: Sequence[Any], text: str) -> tuple[str, ...]:
    """Field constraints in words; lengths count characters of a string, else items."""
    found: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            return constraints(item.metadata, text)
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"):
            if getattr(item, name, None) is not None:
                found[name] = getattr(item, name)
        if isinstance(item, AfterValidator) and item.func.__doc__:
            found["accepted"] = inspect.cleandoc(item.func.__doc__)
    unit = "characters" if text == "string" else "entries" if text.startswith("map") else "items"
    bounds = [_span(found.get("ge"), found.get("le"), "", found.get("gt"), found.get("lt"))]
    bounds.append(_span(found.get("min_length"), found.get("max_length"), f" {unit}"))
    if "pattern" in found:
        bounds.append(f"matches {code(found['pattern'])}")
    bounds.append(found.get("accepted", ""))
    return tuple(bound for bound in bounds if bound)


def _span(low: object, high: object, unit: str, above: object = None, below: object = None) -> str:
    if low is not None and high is not None:
        return f"{low} to {high}{unit}"
    if unit and (low == 1 or high == 1):
        unit = unit.removesuffix("s").replace("entrie", "entry")
    parts = [f"at least {low}{unit}" if low is not None else ""]
    parts.append(f"greater than {above}" if above is not None else "")
    parts.append(f"at most {high}{unit}" if high is not None else "")
    parts.append(f"less than {below}" if below is not None else "")
    return ", ".join(part for part in parts if part)


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    if value is None:
        return "none"
    if isinstance(value, str):
        return code(value) if value else '`""`'
    if isinstance(value, bool | int | float):
        return code(json.dumps(value))
    flow = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=1 << 16)
    return code(flow.strip())


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


# Descriptions from the source ----------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    lines: list[str]
    comments: dict[int, str]  # line number: the comment's text, without '#'
    classes: dict[str, ast.ClassDef]


@cache
def _source(path: str) -> _Source:
    text = Path(path).read_text(encoding="utf-8")
    comments = {
        token.start[0]: token.string.removeprefix("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(text).readline)
        if token.type == tokenize.COMMENT
    }
    tree = ast.parse(text)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    return _Source(text.splitlines(), comments, classes)


def field_comment(model: type[BaseModel], name: str) -> list[str]:
    """The comment lines that document field `name` of `model`, in the source's order."""
    owner = next(k for k in model.__mro__ if name in vars(k).get("__annotations__", {}))
    source = _source(inspect.getsourcefile(owner) or "")
    statement = next(
        node
        for node in source.classes[owner.__name__].body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and node.target.id == name
    )
    above: list[str] = []
    line = statement.lineno - 1
    while line in source.comments and source.lines[line - 1].lstrip().startswith("#"):
        above.insert(0, source.comments[line])
        line -= 1
    end = statement.end_lineno or statement.lineno
    inline = [source.comments[n] for n in range(statement.lineno, end + 1) if n in source.comments]
    return [text for text in (*above, *inline) if text and not text.startswith(_PRAGMAS)]


def docstring(model: type[BaseModel]) -> str:
    """The model's own docstring as one paragraph (pydantic's BaseModel has one of its own)."""
    text = vars(model).get("__doc__")
    return " ".join(inspect.cleandoc(text).split()) if text else ""


def describe(model: type[BaseModel], name: str, note: str | None) -> tuple[str, str]:
    """(description, note): the note is the comment from its `<note>:` line on."""
    info = model.model_fields[name]
    lines = field_comment(model, name)
    start = next(
        (i for i, line in enumerate(lines) if note and line.startswith(f"{note}:")), len(lines)
    )
    description = info.description or " ".join(lines[:start])
    remark = " ".join(lines[start:]).removeprefix(f"{note}:").strip() if note else ""
    if not description:
        held = field_shape(model, name).models
        description = docstring(held[0][1]) if len(held) == 1 else ""
    return description, remark


# Pages ------------------------------------------------------------------------------------------


def sections(root: type[BaseModel], path: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """Every object below `root`, depth first in the order of the fields, with its path."""
    yield path, root
    for name in root.model_fields:
        for suffix, model in field_shape(root, name).models:
            yield from sections(model, f"{path}.{name}{suffix}".lstrip("."))


def reference(root: type[BaseModel], root_title: str, note: str | None = None) -> list[str]:
    """A section per object below `root`, each with its docstring and a table of its fields;
    a field holding an object links to that object's section. `note`: see `describe`."""
    headings = {path: _heading(path, root_title) for path, _ in sections(root)}
    lines: list[str] = []
    for path, model in sections(root):
        lines += [f"## {headings[path]}", "", *paragraph(docstring(model))]
        rows = [_row(model, name, path, headings, note) for name in model.model_fields]
        columns = ["field", "type", "default", "accepted", "description", note or ""]
        lines += table(columns, rows)
    return lines


def _heading(path: str, root_title: str) -> str:
    return code(path) if path else root_title


def _row(
    model: type[BaseModel], name: str, path: str, headings: dict[str, str], note: str | None
) -> list[str]:
    found = field_shape(model, name)
    default = default_text(model.model_fields[name])
    text = found.text
    if found.nullable and default != "none":
        text += " or null"
    full = f"{path}.{name}".lstrip(".")
    if found.models:  # the first object the type names links to its section
        target = anchor(headings[full + found.models[0][0]])
        text = re.sub(r"\bobjects?\b", lambda m: f"[{m.group()}]({target})", text, count=1)
    description, remark = describe(model, name, note)
    return [code(full), text, default, "; ".join(found.bounds), description, remark]
