"""What `outrigger rollout` does with what `audit` found, and when a wave is finished: pure.

The plan turns audit's findings, grouped by workload, into steps:

- a Deployment, StatefulSet or DaemonSet is **restarted** with the change `kubectl rollout
  restart` makes (the pod template's `kubectl.kubernetes.io/restartedAt`), so that its own
  strategy (`maxUnavailable`, `maxSurge`, `partition`) replaces the pods;
- a bare pod is **evicted** (the Eviction API, which PodDisruptionBudgets hold) only when asked
  for: nothing brings it back;
- everything else is **left** alone, saying why: a Job runs to completion and a CronJob's next
  Job is injected anyway, a ReplicaSet without a Deployment has no rollout, a paused or
  `OnDelete` workload would not replace its pods.

Restarts come in waves of at most `max_workloads`, evictions after every restart. A wave is
finished when each workload's rollout is, as `kubectl rollout status` judges it, and its pods
are all Ready, none terminating, and each audits clean under the policy in force.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from webhook.core.audit import WorkloadFindings, classify
from webhook.core.policy import Policy

RESTART, EVICT, LEAVE = "restart", "evict", "leave"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"  # what `kubectl rollout restart` sets
RESTARTABLE = ("Deployment", "StatefulSet", "DaemonSet")
# kubectl's reason for a Deployment that stopped progressing (its progressDeadlineSeconds).
PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"

_LEFT_BY_KIND = {
    "Job": "a Job runs to completion and is never restarted; a new Job is injected under the "
    "policy in force",
    "CronJob": "its Jobs run to completion and are never restarted; its next Job is injected "
    "under the policy in force",
    "ReplicaSet": "a ReplicaSet that no Deployment controls has no rollout: its pods are "
    "replaced only when deleted",
}
_BARE_POD = "nothing recreates a bare pod: it will not come back unless something creates it again"


@dataclass(frozen=True, slots=True)
class Step:
    """One workload of the plan and what is done with it."""

    namespace: str
    kind: str
    name: str
    action: str  # RESTART, EVICT or LEAVE
    pods: tuple[str, ...]  # the pods audit found, by name
    findings: tuple[str, ...]  # their classes (missing, stale, mismatched), in the same order
    what: str  # what is done to it, or why it is left alone
    replicas: int | None = None  # the pods it asks for, where it says

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.name}"

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.findings).items()))


@dataclass(frozen=True, slots=True)
class Plan:
    waves: tuple[tuple[Step, ...], ...]
    left: tuple[Step, ...]


class Stuck(Exception):
    """Waiting will not finish the wave; the message says why."""


# Planning -------------------------------------------------------------------------------------


def make_plan(
    groups: Iterable[WorkloadFindings],
    workloads: Mapping[tuple[str, str, str], Mapping[str, Any]],
    *,
    max_workloads: int,
    include_pods: bool,
) -> Plan:
    """`workloads` holds the Deployments, StatefulSets and DaemonSets read from the cluster, by
    (namespace, kind, name); one missing from it was deleted meanwhile."""
    if max_workloads < 1:
        raise ValueError("max_workloads must be at least 1")
    steps = [
        decide(group, workloads.get(_key(group)), include_pods=include_pods) for group in groups
    ]
    # Evictions last: a restarted workload comes back, an evicted pod does not.
    ordered = [s for s in steps if s.action == RESTART] + [s for s in steps if s.action == EVICT]
    waves = tuple(
        tuple(ordered[start : start + max_workloads])
        for start in range(0, len(ordered), max_workloads)
    )
    return Plan(waves, tuple(s for s in steps if s.action == LEAVE))


def _key(group: WorkloadFindings) -> tuple[str, str, str]:
    return group.namespace, group.owner_kind, group.owner_name


def decide(
    group: WorkloadFindings, workload: Mapping[str, Any] | None, *, include_pods: bool
) -> Step:
    """What to do with one workload's findings (`workload`: its object, for the kinds that
    restart)."""
    ordered = sorted(group.findings, key=lambda finding: finding.pod)
    pods = tuple(finding.pod for finding in ordered)
    classes = tuple(finding.kind for finding in ordered)

    def step(action: str, what: str, replicas: int | None = None) -> Step:
        kind, name = group.owner_kind, group.owner_name
        return Step(group.namespace, kind, name, action, pods, classes, what, replicas)

    if group.owner_kind in RESTARTABLE:
        if workload is None:
            return step(LEAVE, "not found: deleted since its pods were listed")
        action, what = _restart_or_leave(group, workload)
        return step(action, what, _replicas(group.owner_kind, workload))
    if group.owner_kind == "Pod":
        if include_pods:
            return step(EVICT, f"evict (the Eviction API: PodDisruptionBudgets hold); {_BARE_POD}")
        return step(LEAVE, f"a bare pod, evicted only with --include-pods; {_BARE_POD}")
    if group.owner_kind in ("Job", "CronJob"):
        return step(LEAVE, _LEFT_BY_KIND[group.owner_kind])
    why = _LEFT_BY_KIND.get(
        group.owner_kind, f"a {group.owner_kind}'s pods: rollout knows no safe way to replace them"
    )
    return step(LEAVE, f"{why}; by hand, {group.fix}")


def _restart_or_leave(group: WorkloadFindings, workload: Mapping[str, Any]) -> tuple[str, str]:
    spec = workload.get("spec") or {}
    resource = f"{group.owner_kind.lower()}/{group.owner_name} -n {group.namespace}"
    if spec.get("paused"):
        return LEAVE, (
            "paused: kubectl rollout restart refuses a paused Deployment; resume it "
            f"(kubectl rollout resume {resource}) and run again"
        )
    strategy = spec.get("updateStrategy") or {}
    if group.owner_kind != "Deployment" and strategy.get("type") == "OnDelete":
        return LEAVE, (
            f"updateStrategy OnDelete: a restart replaces no pod; by hand, {group.fix}, then "
            "delete the pods one by one"
        )
    how = strategy_text(group.owner_kind, spec)
    return RESTART, f"{RESTARTED_AT} on the pod template, as kubectl rollout restart; {how}"


def strategy_text(kind: str, spec: Mapping[str, Any]) -> str:
    """How the workload replaces its pods, from its own spec (as the API server defaults it)."""
    if kind == "Deployment":
        strategy = spec.get("strategy") or {}
        if strategy.get("type") == "Recreate":
            return "strategy Recreate: every old pod stops before new ones start"
        rolling = strategy.get("rollingUpdate") or {}
        return (
            f"RollingUpdate, maxUnavailable {rolling.get('maxUnavailable', '25%')}, "
            f"maxSurge {rolling.get('maxSurge', '25%')}"
        )
    rolling = (spec.get("updateStrategy") or {}).get("rollingUpdate") or {}
    if kind == "StatefulSet":
        unavailable = rolling.get("maxUnavailable", 1)
        text = f"RollingUpdate, highest ordinal first, maxUnavailable {unavailable}"
        if partition := partition_of(spec):
            text += f", partition {partition}: ordinals below {partition} keep their pods"
        return text
    return (
        f"RollingUpdate, maxUnavailable {rolling.get('maxUnavailable', 1)}, "
        f"maxSurge {rolling.get('maxSurge', 0)}"
    )


def _replicas(kind: str, workload: Mapping[str, Any]) -> int | None:
    if kind == "DaemonSet":
        scheduled = (workload.get("status") or {}).get("desiredNumberScheduled")
        return int(scheduled) if scheduled is not None else None
    replicas = (workload.get("spec") or {}).get("replicas")
    return int(replicas) if replicas is not None else None


# Doing ----------------------------------------------------------------------------------------


def restarted_at(now: datetime.datetime) -> str:
    """RFC 3339 in UTC, to the second, as `kubectl rollout restart` writes it."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def restart_patch(at: str) -> dict[str, Any]:
    """The strategic-merge patch of `kubectl rollout restart`: a new pod template, nothing else."""
    return {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: at}}}}}


