"""The core: `inject(pod, context, policy)` returns the pod with its sidecars, as a new object.

Pure and shared by the webhook and `outrigger inject`. The input pod is never modified; the
result shares every untouched sub-object with it, which keeps the work proportional to what
changes and lets the patch be derived cheaply from the difference (see `webhook.patch`).
Decide first (excluded? already injected? what is asked?), then check, then build.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from webhook import annotations as ann
from webhook.ambassador import ambassador_container
from webhook.log_watcher import log_watcher_container
from webhook.policy import Policy
from webhook.volumes import SHARED_LOGS, empty_dir_volume, mount_conflicts, with_mount

Pod = dict[str, Any]

# Why a pod came out as it did: log fields, `--explain` output and metric labels.
INJECTED = "injected"
ALREADY_INJECTED = "already-injected"
NOT_REQUESTED = "not-requested"
NAMESPACE_EXCLUDED = "namespace-excluded"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the admission request says about where the pod is created."""

    namespace: str


@dataclass(frozen=True, slots=True)
class Injection:
    pod: Pod
    reason: str
    injected: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


class InjectionDenied(Exception):
    """The pod asks for something that cannot be injected; the message says what and why."""


def inject(pod: Pod, context: RequestContext, policy: Policy) -> Injection:
    if policy.excludes(context.namespace):
        return Injection(pod, NAMESPACE_EXCLUDED)
    metadata = _mapping(pod.get("metadata"), "metadata")
    annotations = _annotations(metadata)
    if ann.STATUS in annotations:
        return Injection(pod, ALREADY_INJECTED)
    try:
        request = ann.parse(annotations, policy.available_sidecars)
    except ann.InvalidAnnotations as error:
        raise InjectionDenied(str(error)) from None
    if not request.sidecars:
        return Injection(pod, NOT_REQUESTED, warnings=request.warnings)
    spec = _mapping(pod.get("spec"), "spec")
    _check_fits(spec, request, policy)
    status = orjson.dumps({"injected": request.sidecars, "policy": policy.version}).decode()
    injected_pod = {
        **pod,
        "metadata": {**metadata, "annotations": {**annotations, ann.STATUS: status}},
        "spec": _injected_spec(spec, request, policy),
    }
    return Injection(injected_pod, INJECTED, request.sidecars, request.warnings)


def _injected_spec(spec: Mapping[str, Any], request: ann.InjectionRequest, policy: Policy) -> Pod:
    sidecars, volumes = _sidecars(policy, request)
    containers: list[dict[str, Any]] = spec["containers"]
    if ann.LOG_WATCHER in request.sidecars:
        containers = [with_mount(c, SHARED_LOGS, request.log_path) for c in containers]
    injected = {**spec, "containers": [*containers, *sidecars]}
    if volumes:
        injected["volumes"] = [*(spec.get("volumes") or ()), *volumes]
    return injected


@lru_cache(maxsize=1024)
def _sidecars(
    policy: Policy, request: ann.InjectionRequest
) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    """The containers and volumes to add, built once per policy and request.

    Pods of one workload ask for the same thing, so the result is shared between them, and
    so are its dicts: nothing may modify an injected pod in place.
    """
    containers: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    for name in request.sidecars:
        if name == ann.LOG_WATCHER:
            settings = policy.sidecars.log_watcher
            volumes.append(empty_dir_volume(SHARED_LOGS, settings.volumeSizeLimit))
            containers.append(log_watcher_container(settings, request.log_path))
        elif name == ann.AMBASSADOR and request.ambassador is not None:
            containers.append(ambassador_container(policy.sidecars.ambassador, request.ambassador))
    return tuple(containers), tuple(volumes)


def _check_fits(spec: Mapping[str, Any], request: ann.InjectionRequest, policy: Policy) -> None:
    """Deny what Kubernetes would reject later with a vaguer message, or what would not run."""
    containers = _containers(spec, "containers")
    every_container = containers + _containers(spec, "initContainers")
    every_container += _containers(spec, "ephemeralContainers")
    names = {c.get("name") for c in every_container}
    problems = [
        f"container name {name!r} is already used in the pod; {ann.INJECT} injects a "
        f"container with that name"
        for name in request.sidecars
        if name in names
    ]
    if ann.LOG_WATCHER in request.sidecars:
        problems += _log_volume_problems(spec, containers, request.log_path)
    if request.ambassador is not None:
        problems += _ambassador_problems(spec, every_container, request.ambassador, policy)
    if problems:
        raise InjectionDenied("; ".join(problems))


def _log_volume_problems(
    spec: Mapping[str, Any], containers: list[dict[str, Any]], log_path: str
) -> list[str]:
    problems = []
    if any(v.get("name") == SHARED_LOGS for v in _list(spec.get("volumes"), "spec.volumes")):
        problems.append(
            f"volume name {SHARED_LOGS!r} is already used in the pod; {ann.LOG_WATCHER} "
            "adds a volume with that name"
        )
    for name in mount_conflicts(containers, log_path):
        problems.append(
            f"container {name!r} already mounts a volume at {log_path}; set {ann.LOG_PATH} "
            "to another directory for the shared log volume"
        )
    return problems


def _ambassador_problems(
    spec: Mapping[str, Any],
    containers: list[dict[str, Any]],
    request: ann.AmbassadorRequest,
    policy: Policy,
) -> list[str]:
    admin_port = policy.sidecars.ambassador.adminPort
    if spec.get("hostNetwork") is True:
        return [
            f"{ann.AMBASSADOR} cannot be injected into a hostNetwork pod: its ports would be "
            "taken on the node itself"
        ]
    if request.local_port == admin_port:
        return [
            f"annotation {ann.AMBASSADOR_PORT}: {admin_port} is the ambassador's admin port; "
            f"choose another port from {ann.MIN_LOCAL_PORT} to 65535"
        ]
    used = {
        p.get("containerPort"): c.get("name")
        for c in containers
        for p in _list(c.get("ports"), "ports")
    }
    return [
        f"container {used[port]!r} already uses port {port}, which the ambassador needs "
        f"({what}); containers of a pod share one network namespace"
        for port, what in (
            (request.local_port, f"set {ann.AMBASSADOR_PORT} to a free port"),
            (admin_port, "its admin port, set by the cluster policy"),
        )
        if port in used
    ]


def _annotations(metadata: Mapping[str, Any]) -> dict[str, str]:
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    for key, value in annotations.items():
        if key.startswith(ann.PREFIX) and not isinstance(value, str):
            raise InjectionDenied(
                f"annotation {key}: annotation values must be strings, got {value!r} "
                "(quote it in YAML)"
            )
    return annotations


def _containers(spec: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
    containers = spec.get(field)
    if containers is None:
        containers = []
    elif not isinstance(containers, list) or not all(isinstance(c, dict) for c in containers):
        raise InjectionDenied(f"spec.{field} must be a list of containers")
    if field == "containers" and not containers:
        raise InjectionDenied("the pod has no spec.containers to inject next to")
    return containers


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InjectionDenied(f"{where} must be an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectionDenied(f"{where} must be a list")
    return value
