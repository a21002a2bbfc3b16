"""Shared volumes: the pod-level volumes a sidecar brings and the mounts that share them."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Sequence
from typing import Any

Container = dict[str, Any]


def with_mounts(container: Container, mounts: Sequence[dict[str, Any]]) -> Container:
    """A copy of `container` that also has `mounts` (the original is kept, as are its lists)."""
    return {**container, "volumeMounts": [*(container.get("volumeMounts") or ()), *mounts]}


def without_mounts(container: Container, removed: Callable[[object], bool]) -> Container:
    """`container` without its mounts of the volumes `removed` names (itself if none)."""
    mounts = container.get("volumeMounts")
    if not isinstance(mounts, list):
        return container
    kept = [m for m in mounts if not (isinstance(m, dict) and removed(m.get("name")))]
    if len(kept) == len(mounts):
        return container
    if not kept:
        return {key: value for key, value in container.items() if key != "volumeMounts"}
    return {**container, "volumeMounts": kept}


def mount_conflicts(containers: Sequence[Container], path: str) -> list[str]:
    """Names of containers that already mount something at `path` (Kubernetes forbids two),
    comparing paths as the runtime resolves them: `/var/log//app/.` is `/var/log/app`."""
    path = normalised(path)
    return [
        str(container.get("name"))
        for container in containers
        if any(
            normalised(str(m.get("mountPath", ""))) == path
            for m in container.get("volumeMounts") or ()
        )
    ]


def normalised(path: str) -> str:
    if "//" not in path and "/." not in path and not path.endswith("/"):
        return path  # already what the runtime resolves (the common case: no work)
    return posixpath.normpath(re.sub("/+", "/", path)) if path else path


# Fields the API server fills in when they are unset (in containers, probes, ports, volumes):
# an injected pod that comes back (reinvocation) carries them. Nothing else may be added.
API_DEFAULTS = frozenset(
    {
        "terminationMessagePath",
        "terminationMessagePolicy",
        "imagePullPolicy",
        "timeoutSeconds",
        "periodSeconds",
        "successThreshold",
        "failureThreshold",
        "scheme",
        "protocol",
        "defaultMode",
        "apiVersion",  # a downwardAPI item's fieldRef
    }
)


def contains(actual: Any, expected: Any) -> bool:
    """Whether `actual` is `expected` but for fields the API server defaults: every key of
    `expected` with a value it holds in turn, no other key but those of API_DEFAULTS, lists of
    the same length item by item."""
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and all(key in actual and contains(actual[key], v) for key, v in expected.items())
            and all(key in expected or key in API_DEFAULTS for key in actual)
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(contains(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return bool(actual == expected) and type(actual) is type(expected)
