"""Strict validation of Envoy v3 configs (proto-JSON dicts) against Envoy's real API types.

The types come from `envoy-data-plane`: Envoy's protos compiled by betterproto2 into pydantic
dataclasses, one module per proto package (`envoy_data_plane.envoy.config.bootstrap.v3`), each
message registering its type URL in `envoy_data_plane.message_pool.default_message_pool` when
its module is imported.

The library's own parser (`Message.from_dict`) does reject unknown keys, but it stops at the
first problem, names no path, and is lax where proto-JSON is not: `"yes"` is a true bool,
`1.5` a uint32, `True` a port, a string a list of its characters, and keys in any casing
(`STAT_PREFIX`, `stat-prefix`). So this module walks the dict itself, against the field
metadata betterproto2 keeps per class, and reports every problem with its JSON path:

* unknown keys (a field name is accepted in snake_case, as Envoy's YAML and our generator
  write it, or as its proto-JSON lowerCamelCase name, which the library also reads);
* JSON types of every field: objects for messages, arrays for repeated fields, objects with
  well-formed keys for maps, proto-JSON scalars (an integer is a JSON number or a decimal
  string, within the range of its proto type; a bool is only `true`/`false`; bytes are base64);
* enum values (the proto name of a member, or the number of one);
* well-known types in their JSON form: `Duration` as `"5s"`/`"0.25s"`, `Timestamp` as RFC 3339,
  wrappers (`UInt32Value`, `BoolValue`, ...) as the bare scalar, `Struct`/`Value`/`ListValue`
  as plain JSON;
* `google.protobuf.Any` (every `typed_config`): its `@type` URL must name a message of
  envoy-data-plane (its package module is imported on demand), whose fields are then checked
  (types the package lacks, such as `xds.type.v3.TypedStruct`, are therefore rejected);
* at most one member of each oneof; no `null` values (omit the field instead);
* deprecated fields (those whose generated `__post_init__` emits a `DeprecationWarning`), unless
  `allow_deprecated=True`.

When the walk finds nothing, the canonicalised config is finally parsed by the library
(`from_dict`, which packs every `Any` into bytes and runs the pydantic validators), so anything
this module accepts is also accepted by envoy-data-plane.

Not checked: Envoy's protoc-gen-validate rules (required fields, `port_value <= 65535`,
`min_len`, ...), which envoy-data-plane does not carry, nor whether an extension's `@type`
fits the extension point it is configured at.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import importlib
import inspect
import itertools
import keyword
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import betterproto2
from envoy_data_plane.message_pool import default_message_pool
from pydantic.warnings import PydanticDeprecationWarning

# The generated classes use a pydantic idiom deprecated since pydantic 2.12 (an "after" model
# validator on a classmethod): one warning per oneof-bearing class, at import. Not ours to fix.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", PydanticDeprecationWarning)
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap
    from envoy_data_plane.google import protobuf as wkt

__all__ = ["EnvoyConfigError", "resolve_type_url", "validate_bootstrap", "validate_message"]

MessageType = type[betterproto2.Message]

_TYPE_URL_PREFIX = "type.googleapis.com/"
_PACKAGE_ROOT = "envoy_data_plane"
_ROOT_PATH = "<root>"

_INT_RANGES: dict[str, tuple[int, int]] = {
    betterproto2.TYPE_INT32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_SINT32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_UINT32: (0, 2**32 - 1),
    betterproto2.TYPE_FIXED32: (0, 2**32 - 1),
    betterproto2.TYPE_INT64: (-(2**63), 2**63 - 1),
    betterproto2.TYPE_SINT64: (-(2**63), 2**63 - 1),
    betterproto2.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    betterproto2.TYPE_UINT64: (0, 2**64 - 1),
    betterproto2.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOAT_TYPES = frozenset({betterproto2.TYPE_FLOAT, betterproto2.TYPE_DOUBLE})
_FLOAT32_MAX = 3.4028234663852886e38
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_INTEGER = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?\d+(\.\d*)?([eE][-+]?\d+)?|-?\.\d+([eE][-+]?\d+)?")
_DURATION = re.compile(r"(\d+)(?:\.(\d{1,9}))?s")
_MAX_DURATION_SECONDS = 315_576_000_000
_TIMESTAMP = re.compile(
    r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})", re.IGNORECASE
)

# Wrapper messages: in JSON the bare value, of the type of the wrapper's `value` field.
_WRAPPERS: dict[type, str] = {
    wkt.BoolValue: betterproto2.TYPE_BOOL,
    wkt.BytesValue: betterproto2.TYPE_BYTES,
    wkt.DoubleValue: betterproto2.TYPE_DOUBLE,
    wkt.FloatValue: betterproto2.TYPE_FLOAT,
    wkt.Int32Value: betterproto2.TYPE_INT32,
    wkt.Int64Value: betterproto2.TYPE_INT64,
    wkt.UInt32Value: betterproto2.TYPE_UINT32,
    wkt.UInt64Value: betterproto2.TYPE_UINT64,
    wkt.StringValue: betterproto2.TYPE_STRING,
}
# Well-known types whose JSON form is not an object of fields; inside an Any they sit under
# "value" (https://protobuf.dev/programming-guides/json/#any).
_SPECIAL_JSON: frozenset[type] = frozenset(
    {*_WRAPPERS, wkt.Duration, wkt.Timestamp, wkt.Struct, wkt.Value, wkt.ListValue, wkt.Any}
)


class EnvoyConfigError(ValueError):
    """The config does not match Envoy's API; `problems` holds one "path: message" each."""

    def __init__(self, type_name: str, problems: list[str]) -> None:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"invalid {type_name} ({count}):\n" + "\n".join(problems))
        self.type_name = type_name
        self.problems = problems


