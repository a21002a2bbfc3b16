"""What `outrigger audit` finds in running pods, decided by the webhook's own injector.

For a pod in a namespace the webhook selects, `inject` (the same pure function the webhook
runs) says what the pod should hold under the policy in force:

- **missing**: no `outrigger.dev/status`, and the injector would inject sidecars (the webhook
  was down under `failurePolicy: Ignore`, or installed after the pod started);
- **stale**: a status from another policy version than the one in force;
- **mismatched**: a status of the current version that the pod does not hold (edited after
  admission, or forged).

A pod that is terminating (`metadata.deletionTimestamp`) is none of these: it is going away.

Findings are grouped by the workload that owns the pods, each group with the command that
fixes it (new pods are injected as the policy says).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from webhook.core import annotations as ann
from webhook.core.injector import REINJECTED, InjectionDenied, RequestContext, inject
from webhook.core.policy import Policy
from webhook.core.selection import INJECTED

MISSING, STALE, MISMATCHED = "missing", "stale", "mismatched"
# Workloads whose pods a rollout restart replaces.
_RESTARTABLE = {"Deployment": "deployment", "StatefulSet": "statefulset", "DaemonSet": "daemonset"}


@dataclass(frozen=True, slots=True)
class Finding:
    namespace: str
    pod: str
    kind: str  # MISSING, STALE or MISMATCHED
    sidecars: tuple[str, ...]  # what the policy injects into it now
    detail: str


@dataclass(slots=True)
class WorkloadFindings:
    namespace: str
    owner_kind: str  # Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob or Pod
    owner_name: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def fix(self) -> str:
        resource = _RESTARTABLE.get(self.owner_kind)
        if resource:
            return f"kubectl rollout restart {resource}/{self.owner_name} -n {self.namespace}"
        pods = " ".join(sorted(f.pod for f in self.findings))
        delete = f"kubectl delete pod -n {self.namespace} {pods}"
        if self.owner_kind == "Pod":
            return f"delete the pod and create it again: {delete}"
        return f"delete the pods ({self.owner_kind} {self.owner_name} makes new ones): {delete}"


def classify(
    pod: Mapping[str, Any], namespace: str, policy: Policy, own_namespace: str = ""
) -> Finding | None:
    """The pod's finding, or None when it holds what the policy says (or is not ours);
    `own_namespace`: the webhook's, never injected into ("": none)."""
    metadata = pod.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        # Already on its way out (a restart replaced it): no fix applies, and a rollout
        # waiting for a clean audit would otherwise wait out its grace period.
        return None
    name = str(metadata.get("name", ""))
    status = (metadata.get("annotations") or {}).get(ann.STATUS)
    try:
        injection = inject(dict(pod), RequestContext(namespace, own_namespace), policy)
    except InjectionDenied as denied:  # it would be refused now: not a missing sidecar
        if status is None:
            return None
        return Finding(namespace, name, MISMATCHED, (), f"the policy now refuses it: {denied}")
    if status is None:
        if injection.reason != INJECTED:
            return None
        wanted = ", ".join(injection.injected)
        return Finding(namespace, name, MISSING, injection.injected, f"should have {wanted}")
    if injection.reason != REINJECTED:
        return None  # as the policy renders it, or excluded now
    version = _status_version(status)
    if version != policy.version:
        detail = f"injected under policy {version or 'unknown'}, {policy.version} is in force"
        return Finding(namespace, name, STALE, injection.injected, detail)
    detail = f"{ann.STATUS} claims what the pod does not hold"
    return Finding(namespace, name, MISMATCHED, injection.injected, detail)


def group(
    findings: Iterable[Finding], owners: Mapping[tuple[str, str], tuple[str, str]]
) -> list[WorkloadFindings]:
    """Findings by owning workload; `owners` maps (namespace, pod) to (kind, name)."""
    groups: dict[tuple[str, str, str], WorkloadFindings] = {}
    for finding in findings:
        kind, name = owners.get((finding.namespace, finding.pod), ("Pod", finding.pod))
        key = (finding.namespace, kind, name)
        groups.setdefault(key, WorkloadFindings(finding.namespace, kind, name)).findings.append(
            finding
        )
    return [groups[key] for key in sorted(groups)]


def _status_version(status: str) -> str:
    try:
        document = orjson.loads(status)
    except orjson.JSONDecodeError:
        return ""
    version = document.get("policy") if isinstance(document, dict) else None
    return version if isinstance(version, str) else ""


def controller_of(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """The (kind, name) of an object's controlling owner reference, if any."""
    references = (obj.get("metadata") or {}).get("ownerReferences") or []
    for reference in references:
        if isinstance(reference, dict) and reference.get("controller"):
            return str(reference.get("kind", "")), str(reference.get("name", ""))
    return None


def workload_of(
    pod: Mapping[str, Any], namespace: str, parents: Mapping[tuple[str, str, str], tuple[str, str]]
) -> tuple[str, str]:
    """The workload a pod belongs to: a ReplicaSet's Deployment, a Job's CronJob, its own
    controller otherwise, or the pod itself. `parents` maps (namespace, kind, name) of
    ReplicaSets and Jobs to their own controller."""
    owner = controller_of(pod)
    if owner is None:
        return "Pod", str((pod.get("metadata") or {}).get("name", ""))
    return parents.get((namespace, *owner), owner)
