"""`outrigger rollout`: brings the workloads `audit` finds up to the policy in force.

Reads and classifies the cluster exactly as `outrigger audit` does (webhook.cluster.audit),
reads the workloads found, and plans with webhook.core.rollout. Without --apply it only reports
the plan. With it, wave after wave: each Deployment, StatefulSet and DaemonSet of the wave gets
the strategic-merge patch of `kubectl rollout restart` (so its own strategy paces the
replacement), each bare pod an Eviction (PodDisruptionBudgets hold; a refusal is retried until
the wave's timeout); then the wave is polled until every workload is finished (see
webhook.core.rollout). A timeout, or a wave that waiting cannot finish, stops the run.

What happens is reported as events: a JSON object per line (`JsonReporter`), or lines for a
person with, on a terminal, a progress line while waiting (`TextReporter`).
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from webhook.cluster.audit import (
    CHUNK_SIZE,
    Scope,
    audit_cluster,
    connected,
    paged,
    raw,
)
from webhook.cluster.registration import api_error
from webhook.core.audit import WorkloadFindings, controller_of
from webhook.core.policy import Policy
from webhook.core.rollout import (
    EVICT,
    RESTARTABLE,
    Plan,
    Step,
    Stuck,
    eviction_waiting,
    kept_by_partition,
    make_plan,
    partition_of,
    pods_waiting,
    restart_patch,
    restarted_at,
    rollout_waiting,
    selector_query,
)
from webhook.limits import printable

POLL_SECONDS = 1.0
STRATEGIC_MERGE = "application/strategic-merge-patch+json"  # as kubectl rollout restart sends
# The client's method names for each kind that restarts.
_APPS_RESOURCE = {
    "Deployment": "deployment",
    "StatefulSet": "stateful_set",
    "DaemonSet": "daemon_set",
}

Event = dict[str, Any]


@dataclass(frozen=True)
class Options:
    apply: bool = False
    include_pods: bool = False
    max_workloads: int = 1
    timeout: float = 600.0  # seconds one wave may take


class Reporter(Protocol):
    def plan(self, policy: Policy, plan: Plan, *, apply: bool) -> None: ...

    def emit(self, event: Event) -> None: ...

    def waiting(self, elapsed: float, what: str) -> None: ...


def run_rollout(
    kubeconfig: Path | None,
    context: str | None,
    scope: Scope,
    policy: Policy | None,
    from_cluster: str | None,
    options: Options,
    reporter: Reporter,
) -> bool:
    """Report the plan and, with `options.apply`, run it: True when every wave finished (or
    only the plan was asked for), False when one failed or timed out (its event says which
    workload, and what it was waiting for). AuditError when the API cannot be read or refuses."""
    # Retries: a rollout outlasts a blip of the API server that a report would not wait out.
    with connected(kubeconfig, context, retries=3) as api:
        policy, groups = audit_cluster(api, scope, policy, from_cluster)
        workloads = _workloads(api, groups)
        plan = make_plan(
            groups,
            workloads,
            max_workloads=options.max_workloads,
            include_pods=options.include_pods,
        )
        reporter.plan(policy, plan, apply=options.apply)
        if not options.apply:
            return True
        for number, steps in enumerate(plan.waves, 1):
            wave = _Wave(api, policy, number, len(plan.waves), reporter)
            if not wave.run(steps, options.timeout):
                return False
        reporter.emit({"event": "complete", "waves": len(plan.waves)})
        return True


def _workloads(
    api: Any, groups: Sequence[WorkloadFindings]
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The Deployments, StatefulSets and DaemonSets found, by (namespace, kind, name); one
    deleted since its pods were listed is absent."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    apps = client.AppsV1Api(api)
    found = {}
    for group in groups:
        if group.owner_kind not in RESTARTABLE:
            continue
        read = getattr(apps, f"read_namespaced_{_APPS_RESOURCE[group.owner_kind]}")
        try:
            found[(group.namespace, group.owner_kind, group.owner_name)] = raw(
                read, group.owner_name, group.namespace
            )
        except ApiException as error:
            if error.status != 404:
                raise
    return found


def _event(kind: str, wave: int, step: Step, **fields: Any) -> Event:
    return {
        "event": kind,
        "wave": wave,
        "namespace": step.namespace,
        "kind": step.kind,
        "name": step.name,
        **fields,
    }


class _Wave:
    """One wave: start every step, then poll them until all are finished, one is stuck, or
    the timeout passes."""

    def __init__(self, api: Any, policy: Policy, number: int, total: int, reporter: Reporter):
        self.api, self.policy, self.reporter = api, policy, reporter
        self.number, self.total = number, total

    def run(self, steps: Sequence[Step], timeout: float) -> bool:
        self.reporter.emit(
            {
                "event": "wave",
                "wave": self.number,
                "of": self.total,
                "workloads": [
                    {"namespace": s.namespace, "kind": s.kind, "name": s.name} for s in steps
                ],
            }
        )
        at = restarted_at(datetime.datetime.now(datetime.UTC))
        trackers: list[_Tracker] = [
            _Eviction(self.api, step, self)
            if step.action == EVICT
            else _Restart(self.api, step, self)
            for step in steps
        ]
        from kubernetes.client.exceptions import ApiException

        for tracker in trackers:
            try:
                tracker.start(at)
            except ApiException as error:  # RBAC, an admission policy...: this workload's own
                self._failed(tracker.step, "refused", api_error(error))
                return False
        return self._wait(trackers, timeout)

    def _wait(self, trackers: list[_Tracker], timeout: float) -> bool:
        from kubernetes.client.exceptions import ApiException

        started = time.monotonic()
        pending = list(trackers)
        while True:
            waiting: list[tuple[_Tracker, str]] = []
            for tracker in pending:
                try:
                    what = tracker.check()
                except Stuck as stuck:
                    self._failed(tracker.step, "failed", str(stuck))
                    return False
                except ApiException as error:
                    self._failed(tracker.step, "refused", api_error(error))
                    return False
                if what is not None:
                    waiting.append((tracker, what))
            if not waiting:
                pods = sorted(pod for tracker in trackers for pod in tracker.pods)
                self.reporter.emit({"event": "wave-done", "wave": self.number, "pods": pods})
                return True
            elapsed = time.monotonic() - started
            if elapsed >= timeout:
                for tracker, what in waiting:
                    self._failed(tracker.step, "timeout", what, seconds=timeout)
                return False
            pending = [tracker for tracker, _ in waiting]
            first = waiting[0]
            self.reporter.waiting(elapsed, f"{first[0].step.label}: {first[1]}")
            time.sleep(min(POLL_SECONDS, timeout - elapsed))

    def _failed(self, step: Step, reason: str, what: str, seconds: float = 0.0) -> None:
        where = f"wave {self.number}/{self.total}: {step.namespace} {step.label}"
        if reason == "timeout":
            message = f"{where}: timed out after {seconds:g}s (--timeout) waiting for: {what}"
        elif reason == "refused":
            message = f"{where}: the API server refused: {what}"
        else:
            message = f"{where}: {what}"
        event = _event("failed", self.number, step, reason=reason, waiting_for=what)
        self.reporter.emit({**event, "message": message})

    def emit(self, kind: str, step: Step, **fields: Any) -> None:
        self.reporter.emit(_event(kind, self.number, step, **fields))


class _Tracker(Protocol):
    step: Step
    pods: list[str]  # the pods it ended with, Ready and clean

    def start(self, at: str) -> None: ...

    def check(self) -> str | None: ...


class _Restart:
    """A Deployment, StatefulSet or DaemonSet restarted, then followed until its rollout is
    complete and its pods are Ready and clean."""

    def __init__(self, api: Any, step: Step, wave: _Wave) -> None:
        from kubernetes import client

        self.core, self.apps = client.CoreV1Api(api), client.AppsV1Api(api)
        self.step, self.wave = step, wave
        self.pods: list[str] = []
        self.resource = _APPS_RESOURCE[step.kind]

    def start(self, at: str) -> None:
        patch = getattr(self.apps, f"patch_namespaced_{self.resource}")
        patch(
            self.step.name,
            self.step.namespace,
            restart_patch(at),
            _content_type=STRATEGIC_MERGE,
            _preload_content=False,
        )
        self.wave.emit("restarted", self.step, restartedAt=at)

    def check(self) -> str | None:
        from kubernetes.client.exceptions import ApiException

        read = getattr(self.apps, f"read_namespaced_{self.resource}")
        try:
            workload = raw(read, self.step.name, self.step.namespace)
        except ApiException as error:
            if error.status == 404:
                raise Stuck("deleted during the rollout") from None
            raise
        waiting = rollout_waiting(self.step.kind, workload)
        if waiting is not None:
            return waiting
        pods = self._pods(workload)
        self.pods = [str(pod["metadata"]["name"]) for pod in pods]
        kept: list[str] = []
        if self.step.kind == "StatefulSet" and (partition := partition_of(workload["spec"])):
            kept = [p for p in self.pods if kept_by_partition(p, self.step.name, partition)]
        return pods_waiting(pods, self.step.namespace, self.wave.policy, kept)

    def _pods(self, workload: dict[str, Any]) -> list[dict[str, Any]]:
        """Its pods: those its selector matches that it (a Deployment: one of its
        ReplicaSets) controls, as the controllers themselves tell them apart."""
        namespace = self.step.namespace
        query = selector_query(workload["spec"].get("selector") or {})
        owners = {(self.step.kind, self.step.name)}
        if self.step.kind == "Deployment":
            replica_sets = paged(
                self.apps.list_namespaced_replica_set, CHUNK_SIZE,
                namespace=namespace, label_selector=query,
            )  # fmt: skip
            owners = {
                ("ReplicaSet", str(rs["metadata"]["name"]))
                for rs in replica_sets
                if controller_of(rs) == ("Deployment", self.step.name)
            }
        pods = paged(
            self.core.list_namespaced_pod, CHUNK_SIZE, namespace=namespace, label_selector=query
        )
        return [pod for pod in pods if controller_of(pod) in owners]


class _Eviction:
    """A bare pod evicted (a refusal retried at each check), then followed until it is gone."""

    def __init__(self, api: Any, step: Step, wave: _Wave) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api)
        self.step, self.wave = step, wave
        self.pods: list[str] = []
        self.uid = ""
        self.refusal: str | None = None
        self.evicted = False

    def start(self, at: str) -> None:
        pod = self._read()
        if pod is None:  # gone already
            self.evicted = True
            return
        self.uid = str(pod["metadata"].get("uid", ""))
        self._evict()

    def check(self) -> str | None:
        if not self.evicted:
            self._evict()
            if not self.evicted:
                return f"the eviction, refused: {self.refusal}"
        return eviction_waiting(self._read(), self.uid)

    def _evict(self) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        metadata = {"name": self.step.name, "namespace": self.step.namespace}
        # Preconditioned on the pod read: a new pod that took its name is not evicted.
        body: Any = client.V1Eviction.from_dict(
            {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": metadata,
             "deleteOptions": {"preconditions": {"uid": self.uid}}}
        )  # fmt: skip
        try:
            self.core.create_namespaced_pod_eviction(
                self.step.name, self.step.namespace, body, _preload_content=False
            )
        except ApiException as error:
            if error.status == 429:  # a PodDisruptionBudget allows no disruption now
                self._refused(error)
                return
            if error.status not in (404, 409):  # 404: gone; 409: another pod has its name
                raise
        self.evicted = True
        self.wave.emit("evicted", self.step)

    def _refused(self, error: Any) -> None:
        first = self.refusal is None
        self.refusal = _refusal(error)
        if first:
            self.wave.emit("eviction-refused", self.step, message=self.refusal)

    def _read(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return raw(self.core.read_namespaced_pod, self.step.name, self.step.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise


def _refusal(error: Any) -> str:
    """A 429's Status message and its causes (the PodDisruptionBudget that refused)."""
    try:
        status = json.loads(error.body or "")
        causes = [
            str(c.get("message", "")) for c in (status.get("details") or {}).get("causes") or []
        ]
    except (TypeError, ValueError, AttributeError):
        causes = []
    return "; ".join([api_error(error), *filter(None, causes)])


