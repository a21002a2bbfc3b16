"""Where each workload kind keeps its pod template, for `outrigger inject` on manifests."""

from __future__ import annotations

from typing import Any

from webhook.core.injector import Injection, RequestContext, inject
from webhook.core.policy import Policy

# Path of field names from the object to its pod (template); a Pod is its own template.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def inject_workload(
    document: dict[str, Any], default_namespace: str, policy: Policy, own_namespace: str = ""
) -> tuple[dict[str, Any], Injection | None]:
    """The document with its pod template injected; other kinds come back unchanged (None).
    `own_namespace`: the webhook's, never injected into ("": none)."""
    path = TEMPLATE_PATHS.get(str(document.get("kind")))
    if path is None:
        return document, None
    metadata = document.get("metadata") or {}
    namespace = str(metadata.get("namespace") or default_namespace)
    template = _get(document, path)
    if template is None:
        return document, None  # nothing to inject into; leave the object exactly as it is
    injection = inject(template, RequestContext(namespace, own_namespace), policy)
    return _replace(document, path, injection.pod), injection


def pod_template(document: dict[str, Any]) -> dict[str, Any] | None:
    """The workload's pod (template), the Pod itself for a Pod; None for other kinds, or
    where the object holds none."""
    path = TEMPLATE_PATHS.get(str(document.get("kind")))
    return _get(document, path) if path is not None else None


def pod_template_metadata(document: dict[str, Any]) -> dict[str, Any]:
    """The metadata of the workload's pod (template); {} for other kinds."""
    template = pod_template(document)
    metadata = template.get("metadata") if template is not None else None
    return metadata if isinstance(metadata, dict) else {}


def _get(document: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = document
    for field in path:
        node = node.get(field) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _replace(document: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    if not path:
        return dict(value)
    head, rest = path[0], path[1:]
    return {**document, head: _replace(document.get(head) or {}, rest, value)}