def validate_bootstrap(config: Mapping[str, Any], *, allow_deprecated: bool = False) -> None:
    """Raise `EnvoyConfigError` unless `config` is a valid `envoy.config.bootstrap.v3.Bootstrap`."""
    validate_message(config, Bootstrap, allow_deprecated=allow_deprecated)


def validate_message(
    config: Any, type_url_or_class: str | MessageType, *, allow_deprecated: bool = False
) -> None:
    """Raise `EnvoyConfigError` unless `config` is valid proto-JSON for the given message.

    `type_url_or_class` is a message class of envoy_data_plane, a type URL
    (`type.googleapis.com/envoy.config.cluster.v3.Cluster`) or a bare full name
    (`envoy.config.cluster.v3.Cluster`). Partial configs (a cluster, a listener, an HTTP
    filter's `typed_config` without `@type`) are validated this way.
    """
    if isinstance(type_url_or_class, str):
        url = (
            type_url_or_class if "/" in type_url_or_class else _TYPE_URL_PREFIX + type_url_or_class
        )
        cls = resolve_type_url(url)
        if cls is None:
            raise LookupError(f"no message for type URL {url!r} in envoy-data-plane")
    else:
        cls = type_url_or_class
    walker = _Walker(allow_deprecated=allow_deprecated)
    canonical = walker.value(config, _message_field(cls), _ROOT_PATH)
    if not walker.problems:
        walker.library_parse(cls, canonical)
    if walker.problems:
        raise EnvoyConfigError(_full_name(cls), walker.problems)


@cache
def resolve_type_url(type_url: str) -> MessageType | None:
    """The envoy_data_plane message class a type URL names, or None when there is none.

    The text after the last "/" is the message's full name; its package module is imported,
    which registers the package's messages in the library's message pool.
    """
    full_name = type_url.rpartition("/")[2]
    parts = full_name.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    # Proto packages are lower case, message names capitalised: package.Message[.Nested].
    package = list(itertools.takewhile(lambda part: not part[:1].isupper(), parts))
    if not package or len(package) == len(parts):
        return None
    module = ".".join([_PACKAGE_ROOT, *package])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PydanticDeprecationWarning)
            importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and (module == error.name or module.startswith(error.name + ".")):
            return None  # no such package
        raise
    cls: MessageType | None = default_message_pool.url_to_type.get(_TYPE_URL_PREFIX + full_name)
    return cls