def selector_query(selector: Mapping[str, Any]) -> str:
    """A workload's `spec.selector` (matchLabels, matchExpressions) as a `labelSelector`."""
    terms = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key", ""), expression.get("operator")
        values = ",".join(sorted(expression.get("values") or []))
        if operator == "In":
            terms.append(f"{key} in ({values})")
        elif operator == "NotIn":
            terms.append(f"{key} notin ({values})")
        elif operator == "Exists":
            terms.append(key)
        elif operator == "DoesNotExist":
            terms.append(f"!{key}")
        else:
            raise ValueError(f"unknown selector operator {operator!r}")
    return ",".join(terms)


# Judging --------------------------------------------------------------------------------------


def rollout_waiting(kind: str, workload: Mapping[str, Any]) -> str | None:
    """What the workload's rollout still waits for, None once it is complete: the tests of
    `kubectl rollout status`, and every desired replica Ready. Stuck for a Deployment past its
    progress deadline."""
    spec, status = workload.get("spec") or {}, workload.get("status") or {}
    generation = int((workload.get("metadata") or {}).get("generation") or 0)
    observed = int(status.get("observedGeneration") or 0)
    if observed < generation:
        return f"the controller to see the change (observedGeneration {observed} < {generation})"
    if kind == "Deployment":
        return _deployment_waiting(spec, status)
    if kind == "StatefulSet":
        return _statefulset_waiting(spec, status)
    if kind == "DaemonSet":
        return _daemonset_waiting(status)
    raise ValueError(f"no rollout for a {kind}")


