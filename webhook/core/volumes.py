"""Shared volumes: the pod-level volumes a sidecar brings and the mounts that share them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Container = dict[str, Any]


def with_mounts(container: Container, mounts: Sequence[dict[str, Any]]) -> Container:
    """A copy of `container` that also has `mounts` (the original is kept, as are its lists)."""
    return {**container, "volumeMounts": [*(container.get("volumeMounts") or ()), *mounts]}


def mount_conflicts(containers: Sequence[Container], path: str) -> list[str]:
    """Names of containers that already mount something at `path` (Kubernetes forbids two)."""
    path = path.rstrip("/")
    return [
        str(container.get("name"))
        for container in containers
        if any(
            str(m.get("mountPath", "")).rstrip("/") == path
            for m in container.get("volumeMounts") or ()
        )
    ]