# ---------------------------------------------------------------------------------------------
# Per-class field tables, built once from betterproto2's metadata.


@dataclass(frozen=True, slots=True)
class _Field:
    """What one JSON value must be: the field's proto type, class and cardinality."""

    proto_type: str
    cls: type  # message class, enum class or Python scalar type
    repeated: bool = False
    unwrap: MessageType | None = None  # wrapper/Duration/Timestamp behind a plain Python type
    map_key: str | None = None  # proto type of the key, for map fields
    map_value: _Field | None = None


@dataclass(frozen=True, slots=True)
class _FieldInfo:
    name: str  # proto (snake_case) name
    spec: _Field
    oneof: str | None
    deprecated: bool


@dataclass(frozen=True, slots=True)
class _MessageInfo:
    full_name: str
    by_key: dict[str, _FieldInfo]  # snake_case and lowerCamelCase names
    names: tuple[str, ...]  # snake_case names, for suggestions


def _message_field(cls: MessageType) -> _Field:
    return _Field(betterproto2.TYPE_MESSAGE, cls)


def _full_name(cls: type) -> str:
    url = default_message_pool.type_to_url.get(cls)
    if url:
        return str(url).rpartition("/")[2]
    # Enums are not in the pool: their package from the module, their nested name flattened.
    package = cls.__module__.removeprefix(_PACKAGE_ROOT + ".")
    return f"{package}.{cls.__qualname__}"


