"""Shared volumes: the pod-level volume and the mounts that let containers share it."""

from __future__ import annotations

from typing import Any

SHARED_LOGS = "shared-logs"

Container = dict[str, Any]


def empty_dir_volume(name: str, size_limit: str | None = None) -> dict[str, Any]:
    """An emptyDir lives exactly as long as the pod, which is what sharing within it needs."""
    empty_dir: dict[str, Any] = {"sizeLimit": size_limit} if size_limit else {}
    return {"name": name, "emptyDir": empty_dir}


def volume_mount(name: str, path: str, *, read_only: bool = False) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": name, "mountPath": path}
    if read_only:
        mount["readOnly"] = True
    return mount


def with_mount(container: Container, name: str, path: str) -> Container:
    """A copy of `container` that also mounts volume `name` at `path` (the original is kept)."""
    mounts = [*container.get("volumeMounts", ()), volume_mount(name, path)]
    return {**container, "volumeMounts": mounts}


def mount_conflicts(containers: list[Container], path: str) -> list[str]:
    """Names of containers that already mount something at `path` (Kubernetes forbids two)."""
    return [
        str(container.get("name"))
        for container in containers
        if any(
            m.get("mountPath", "").rstrip("/") == path for m in container.get("volumeMounts", ())
        )
    ]
