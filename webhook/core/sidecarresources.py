"""Per-pod resources of an injected sidecar, within the bounds the policy gives.

A template's `resourceOverrides` says, per resource (cpu, memory, ephemeral-storage), whether
a pod may set the sidecar's request and limit, between which values, and whether it may
remove the limit. A pod sets them with `outrigger.dev/<sidecar>-<resource>-<request|limit>`
(`outrigger.dev/log-watcher-memory-limit: 96Mi`; `none` removes a removable limit). Each
value is merged field by field into the template's resources (setting the memory limit keeps
the CPU request); a value outside its bounds, a request above its limit, a unit Kubernetes
does not read, or a resource the policy does not open is denied naming the annotation and
what is accepted.

Values are written in the form the API server stores them in (`canonical`), so that a pod as
the API server returns it still holds exactly what a re-injection renders.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from webhook.core.podresources import NotAQuantity, canonical, quantity
from webhook.limits import echo

Resource = Literal["cpu", "memory", "ephemeral-storage"]
RESOURCES: tuple[Resource, ...] = ("cpu", "memory", "ephemeral-storage")
Kind = Literal["request", "limit"]
KINDS: tuple[Kind, ...] = ("request", "limit")
REMOVE = "none"
# A number with a binary or decimal SI suffix, as people write them; the exponent form
# ("1e3"), which Kubernetes also reads, is not taken: no one means it in an annotation.
_VALUE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE])?")
_BINARY_SUFFIX = re.compile(r".*[KMGTPE]i")
ACCEPTED_UNITS = "a Kubernetes quantity (250m, 1.5; 96Mi, 1Gi, 500M)"
_UNITS = {"cpu": "a CPU quantity such as 250m or 1.5", "memory": "bytes such as 96Mi, 1Gi or 500M"}


class Bound(BaseModel):
    """The values a pod may give one field: from `min` to `max` (quantities), both included."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: str | None = None  # a quantity (250m, 1.5, 96Mi, 1Gi); None: no lower bound
    max: str | None = None  # a quantity; None: no upper bound

    @model_validator(mode="after")
    def _ordered(self) -> Bound:
        low, high = self.low, self.high
        if low is not None and high is not None and low > high:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    @property
    def low(self) -> Decimal | None:
        return None if self.min is None else _bound_value(self.min, "min")

    @property
    def high(self) -> Decimal | None:
        return None if self.max is None else _bound_value(self.max, "max")

    def holds(self, value: Decimal) -> bool:
        low, high = self.low, self.high
        return (low is None or value >= low) and (high is None or value <= high)

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"from {self.min} to {self.max}"
        if self.min is not None:
            return f"at least {self.min}"
        return f"at most {self.max}" if self.max is not None else "any value"


class ResourceOverride(BaseModel):
    """What a pod may set of one resource of a sidecar: its request within `request`, its
    limit within `limit` (None: not settable), and whether it may remove the limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The request a pod may set, `{min, max}`; None: the pod may not set it.
    request: Bound | None = None
    # The limit a pod may set, `{min, max}`; None: the pod may not set it.
    limit: Bound | None = None
    # A pod may remove the limit, with the value `none`.
    removableLimit: bool = False


ResourceOverrides = Mapping[Resource, ResourceOverride]


@dataclass(frozen=True, slots=True)
class Override:
    """One field a pod sets: `value` None removes the limit."""

    resource: Resource
    kind: Kind
    value: str | None
    annotation: str


def annotation_key(sidecar: str, resource: str, kind: str) -> str:
    return f"outrigger.dev/{sidecar}-{resource}-{kind}"


def annotation_keys(sidecar: str) -> tuple[str, ...]:
    return tuple(annotation_key(sidecar, r, k) for r in RESOURCES for k in KINDS)


def parse_override(
    sidecar: str, resource: Resource, kind: Kind, raw: str, allowed: ResourceOverrides
) -> Override:
    """The override `raw` asks for; ValueError naming the annotation and what it accepts."""
    key = annotation_key(sidecar, resource, kind)
    rule = allowed.get(resource)
    bound = None if rule is None else (rule.request if kind == "request" else rule.limit)
    removable = kind == "limit" and rule is not None and rule.removableLimit
    if bound is None and not removable:
        raise ValueError(
            f"annotation {key}: the cluster policy does not let pods set the {resource} "
            f"{kind} of {sidecar}{_opened(sidecar, allowed)}"
        )
    text = raw.strip()
    if text == REMOVE and removable:
        return Override(resource, kind, None, key)
    expected = accepted(resource, bound, removable)
    if bound is None or not _VALUE.fullmatch(text):
        raise ValueError(f"annotation {key}: {echo(raw)} is not accepted; expected {expected}")
    value = quantity(text, key)
    if not bound.holds(value):
        raise ValueError(
            f"annotation {key}: {echo(raw)} is outside the cluster policy's bounds; "
            f"expected {expected}"
        )
    return Override(resource, kind, canonical_quantity(text), key)


def apply(
    resources: Mapping[str, Any], overrides: tuple[Override, ...], sidecar: str
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The template's resources with the pod's overrides merged field by field, and where
    each value came from (for `inject --explain`); ValueError when a request ends up above
    its limit, naming the annotations to change."""
    merged: dict[str, dict[str, Any]] = {
        "requests": dict(resources.get("requests") or {}),
        "limits": dict(resources.get("limits") or {}),
    }
    set_by: dict[tuple[str, str], str] = {}
    for override in overrides:
        field = merged["requests" if override.kind == "request" else "limits"]
        if override.value is None:
            field.pop(override.resource, None)
        else:
            field[override.resource] = override.value
        set_by[(override.resource, override.kind)] = override.annotation
    _check_requests_within_limits(merged, set_by, sidecar)
    result = {**resources, **{k: v for k, v in merged.items() if v}}
    for kind in ("requests", "limits"):
        if not merged[kind]:
            result.pop(kind, None)
    return result, _sources(merged, set_by, overrides)