def _json_name(name: str) -> str:
    """protoc's json_name: drop each "_" and upper-case the letter after it."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _deprecated_fields(cls: MessageType) -> frozenset[str]:
    """Fields the generated `__post_init__` warns about (`if self.is_set("x"): warn(...)`)."""
    post_init = cls.__dict__.get("__post_init__")
    if post_init is None:
        return frozenset()
    try:
        source = inspect.getsource(post_init)
    except (OSError, TypeError):
        return frozenset()
    return frozenset(re.findall(r'is_set\("(\w+)"\)', source))


@cache
def _message_info(cls: MessageType) -> _MessageInfo:
    meta: betterproto2.ProtoClassMetadata = cls._betterproto  # type: ignore[arg-type]
    synthetic = {
        group
        for group, fields in meta.oneof_field_by_group.items()
        if len(fields) == 1 and meta.meta_by_field_name[next(iter(fields)).name].optional
    }
    deprecated = _deprecated_fields(cls)
    by_key: dict[str, _FieldInfo] = {}
    names: list[str] = []
    for attr, field_meta in meta.meta_by_field_name.items():
        name = attr[:-1] if attr.endswith("_") and keyword.iskeyword(attr[:-1]) else attr
        if field_meta.proto_type == betterproto2.TYPE_MAP:
            assert field_meta.map_meta is not None
            key_meta, value_meta = field_meta.map_meta
            value = _Field(
                value_meta.proto_type,
                meta.cls_by_field[f"{attr}.value"],
                unwrap=value_meta.unwrap() if value_meta.unwrap else None,
            )
            spec = _Field(betterproto2.TYPE_MAP, dict, map_key=key_meta.proto_type, map_value=value)
        else:
            spec = _Field(
                field_meta.proto_type,
                meta.cls_by_field[attr],
                repeated=bool(field_meta.repeated),
                unwrap=field_meta.unwrap() if field_meta.unwrap else None,
            )
        group = field_meta.group if field_meta.group not in synthetic else None
        info = _FieldInfo(name, spec, group, attr in deprecated)
        by_key[name] = info
        by_key.setdefault(_json_name(name), info)
        names.append(name)
    return _MessageInfo(_full_name(cls), by_key, tuple(names))


@cache
def _enum_names(cls: type[betterproto2.Enum]) -> dict[str, int]:
    return {member.proto_name or member.name: member.value for member in cls}


# ---------------------------------------------------------------------------------------------
# The walk. Each check returns the value in canonical form (for the final library parse).


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    kind = {bool: "boolean", str: "string", int: "number", float: "number"}.get(type(value))
    text = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return f"{kind} {text}" if kind else f"{type(value).__name__} {text}"


def _key(path: str, key: str) -> str:
    return key if path == _ROOT_PATH else f"{path}.{key}"


class _Walker:
    def __init__(self, *, allow_deprecated: bool) -> None:
        self.allow_deprecated = allow_deprecated
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def value(self, value: Any, spec: _Field, path: str) -> Any:
        """A field's whole JSON value: an array, a map or a single value."""
        if value is None:
            self.problem(path, "null is not allowed here (omit the field instead)")
            return None
        if spec.map_value is not None:
            return self.map(value, spec, path)
        if spec.repeated:
            if not isinstance(value, list):
                self.problem(path, f"expected an array, got {_describe(value)}")
                return None
            return [self.single(item, spec, f"{path}[{i}]") for i, item in enumerate(value)]
        return self.single(value, spec, path)

    def map(self, value: Any, spec: _Field, path: str) -> Any:
        assert spec.map_key is not None and spec.map_value is not None
        if not isinstance(value, Mapping):
            self.problem(path, f"expected an object (a map), got {_describe(value)}")
            return None
        canonical: dict[str, Any] = {}
        for key, item in value.items():
            item_path = f"{path}[{key!r}]"
            if not isinstance(key, str):
                self.problem(item_path, f"map keys must be strings, got {_describe(key)}")
                continue
            if spec.map_key == betterproto2.TYPE_BOOL:
                if key not in ("true", "false"):
                    self.problem(item_path, 'a bool map key must be "true" or "false"')
            elif spec.map_key in _INT_RANGES:
                self.integer(key, spec.map_key, item_path)
            if item is None and spec.map_value.cls is not wkt.Value:
                self.problem(item_path, "null is not allowed here")
                continue
            canonical[key] = self.single(item, spec.map_value, item_path)
        return canonical

    def single(self, value: Any, spec: _Field, path: str) -> Any:
        if spec.unwrap is not None:
            return self.message(value, spec.unwrap, path)
        if spec.proto_type == betterproto2.TYPE_MESSAGE:
            return self.message(value, spec.cls, path)
        if spec.proto_type == betterproto2.TYPE_ENUM:
            return self.enum(value, spec.cls, path)
        return self.scalar(value, spec.proto_type, path)

    # -- scalars -------------------------------------------------------------------------------

    def scalar(self, value: Any, proto_type: str, path: str) -> Any:
        if proto_type in _INT_RANGES:
            return self.integer(value, proto_type, path)
        if proto_type in _FLOAT_TYPES:
            return self.floating(value, proto_type, path)
        if proto_type == betterproto2.TYPE_BOOL:
            if not isinstance(value, bool):
                self.problem(path, f"expected a boolean (true/false), got {_describe(value)}")
            return value
        if proto_type == betterproto2.TYPE_STRING:
            if not isinstance(value, str):
                self.problem(path, f"expected a string, got {_describe(value)}")
            return value
        if proto_type == betterproto2.TYPE_BYTES:
            return self.bytes_(value, path)
        raise AssertionError(f"unexpected proto type {proto_type}")

    def integer(self, value: Any, proto_type: str, path: str) -> int | None:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif (isinstance(value, float) and value.is_integer()) or (
            isinstance(value, str) and _INTEGER.fullmatch(value)
        ):
            number = int(value)
        if number is None:
            self.problem(path, f"expected an integer ({proto_type}), got {_describe(value)}")
            return None
        low, high = _INT_RANGES[proto_type]
        if not low <= number <= high:
            self.problem(path, f"{number} is out of range for {proto_type} [{low}, {high}]")
            return None
        return number

    def floating(self, value: Any, proto_type: str, path: str) -> float | None:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and value in _SPECIAL_FLOATS:
            number = _SPECIAL_FLOATS[value]
        elif isinstance(value, str) and _NUMBER.fullmatch(value):
            number = float(value)
        if number is None:
            self.problem(path, f"expected a number ({proto_type}), got {_describe(value)}")
            return None
        too_big = math.isfinite(number) and abs(number) > _FLOAT32_MAX
        if proto_type == betterproto2.TYPE_FLOAT and too_big:
            self.problem(path, f"{number} is out of range for float")
            return None
        return number

    def bytes_(self, value: Any, path: str) -> str | None:
        if isinstance(value, str):
            text = value.replace("-", "+").replace("_", "/")
            try:
                decoded = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
            except binascii.Error:
                pass
            else:
                return base64.b64encode(decoded).decode()
        self.problem(path, f"expected base64-encoded bytes, got {_describe(value)}")
        return None

    def enum(self, value: Any, cls: type[betterproto2.Enum], path: str) -> Any:
        names = _enum_names(cls)
        if isinstance(value, str) and value in names:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            by_value = {number: name for name, number in names.items()}
            if value in by_value:
                return by_value[value]
        shown = ", ".join(names) if len(names) <= 20 else ", ".join(list(names)[:20]) + ", ..."
        self.problem(path, f"{_describe(value)} is not a value of enum {_full_name(cls)} ({shown})")
        return None

    # -- messages ------------------------------------------------------------------------------

    def message(self, value: Any, cls: MessageType, path: str) -> Any:
        if cls in _SPECIAL_JSON:
            return self.well_known(value, cls, path)
        if not isinstance(value, Mapping):
            expected = f"an object (message {_full_name(cls)})"
            self.problem(path, f"expected {expected}, got {_describe(value)}")
            return None
        return self.fields(value, cls, path, skip=())

    def fields(
        self, value: Mapping[Any, Any], cls: MessageType, path: str, skip: tuple[str, ...]
    ) -> dict[str, Any]:
        info = _message_info(cls)
        canonical: dict[str, Any] = {}
        seen: dict[str, str] = {}  # proto name -> key as written
        oneofs: dict[str, str] = {}  # oneof -> key of the member set
        for key, item in value.items():
            if key in skip:
                continue
            item_path = _key(path, str(key))
            field = info.by_key.get(key) if isinstance(key, str) else None
            if field is None:
                near = difflib.get_close_matches(str(key), info.names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self.problem(item_path, f"unknown field of {info.full_name}{hint}")
                continue
            if field.name in seen:
                self.problem(item_path, f"sets the same field as {seen[field.name]!r}")
                continue
            seen[field.name] = key
            if field.oneof is not None and item is not None:
                if field.oneof in oneofs:
                    other = oneofs[field.oneof]
                    self.problem(
                        item_path,
                        f"{key!r} and {other!r} are both set, but they are members of the "
                        f"oneof {field.oneof!r} of {info.full_name}",
                    )
                oneofs[field.oneof] = key
            if field.deprecated and not self.allow_deprecated:
                self.problem(item_path, f"deprecated field of {info.full_name}")
            canonical[field.name] = self.value(item, field.spec, item_path)
        return canonical

    def any(self, value: Any, path: str) -> Any:
        if not isinstance(value, Mapping):
            self.problem(path, f"expected an object with an @type, got {_describe(value)}")
            return None
        type_path = _key(path, "@type")
        url = value.get("@type")
        if url is None:
            self.problem(type_path, "missing: a google.protobuf.Any needs an @type")
            return None
        if not isinstance(url, str) or "/" not in url:
            self.problem(type_path, f"expected a type URL (prefix/full.Name), got {_describe(url)}")
            return None
        cls = resolve_type_url(url)
        if cls is None:
            self.problem(type_path, f"{url!r} names no message type known to envoy-data-plane")
            return None
        canonical_url = _TYPE_URL_PREFIX + url.rpartition("/")[2]
        if cls in _SPECIAL_JSON:
            extra = sorted(str(k) for k in value if k not in ("@type", "value"))
            for key in extra:
                self.problem(
                    _key(path, key),
                    f"unknown key: an Any of {_full_name(cls)} holds only @type and value",
                )
            if "value" not in value:
                self.problem(_key(path, "value"), f"missing: the {_full_name(cls)} itself")
                return None
            inner = self.message(value["value"], cls, _key(path, "value"))
            return {"@type": canonical_url, "value": inner}
        return {"@type": canonical_url, **self.fields(value, cls, path, skip=("@type",))}

    def well_known(self, value: Any, cls: MessageType, path: str) -> Any:
        if cls is wkt.Any:
            return self.any(value, path)
        if cls in _WRAPPERS:
            canonical = self.scalar(value, _WRAPPERS[cls], path)
            if cls is wkt.BytesValue and canonical is not None:
                return base64.b64decode(canonical)  # the library's BytesValue wants bytes
            return canonical
        if cls is wkt.Duration:
            return self.duration(value, path)
        if cls is wkt.Timestamp:
            return self.timestamp(value, path)
        if cls is wkt.Struct and not isinstance(value, Mapping):
            self.problem(
                path, f"expected an object (google.protobuf.Struct), got {_describe(value)}"
            )
        elif cls is wkt.ListValue and not isinstance(value, list):
            self.problem(
                path, f"expected an array (google.protobuf.ListValue), got {_describe(value)}"
            )
        else:
            self.json(value, path)
        return value

    def duration(self, value: Any, path: str) -> str | None:
        match = _DURATION.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            self.problem(
                path,
                f'expected a duration string like "5s" or "0.25s" (google.protobuf.Duration), '
                f"got {_describe(value)}",
            )
            return None
        if int(match[1]) > _MAX_DURATION_SECONDS:
            self.problem(path, f"duration {value!r} is out of range")
            return None
        return str(value)

    def timestamp(self, value: Any, path: str) -> str | None:
        match = _TIMESTAMP.fullmatch(value) if isinstance(value, str) else None
        if match is not None:
            fraction = f".{match[2][:6]}" if match[2] else ""
            zone = "+00:00" if match[3].upper() == "Z" else match[3]
            try:
                datetime.fromisoformat(match[1] + fraction + zone)
            except ValueError:
                match = None
        if match is None:
            self.problem(
                path,
                f'expected an RFC 3339 timestamp like "2024-01-31T12:00:00Z", '
                f"got {_describe(value)}",
            )
            return None
        return str(value)

    def json(self, value: Any, path: str) -> None:
        """Any JSON value (google.protobuf.Value and what Struct and ListValue hold)."""
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    self.problem(f"{path}[{key!r}]", "object keys must be strings")
                self.json(item, f"{path}[{key!r}]")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self.json(item, f"{path}[{i}]")
        elif isinstance(value, float) and not math.isfinite(value):
            self.problem(path, f"{value} is not a JSON number")
        elif value is not None and not isinstance(value, str | int | float | bool):
            self.problem(path, f"not a JSON value: {_describe(value)}")

    # -- cross-check ---------------------------------------------------------------------------

    def library_parse(self, cls: MessageType, canonical: Any) -> None:
        """Parse with envoy_data_plane itself: its pydantic validators and Any packing."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # reported by the walk
                # Unknown keys were already reported, with their path, by the walk. The library
                # must not judge names itself: betterproto2 re-cases every key and so cannot
                # read a field such as `consecutive_5xx` (it looks for `consecutive_5_xx`).
                if cls in _SPECIAL_JSON:
                    cls.from_dict(canonical, ignore_unknown_fields=True)
                else:
                    bytes(cls.from_dict(canonical, ignore_unknown_fields=True))
        except Exception as error:  # the library raises KeyError, ValueError, TypeError, ...
            detail = " ".join(str(error).split())
            self.problem(
                _ROOT_PATH, f"envoy-data-plane rejects it: {type(error).__name__}: {detail}"
            )
