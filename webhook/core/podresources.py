"""Pod-level resources (`spec.resources`, beta and on by default since Kubernetes 1.34):
raised by what the injected sidecars add, so that the pod still validates.

What the API server checks (observed on v1.36.2): a pod's requests are at least what its
containers request together, native sidecars included (a container's missing request is its
limit); its requests are at most its limits; each container of `spec.containers` (where
classic sidecars go) has limits at most the pod's. Only cpu, memory and hugepages-* may be set
at pod level. So for each resource the pod names, its request grows by the sidecars' requests
and its limit by their limits, a sidecar without a limit counting its request: the pod's
requests then stay within its limits.

Re-injection takes out what a status claims: `lowered` takes the pod's resources back down by
what the claimed containers add, as they are in the pod, so injecting twice is injecting once.
Values are written in the API server's canonical form, which a stored pod comes back in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import ROUND_CEILING, Decimal, DecimalException
from typing import Any, Final

from webhook.limits import echo

REQUESTS, LIMITS = "requests", "limits"
_QUANTITY: Final = re.compile(
    r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+|[numkMGTPE])?"
)
_BINARY: Final = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_DECIMAL: Final = {
    "n": -9,
    "u": -6,
    "m": -3,
    "": 0,
    "k": 3,
    "M": 6,
    "G": 9,
    "T": 12,
    "P": 15,
    "E": 18,
}
_DECIMAL_SUFFIX: Final = {exponent: suffix for suffix, exponent in _DECIMAL.items()}
# Kubernetes reads a quantity as an int64 of its unit ("8Ei"); the API server stores larger
# ones ("1e300000"), but writing their sum would take as many digits: such a value is refused.
_LARGEST: Final = Decimal(2**63)
Container = Mapping[str, Any]


class NotAQuantity(ValueError):
    """A resource value that is no Kubernetes quantity; the message says where."""


def raised(
    spec: Mapping[str, Any], sidecars: Iterable[Container]
) -> tuple[Mapping[str, Any], str | None]:
    """`spec` with its pod-level resources raised by what the `sidecars` (containers) add,
    and the warning that says what was raised and by how much; `spec` itself and None when
    the pod sets none or the sidecars add nothing to what it names."""
    resources = spec.get("resources")
    if not isinstance(resources, dict):
        return spec, None
    moved, changes = _moved(resources, tuple(sidecars), 1)
    if not changes:
        return spec, None
    warning = "pod-level resources raised by what the injected sidecars add: "
    return {**spec, "resources": moved}, warning + ", ".join(changes)


def lowered(spec: dict[str, Any], removed: Iterable[Container]) -> dict[str, Any]:
    """`spec` with its pod-level resources lowered by what the `removed` containers add."""
    resources = spec.get("resources")
    if not isinstance(resources, dict):
        return spec
    moved, changes = _moved(resources, tuple(removed), -1)
    return {**spec, "resources": moved} if changes else spec


def _moved(
    resources: dict[str, Any], containers: tuple[Container, ...], sign: int
) -> tuple[dict[str, Any], list[str]]:
    """`resources` with each value it names moved by `sign` times what the containers add
    (never below 0), and the changes as `requests cpu 100m -> 150m (+50m)`."""
    result, changes = dict(resources), []
    for kind in (REQUESTS, LIMITS):
        named = resources.get(kind)
        if not isinstance(named, dict):
            continue
        values = dict(named)
        for resource in sorted(named):
            added = sum((_share(c, kind, resource) for c in containers), Decimal(0))
            if not added:
                continue
            before = quantity(named[resource], f"spec.resources.{kind}.{resource}")
            values[resource] = canonical(max(before + sign * added, Decimal(0)), resource)
            changes.append(
                f"{kind} {resource} {named[resource]} -> {values[resource]} "
                f"({'+' if sign > 0 else '-'}{canonical(added, resource)})"
            )
        if values != named:
            result[kind] = values
    return result, changes


def _share(container: Container, kind: str, resource: str) -> Decimal:
    """What one container adds to the pod's `kind` of `resource`: that value, else the other
    one (the API server makes a missing request the limit; a missing limit counts as the
    request, which keeps the pod's requests within its limits), else nothing."""
    resources = container.get("resources")
    other = LIMITS if kind == REQUESTS else REQUESTS
    for key in (kind, other):
        values = resources.get(key) if isinstance(resources, dict) else None
        if isinstance(values, dict) and values.get(resource) is not None:
            where = f"container {container.get('name')!r}: resources.{key}.{resource}"
            return quantity(values[resource], where)
    return Decimal(0)


def quantity(value: object, where: str) -> Decimal:
    """A Kubernetes quantity ("100m", "64Mi", "1e3", 2) from 0 to 8Ei as a number, rounded up
    to the milli unit as the API server's defaulting rounds every resource value ("429u" is
    stored as "1m"); NotAQuantity names `where` otherwise."""
    match = _QUANTITY.fullmatch(str(value)) if isinstance(value, str | int | float) else None
    number = None if match is None or isinstance(value, bool) else _number(*match.groups())
    if number is None or not 0 <= number <= _LARGEST:
        raise NotAQuantity(
            f"{where}: {echo(value)} is not a Kubernetes quantity from 0 to 8Ei (such as 100m, "
            "64Mi)"
        )
    return number.scaleb(3).to_integral_value(ROUND_CEILING).scaleb(-3)


def _number(digits: str, suffix: str | None) -> Decimal | None:
    suffix = suffix or ""
    try:
        if suffix in _BINARY:
            return Decimal(digits) * (1 << 10 * _BINARY.index(suffix))
        exponent = _DECIMAL[suffix] if suffix in _DECIMAL else int(suffix[1:])
        return Decimal(digits).scaleb(exponent)
    except (DecimalException, ValueError):  # an exponent past what a Decimal holds
        return None


def canonical(value: Decimal, resource: str) -> str:
    """`value` as the API server writes it back: bytes (all but cpu) in the largest exact
    binary suffix ("96Mi"), anything else in decimal SI with the largest exponent, a multiple
    of 3, that keeps the number whole ("150m", "1", "2k", "133554432")."""
    if not value:
        return "0"
    if resource != "cpu" and value >= 1024 and value == value.to_integral_value():
        whole = int(value)
        power = next(p for p in range(6, -1, -1) if whole % 1024**p == 0)
        if power:
            return f"{whole // 1024**power}{_BINARY[power]}"
    for exponent in range(18, -3, -3):
        mantissa = value.scaleb(-exponent)
        if mantissa == mantissa.to_integral_value():
            return f"{int(mantissa)}{_DECIMAL_SUFFIX[exponent]}"
    return f"{int(value.scaleb(3).to_integral_value(ROUND_CEILING))}m"  # as `quantity` rounds
