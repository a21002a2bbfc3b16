"""Pod annotations, parsed into typed values; the only module that reads annotation strings.

`outrigger.dev/inject` chooses sidecars; every other key a pod may set is a parameter that a
template of the policy declares, with its type and validation. Parsing reports every invalid
annotation at once, each message naming the annotation and the values it accepts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from webhook.ambassador import AmbassadorSpec, InvalidSpec, parse_spec
from webhook.hostport import ACCEPTED as HOSTPORT_ACCEPTED
from webhook.hostport import Upstream, parse_hostport

if TYPE_CHECKING:
    from webhook.policy import Parameter, SidecarTemplate

PREFIX = "outrigger.dev/"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"

_PATH_CHARS = re.compile(r"^/[A-Za-z0-9._@+=/-]*$")


@dataclass(frozen=True, slots=True)
class InjectChoice:
    """What `outrigger.dev/inject` says: names, the policy's defaults, or no (opt-out)."""

    names: tuple[str, ...] = ()
    defaults: bool = True  # absent or "true": whatever the policy's rules inject by default
    opt_out: bool = False  # "false" (or empty): nothing but what a rule requires


class InvalidAnnotations(ValueError):
    """One or more annotations are invalid; `problems` holds one message per annotation."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


ParameterValue = str | int | bool | Upstream | AmbassadorSpec
ImageCheck = Callable[[str], "str | None"]


def ours(annotations: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The `outrigger.dev/` annotations, hashable: all a decision depends on, as a cache key."""
    return tuple(item for item in annotations.items() if item[0].startswith(PREFIX))


def parse_inject(raw: str | None, available: Collection[str]) -> InjectChoice:
    if raw is None or raw.strip().lower() == "true":
        return InjectChoice()
    value = raw.strip()
    if value.lower() in ("", "false"):
        return InjectChoice(defaults=False, opt_out=True)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in available]
    if unknown:
        accepted = ", ".join(sorted(available))
        raise InvalidAnnotations(
            [
                f"annotation {INJECT}: unknown sidecar {', '.join(map(repr, unknown))}; "
                f'accepted: "true", "false" or a comma-separated list of: {accepted}'
            ]
        )
    return InjectChoice(names=tuple(dict.fromkeys(names)), defaults=False)


def parse_parameters(
    annotations: Mapping[str, str],
    templates: Iterable[SidecarTemplate],
    image_problem: ImageCheck,
) -> dict[str, dict[str, ParameterValue]]:
    """Each injected template's parameter values: from its annotation, else the default."""
    problems: list[str] = []
    values: dict[str, dict[str, ParameterValue]] = {}
    for template in templates:
        values[template.name] = {}
        for name, parameter in template.parameters.items():
            try:
                value = _parameter_value(parameter, annotations.get(parameter.annotation), template)
            except _Invalid as error:
                problems.append(str(error))
                continue
            problem = (
                image_problem(value)
                if isinstance(value, str) and parameter.type == "image"
                else None
            )
            if problem:
                problems.append(f"annotation {parameter.annotation}: {problem}")
            elif value is not None:
                values[template.name][name] = value
    if problems:
        raise InvalidAnnotations(problems)
    return values


def unused(
    annotations: Mapping[str, str], injected: Collection[str], templates: Iterable[SidecarTemplate]
) -> tuple[list[str], list[str]]:
    """Our annotations with no effect: (unknown keys, keys of templates not injected)."""
    owners: dict[str, list[str]] = {}
    for template in templates:
        for parameter in template.parameters.values():
            owners.setdefault(parameter.annotation, []).append(template.name)
    unknown, idle = [], []
    for key in annotations:
        if not key.startswith(PREFIX) or key in (INJECT, STATUS):
            continue
        if key not in owners:
            unknown.append(key)
        elif not any(owner in injected for owner in owners[key]):
            idle.append(f"annotation {key} is ignored: {', '.join(owners[key])} is not injected")
    return unknown, idle


class _Invalid(ValueError):
    pass


def _parameter_value(
    parameter: Parameter, raw: str | None, template: SidecarTemplate
) -> ParameterValue | None:
    """The typed value (the default when unset; None when there is none)."""
    if raw is None:
        if parameter.required:
            raise _Invalid(
                f"annotation {parameter.annotation} is required when {template.name} is "
                f"injected; expected {_accepted(parameter)}"
            )
        return None if parameter.default is None else _typed_default(parameter)
    if parameter.type == "ambassador":
        try:
            return parse_spec(raw)
        except InvalidSpec as error:
            raise _Invalid(f"annotation {parameter.annotation}: {error}") from None
    value = _parse(parameter, raw.strip())
    if value is None:
        raise _Invalid(
            f"annotation {parameter.annotation}: {raw!r} is not accepted; "
            f"expected {_accepted(parameter)}"
        )
    return value


def valid_default(parameter: Parameter) -> bool:
    return _typed_default(parameter) is not None


def _typed_default(parameter: Parameter) -> ParameterValue | None:
    default = parameter.default
    return _parse(parameter, str(default).lower() if isinstance(default, bool) else str(default))


@lru_cache(maxsize=4096)
def _parse(parameter: Parameter, text: str) -> ParameterValue | None:
    """Cached: the pods of one workload carry the same values, and some parsing is not cheap."""
    match parameter.type:
        case "integer":
            number = int(text) if text.isascii() and text.lstrip("-").isdigit() else None
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
        case _:
            return _string(parameter, text)


def _string(parameter: Parameter, text: str) -> str | None:
    if parameter.enum is not None and text not in parameter.enum:
        return None
    if parameter.pattern is not None and not re.fullmatch(parameter.pattern, text):
        return None
    return text if len(text) <= 4096 and text.isprintable() else None


def _path(text: str) -> str | None:
    path = text.rstrip("/")
    segments = path.split("/")
    if (
        not _PATH_CHARS.match(path)
        or len(path) > 1024
        or ".." in segments
        or "." in segments
        or "" in segments[1:]
    ):
        return None
    return path


def _accepted(parameter: Parameter) -> str:
    match parameter.type:
        case "integer":
            low = "" if parameter.minimum is None else f" from {parameter.minimum}"
            high = "" if parameter.maximum is None else f" to {parameter.maximum}"
            text = f"an integer{low}{high}"
        case "boolean":
            text = '"true" or "false"'
        case "path":
            text = (
                "an absolute directory path below / such as /var/log/app (letters, digits, "
                ". _ - @ + =; no '..' or empty segments)"
            )
        case "hostport":
            text = HOSTPORT_ACCEPTED
        case "image":
            text = "an image reference allowed by the cluster policy"
        case "ambassador":
            text = "an ambassador configuration (YAML; see the README)"
        case _:
            text = (
                f"one of: {', '.join(parameter.enum)}"
                if parameter.enum
                else f"a string matching {parameter.pattern}"
                if parameter.pattern
                else "a printable string"
            )
    default = parameter.default
    if default is not None:
        text += f" (default {str(default).lower() if isinstance(default, bool) else default})"
    return text