# Reporting ------------------------------------------------------------------------------------


class JsonReporter:
    """One JSON object per line per event (the plan's entries first), nothing else on stdout;
    a failure's message also on stderr."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err

    def plan(self, policy: Policy, plan: Plan, *, apply: bool) -> None:
        for number, steps in enumerate(plan.waves, 1):
            for step in steps:
                self._write(_plan_entry(policy, step, number))
        for step in plan.left:
            self._write(_plan_entry(policy, step, None))

    def emit(self, event: Event) -> None:
        self._write(event)
        if event["event"] == "failed":
            print(f"outrigger: {printable(event['message'])}", file=self.err)

    def waiting(self, elapsed: float, what: str) -> None:
        """Quiet: the events say what happened."""

    def _write(self, event: Event) -> None:
        # ensure_ascii: whatever a name holds comes out as \\u escapes, never raw.
        self.out.write(json.dumps(event, ensure_ascii=True) + "\n")
        self.out.flush()


def _plan_entry(policy: Policy, step: Step, wave: int | None) -> Event:
    return {
        "event": "plan",
        "policy": policy.version,
        "wave": wave,
        "action": step.action,
        "namespace": step.namespace,
        "kind": step.kind,
        "name": step.name,
        "replicas": step.replicas,
        "pods": list(step.pods),
        "findings": step.counts(),
        "what": step.what,
    }


class TextReporter:
    """Lines for a person, every one escaped (`printable`: names come from the cluster). On a
    terminal, one progress line rewritten in place while a wave waits."""

    SPINNER = "|/-\\"

    def __init__(self, out: TextIO, err: TextIO, *, terminal: bool | None = None) -> None:
        self.out, self.err = out, err
        self.terminal = out.isatty() if terminal is None else terminal
        self._progress = False
        self._ticks = 0

    def plan(self, policy: Policy, plan: Plan, *, apply: bool) -> None:
        count = sum(len(steps) for steps in plan.waves)
        if not count and not plan.left:
            self._line(f"outrigger rollout: nothing to roll out (policy {policy.version})")
            return
        self._line(
            f"policy {policy.version}: {count} workload(s) in {len(plan.waves)} wave(s), "
            f"{len(plan.left)} left alone"
        )
        for number, steps in enumerate(plan.waves, 1):
            for step in steps:
                self._step(f"wave {number}", step)
        for step in plan.left:
            self._step("left", step)
        if not apply:
            self._line("")
            self._line("plan only, nothing changed: --apply runs it")

    def _step(self, where: str, step: Step) -> None:
        found = ", ".join(f"{n} {kind}" for kind, n in step.counts().items())
        of = f" of {step.replicas}" if step.replicas is not None else ""
        self._line("")
        self._line(
            f"{where:<8}{step.namespace}  {step.label}  {len(step.pods)}{of} pod(s): {found}"
        )
        self._line(f"{'':<8}{step.action}: {step.what}")

    def emit(self, event: Event) -> None:
        kind = event["event"]
        where = f"{event.get('namespace', '')}  {event.get('kind', '')}/{event.get('name', '')}"
        if kind == "wave":
            names = ", ".join(
                f"{w['namespace']} {w['kind']}/{w['name']}" for w in event["workloads"]
            )
            self._line("")
            self._line(f"wave {event['wave']}/{event['of']}: {names}")
        elif kind == "restarted":
            self._line(f"  restarted  {where}  (restartedAt {event['restartedAt']})")
        elif kind == "evicted":
            self._line(f"  evicted    {where}")
        elif kind == "eviction-refused":
            self._line(f"  refused    {where}: {event['message']} (retried until the timeout)")
        elif kind == "wave-done":
            self._line(f"  done       {len(event['pods'])} pod(s) Ready and clean")
        elif kind == "complete":
            self._line("")
            self._line(f"rollout complete: {event['waves']} wave(s)")
        elif kind == "failed":
            self._clear()
            print(f"outrigger: {printable(event['message'])}", file=self.err)

    def waiting(self, elapsed: float, what: str) -> None:
        if not self.terminal:
            return
        self._ticks += 1
        spin = self.SPINNER[self._ticks % len(self.SPINNER)]
        text = printable(f"  {spin} {elapsed:4.0f}s  waiting for {what}")
        width = _terminal_width()
        self.out.write("\r\x1b[K" + text[: width - 1])
        self.out.flush()
        self._progress = True

    def _line(self, text: str) -> None:
        self._clear()
        self.out.write(printable(text) + "\n")
        self.out.flush()

    def _clear(self) -> None:
        if self._progress:
            self.out.write("\r\x1b[K")
            self._progress = False


def _terminal_width() -> int:
    return shutil.get_terminal_size((80, 24)).columns


def reporter_for(output: str) -> Reporter:
    if output == "json":
        return JsonReporter(sys.stdout, sys.stderr)
    return TextReporter(sys.stdout, sys.stderr)