def _check_requests_within_limits(
    merged: dict[str, dict[str, Any]], set_by: dict[tuple[str, str], str], sidecar: str
) -> None:
    for resource, request in merged["requests"].items():
        limit = merged["limits"].get(resource)
        if limit is None:
            continue
        if quantity(request, resource) > quantity(limit, resource):
            named = [set_by[(resource, k)] for k in KINDS if (resource, k) in set_by]
            raise ValueError(
                f"annotation {' and '.join(named)}: the {resource} request of {sidecar} "
                f"({request}) would be above its limit ({limit}); a request must be at most "
                f"the limit (set {annotation_key(sidecar, resource, 'limit')} too, or lower "
                "the request)"
            )


def _sources(
    merged: dict[str, dict[str, Any]],
    set_by: dict[tuple[str, str], str],
    overrides: tuple[Override, ...],
) -> tuple[str, ...]:
    lines = []
    for kind, field in (("request", "requests"), ("limit", "limits")):
        for resource, value in sorted(merged[field].items()):
            source = set_by.get((resource, kind), "template")
            lines.append(f"{resource} {kind} {value} ({source})")
    for override in overrides:
        if override.value is None:
            lines.append(f"{override.resource} limit removed ({override.annotation})")
    return tuple(lines)


def canonical_quantity(text: str) -> str:
    """`text` as the API server stores it: a binary suffix kept binary ("1024Mi" -> "1Gi"),
    anything else in decimal SI ("0.5" -> "500m", "2000M" -> "2G")."""
    value = quantity(text, "value")
    return canonical(value, "memory" if _BINARY_SUFFIX.fullmatch(text) else "cpu")


def check_template(
    sidecar: str, resources: Mapping[str, Any], allowed: ResourceOverrides
) -> list[str]:
    """What is wrong with a template's bounds: its own values outside them (the default a pod
    gets must be one it could ask for), and annotation keys longer than Kubernetes allows."""
    problems = []
    for resource, rule in allowed.items():
        for kind, bound in (("request", rule.request), ("limit", rule.limit)):
            field = resources.get("requests" if kind == "request" else "limits") or {}
            if bound is not None and field.get(resource) is not None:
                value = quantity(field[resource], f"{resource} {kind}")
                if not bound.holds(value):
                    problems.append(
                        f"{resource}.{kind}: the template's own {field[resource]} is outside "
                        f"its bounds ({bound.describe()})"
                    )
            if len(annotation_key(sidecar, resource, kind)) - len("outrigger.dev/") > 63:
                problems.append(f"{resource}: the annotation names would pass 63 characters")
    return problems


def requests_above_limits(resources: Mapping[str, Any]) -> list[str]:
    """The resources whose request is above their limit: the API server refuses such a pod."""
    requests = resources.get("requests") or {}
    limits = resources.get("limits") or {}
    problems = []
    for resource in requests.keys() & limits.keys():
        try:
            above = quantity(requests[resource], resource) > quantity(limits[resource], resource)
        except NotAQuantity:
            continue  # named where the template's values are rendered
        if above:
            problems.append(
                f"{resource}: the template's request {requests[resource]} is above its limit "
                f"{limits[resource]}"
            )
    return sorted(problems)


def _bound_value(text: str, which: str) -> Decimal:
    if not _VALUE.fullmatch(text):
        raise ValueError(f"{which}: {echo(text)} is not {ACCEPTED_UNITS}")
    try:
        return quantity(text, which)
    except NotAQuantity as error:
        raise ValueError(str(error)) from None


def accepted(resource: str, bound: Bound | None, removable: bool) -> str:
    """What a resource annotation accepts, in words (also the annotation reference's)."""
    units = _UNITS.get(resource, _UNITS["memory"])
    parts = [] if bound is None else [f"{units}, {bound.describe()}"]
    if removable:
        parts.append(f'"{REMOVE}" to remove the limit')
    return ", or ".join(parts)


def _opened(sidecar: str, allowed: ResourceOverrides) -> str:
    keys = [
        annotation_key(sidecar, resource, kind)
        for resource, rule in allowed.items()
        for kind in KINDS
        if (rule.request if kind == "request" else (rule.limit or rule.removableLimit))
    ]
    return f"; it may set: {', '.join(keys)}" if keys else "; it sets none of its resources"
