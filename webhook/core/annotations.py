"""Pod annotations, parsed into typed values; the only module that reads annotation strings.

`outrigger.dev/inject` chooses sidecars; every other key a pod may set is a parameter that a
template of the policy declares, with its type and validation. Parsing reports every invalid
annotation at once, each message naming the annotation and the values it accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import orjson

from webhook.ambassador.spec import InvalidSpec, parse_spec
from webhook.core.parameters import (
    Parameter,
    ParameterValue,
    accepted,
    parse_value,
    typed_default,
)
from webhook.core.sidecarresources import (
    KINDS,
    RESOURCES,
    Override,
    annotation_key,
    annotation_keys,
    parse_override,
)
from webhook.limits import MAX_ANNOTATION_BYTES, echo, has_control_characters

if TYPE_CHECKING:
    from webhook.core.policy import SidecarTemplate

PREFIX: Final = "outrigger.dev/"
INJECT: Final = PREFIX + "inject"
STATUS: Final = PREFIX + "status"


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


ImageCheck = Callable[[str], "str | None"]


def claimed(status: str) -> tuple[str, ...]:
    """The sidecars an `outrigger.dev/status` says were injected; () when it says nothing
    usable (anyone can write it: what it claims is checked against the pod, not trusted)."""
    try:
        document = orjson.loads(status) if len(status) <= MAX_ANNOTATION_BYTES else None
    except orjson.JSONDecodeError:  # includes nesting past orjson's depth limit
        return ()
    injected = document.get("injected") if isinstance(document, dict) else None
    if not isinstance(injected, list):
        return ()
    return tuple(name for name in injected if isinstance(name, str))


def ours(annotations: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The `outrigger.dev/` annotations, hashable: all a decision depends on, as a cache key."""
    return tuple(item for item in annotations.items() if item[0].startswith(PREFIX))


def parse_inject(raw: str | None, available: Collection[str]) -> InjectChoice:
    if raw is not None and has_control_characters(raw):
        raise InvalidAnnotations(
            [
                f"annotation {INJECT}: {echo(raw)} holds a control character; accepted: "
                '"true", "false" or a comma-separated list of sidecar names'
            ]
        )
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
                f"annotation {INJECT}: unknown sidecar {', '.join(map(echo, unknown[:5]))}; "
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


def parse_resource_overrides(
    annotations: Mapping[str, str], templates: Iterable[SidecarTemplate]
) -> dict[str, tuple[Override, ...]]:
    """Each injected template's resources the pod sets (`webhook.core.sidecarresources`)."""
    problems: list[str] = []
    overrides: dict[str, tuple[Override, ...]] = {}
    for template in templates:
        found = []
        for resource in RESOURCES:
            for kind in KINDS:
                raw = annotations.get(annotation_key(template.name, resource, kind))
                if raw is None:
                    continue
                try:
                    found.append(
                        parse_override(
                            template.name, resource, kind, raw, template.resourceOverrides
                        )
                    )
                except ValueError as error:
                    problems.append(str(error))
        overrides[template.name] = tuple(found)
    if problems:
        raise InvalidAnnotations(problems)
    return overrides


def unused(
    annotations: Mapping[str, str], injected: Collection[str], templates: Iterable[SidecarTemplate]
) -> tuple[list[str], list[str]]:
    """Our annotations with no effect: (unknown keys, keys of templates not injected)."""
    owners: dict[str, list[str]] = {}
    for template in templates:
        for parameter in template.parameters.values():
            owners.setdefault(parameter.annotation, []).append(template.name)
        for key in annotation_keys(template.name):
            owners.setdefault(key, []).append(template.name)
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
    if raw is not None and len(raw.encode()) > MAX_ANNOTATION_BYTES:
        raise _Invalid(
            f"annotation {parameter.annotation}: the value has {len(raw.encode())} bytes, "
            f"more than the {MAX_ANNOTATION_BYTES} accepted"
        )
    if raw is None:
        if parameter.required:
            raise _Invalid(
                f"annotation {parameter.annotation} is required when {template.name} is "
                f"injected; expected {accepted(parameter)}"
            )
        return None if parameter.default is None else typed_default(parameter)
    if parameter.type == "ambassador":
        try:
            return parse_spec(raw)
        except InvalidSpec as error:
            raise _Invalid(f"annotation {parameter.annotation}: {error}") from None
    value = None if has_control_characters(raw) else parse_value(parameter, raw.strip())
    if value is None:
        raise _Invalid(
            f"annotation {parameter.annotation}: {echo(raw)} is not accepted; "
            f"expected {accepted(parameter)} (no control characters)"
        )
    return value
