"""A template parameter: how the policy declares it, and how a value of it is parsed.

The policy validates its defaults with the same parser that reads a pod's annotations
(`webhook.core.annotations`), so both live here, below both.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from webhook.ambassador.hostport import ACCEPTED as HOSTPORT_ACCEPTED
from webhook.ambassador.hostport import Upstream, parse_hostport
from webhook.ambassador.spec import AmbassadorSpec
from webhook.core.logwatcher import GLOBS_ACCEPTED, parse_globs
from webhook.limits import cache_small, has_control_characters

ParameterValue = str | int | bool | Upstream | AmbassadorSpec | tuple[str, ...]

_PATH_CHARS = re.compile(r"^/[A-Za-z0-9._@+=/-]*$")
PATH_ACCEPTED = (
    "an absolute directory path below / such as /var/log/app (letters, digits, . _ - @ + =; "
    "no '..' or empty segments; not under /proc or /sys)"
)
_INTEGER = re.compile(r"-?[0-9]{1,18}")
# The container runtime refuses a volume mounted under these (procfs, sysfs).
_KERNEL_FILESYSTEMS = frozenset({"proc", "sys"})


class Parameter(BaseModel):
    """A value an annotation may set in a template, with its type and validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The annotation that sets it: an outrigger.dev/ key other than inject and status.
    annotation: Annotated[str, Field(pattern=r"^outrigger\.dev/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]
    # How the value is read: string (within enum or pattern), integer (within minimum and
    # maximum), boolean (true or false), path (an absolute directory), hostport (host:port;
    # the template may also refer to ${name.host} and ${name.port}), image (a pinned
    # reference within images.allowed), ambassador (an ambassador configuration, YAML),
    # globs (file patterns, as outrigger.dev/log-files takes them).
    type: Literal[
        "string", "integer", "boolean", "path", "hostport", "image", "ambassador", "globs"
    ] = "string"
    # The value when the pod does not set the annotation; checked as a pod's value would be.
    default: str | int | bool | None = None
    # The pod must set the annotation when the sidecar is injected, or it is denied.
    required: bool = False
    enum: tuple[str, ...] | None = None  # type string: the values accepted
    pattern: str | None = None  # type string: a regular expression the whole value matches
    minimum: int | None = None  # type integer: the least value accepted
    maximum: int | None = None  # type integer: the greatest value accepted
    # What it sets, shown in the annotation reference.
    description: str = ""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"not a regular expression: {error}") from None
        return pattern


def valid_default(parameter: Parameter) -> bool:
    return typed_default(parameter) is not None


def typed_default(parameter: Parameter) -> ParameterValue | None:
    default = parameter.default
    return parse_value(
        parameter, str(default).lower() if isinstance(default, bool) else str(default)
    )


@cache_small(4096, lambda _parameter, text: len(text))
def parse_value(parameter: Parameter, text: str) -> ParameterValue | None:
    """Cached: the pods of one workload carry the same values, and some parsing is not cheap."""
    if has_control_characters(text):
        return None
    match parameter.type:
        case "integer":
            number = int(text) if _INTEGER.fullmatch(text) else None
            if number is None:
                return None
            low, high = parameter.minimum, parameter.maximum
            too_low = low is not None and number < low
            return None if too_low or (high is not None and number > high) else number
        case "boolean":
            return {"true": True, "false": False}.get(text.lower())
        case "path":
            return _path(text)
        case "hostport":
            return parse_hostport(text)
        case "globs":
            return parse_globs(text)
        case _:
            return _string(parameter, text)


def _string(parameter: Parameter, text: str) -> str | None:
    if parameter.enum is not None and text not in parameter.enum:
        return None
    if parameter.pattern is not None and not re.fullmatch(parameter.pattern, text):
        return None
    return text if len(text) <= 4096 and text.isprintable() else None


def valid_path(text: str) -> bool:
    """Whether `text` is a directory a `path` parameter accepts (`PATH_ACCEPTED`: no comma,
    on which Fluent Bit splits a path into several)."""
    return _path(text) is not None


def _path(text: str) -> str | None:
    path = text.rstrip("/")
    segments = path.split("/")
    if (
        not _PATH_CHARS.fullmatch(path)
        or len(path) > 1024
        or ".." in segments
        or "." in segments
        or "" in segments[1:]
        or segments[1] in _KERNEL_FILESYSTEMS
    ):
        return None
    return path


def accepted(parameter: Parameter) -> str:
    """The values the parameter accepts, and its default: what a denial tells the pod."""
    text = accepted_values(parameter)
    default = parameter.default
    if default is not None:
        text += f" (default {str(default).lower() if isinstance(default, bool) else default})"
    return text


def accepted_values(parameter: Parameter) -> str:
    """The values the parameter accepts, in words (also the annotation reference's)."""
    match parameter.type:
        case "integer":
            low = "" if parameter.minimum is None else f" from {parameter.minimum}"
            high = "" if parameter.maximum is None else f" to {parameter.maximum}"
            text = f"an integer{low}{high}"
        case "boolean":
            text = '"true" or "false"'
        case "path":
            text = PATH_ACCEPTED
        case "hostport":
            text = HOSTPORT_ACCEPTED
        case "globs":
            text = GLOBS_ACCEPTED
        case "image":
            text = "an image reference allowed by the cluster policy"
        case "ambassador":
            text = "an ambassador configuration (YAML; see the ambassador configuration reference)"
        case _:
            text = (
                f"one of: {', '.join(parameter.enum)}"
                if parameter.enum
                else f"a string matching {parameter.pattern}"
                if parameter.pattern
                else "a printable string"
            )
    return text