def _count(status: Mapping[str, Any], field: str) -> int:
    return int(status.get(field) or 0)


def _deployment_waiting(spec: Mapping[str, Any], status: Mapping[str, Any]) -> str | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and (
            condition.get("reason") == PROGRESS_DEADLINE_EXCEEDED
        ):
            raise Stuck(f"exceeded its progress deadline: {condition.get('message', '')}")
    desired = int(spec.get("replicas", 1))
    updated = _count(status, "updatedReplicas")
    if updated < desired:
        return f"{updated} of {desired} new replicas updated"
    if (old := _count(status, "replicas") - updated) > 0:
        # What holds old pods is new ones not yet available (availableReplicas counts the old
        # ones too, so it cannot say how many new ones are).
        return f"{old} old replica(s) to terminate, as new pods become available"
    if (available := _count(status, "availableReplicas")) < updated:
        return f"{available} of {updated} updated replicas available"
    if (ready := _count(status, "readyReplicas")) < desired:
        return f"{ready} of {desired} replicas Ready"
    return None


def _statefulset_waiting(spec: Mapping[str, Any], status: Mapping[str, Any]) -> str | None:
    desired = int(spec.get("replicas", 1))
    if (ready := _count(status, "readyReplicas")) < desired:
        return f"{ready} of {desired} replicas Ready"
    if partition := partition_of(spec):
        wanted = desired - partition
        if (updated := _count(status, "updatedReplicas")) < wanted:
            return f"{updated} of {wanted} new replicas updated (partition {partition})"
        return None
    if status.get("updateRevision") != status.get("currentRevision"):
        return f"{_count(status, 'updatedReplicas')} of {desired} replicas at the new revision"
    return None


def _daemonset_waiting(status: Mapping[str, Any]) -> str | None:
    desired = _count(status, "desiredNumberScheduled")
    if (updated := _count(status, "updatedNumberScheduled")) < desired:
        return f"{updated} of {desired} new pods updated"
    if (available := _count(status, "numberAvailable")) < desired:
        return f"{available} of {desired} updated pods available"
    return None


def partition_of(spec: Mapping[str, Any]) -> int:
    """A StatefulSet's rolling-update partition (0 without one)."""
    rolling = (spec.get("updateStrategy") or {}).get("rollingUpdate") or {}
    return int(rolling.get("partition") or 0)


def kept_by_partition(pod: str, statefulset: str, partition: int) -> bool:
    """A StatefulSet's pod whose ordinal is below the partition: not replaced by a rollout."""
    prefix = f"{statefulset}-"
    ordinal = pod[len(prefix) :] if pod.startswith(prefix) else ""
    return ordinal.isdigit() and int(ordinal) < partition


def is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pods_waiting(
    pods: Sequence[Mapping[str, Any]],
    namespace: str,
    policy: Policy,
    kept: Collection[str] = (),
) -> str | None:
    """What a finished rollout's pods still wait for: none terminating, each Ready. Stuck when
    they all are but one does not audit clean (`kept`: pods the rollout does not replace):
    waiting would not change a running pod."""
    names = [str((pod.get("metadata") or {}).get("name", "")) for pod in pods]
    for name, pod in zip(names, pods, strict=True):
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            return f"pod {name} to terminate"
    for name, pod in zip(names, pods, strict=True):
        if not is_ready(pod):
            return f"pod {name} to be Ready"
    for name, pod in zip(names, pods, strict=True):
        finding = None if name in kept else classify(pod, namespace, policy)
        if finding is not None:
            raise Stuck(
                f"pod {finding.pod} is Ready but {finding.kind}: {finding.detail} (does the "
                f"webhook serve policy {policy.version}, and select namespace {namespace}?)"
            )
    return None


def eviction_waiting(pod: Mapping[str, Any] | None, uid: str) -> str | None:
    """What an evicted pod still waits for: to be gone (a new pod of its name is not it)."""
    metadata = (pod or {}).get("metadata") or {}
    if pod is None or metadata.get("uid") != uid:
        return None
    name = metadata.get("name", "")
    if metadata.get("deletionTimestamp"):
        return f"pod {name} to terminate"
    return f"pod {name} to be evicted"
