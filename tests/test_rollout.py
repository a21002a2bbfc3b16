"""`outrigger rollout`: the plan and its judging (pure), and the command end to end.

The end-to-end tests run the real `outrigger rollout` (the installed entry point, in a
subprocess) against a real kube-apiserver with its controller manager (`kube` tier): real
Deployments, ReplicaSets, a CronJob's Job, PodDisruptionBudgets and the Eviction API, pods
injected by a real `outrigger serve` the API server calls.

Stale pods: two webhooks are registered, one serving an earlier policy (the embedded one with
the log-watcher's image a release back) for the namespaces labelled `old`, one the embedded
policy for those labelled `new`.
Pods are made in a namespace labelled `old`, which is then relabelled `new`: from then on the
policy in force for them is another than the one they were injected under, as after a policy
change.

Readiness: there is no kubelet, so no pod becomes Ready by itself. The tests play the kubelet's
part: a background thread sets the pods' status (phase Running, the Ready and ContainersReady
conditions, a running state per container) through the real API server's `pods/status`
subresource, for the pods it is told to; the ReplicaSet and Deployment controllers then count
them as a kubelet's. A Deployment whose pods it is not told about never becomes Ready.
"""

from __future__ import annotations

import datetime
import errno
import io
import json
import os
import pty
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import outrigger_executable, run_against_cluster
from tests.fake_kube import write_kubeconfig
from tests.kube_env import ControlPlane
from tests.kube_webhook import (
    LABEL,
    configuration,
    new_selector,
    policy_configmap,
    registered,
    running_webhook,
    selected_namespace,
)
from tests.test_audit import (
    LOG,
    _job_of_a_cronjob,
    _template,
    injected,
    pod,
    stale,
)
from webhook.cluster.rollout import JsonReporter, TextReporter
from webhook.core.audit import MISSING, STALE, Finding, WorkloadFindings
from webhook.core.policy import Policy, default_policy, parse_policy
from webhook.core.rollout import (
    EVICT,
    LEAVE,
    RESTART,
    RESTARTED_AT,
    Plan,
    Step,
    Stuck,
    eviction_waiting,
    kept_by_partition,
    make_plan,
    pods_waiting,
    restart_patch,
    restarted_at,
    rollout_waiting,
    selector_query,
)
from webhook.serving.certs import write_certificates

POLICY = default_policy()


# Planning -------------------------------------------------------------------------------------


def found(kind: str, name: str, *pods: str, finding: str = STALE) -> WorkloadFindings:
    group = WorkloadFindings("shop", kind, name)
    group.findings += [Finding("shop", p, finding, ("log-watcher",), "d") for p in pods]
    return group


def workload(kind: str, name: str, **spec: Any) -> tuple[tuple[str, str, str], dict[str, Any]]:
    body = {"replicas": 2, **spec} if kind != "DaemonSet" else spec
    return ("shop", kind, name), {"metadata": {"name": name}, "spec": body, "status": {}}


GROUPS = [
    found("CronJob", "report", "report-29-x"),
    found("DaemonSet", "agent", "agent-x", finding=MISSING),
    found("DaemonSet", "ondelete", "ondelete-x"),
    found("Deployment", "api", "api-1", "api-2"),
    found("Deployment", "gone", "gone-1"),
    found("Deployment", "paused", "paused-1"),
    found("Deployment", "web", "web-1"),
    found("Job", "once", "once-x"),
    found("Pod", "debug", "debug"),
    found("ReplicaSet", "orphan", "orphan-x"),
    found("ReplicationController", "legacy", "legacy-x"),
    found("StatefulSet", "db", "db-0", "db-1"),
]
WORKLOADS = dict(
    [
        workload("DaemonSet", "agent", updateStrategy={"type": "RollingUpdate"}),
        workload("DaemonSet", "ondelete", updateStrategy={"type": "OnDelete"}),
        workload("Deployment", "api"),
        workload("Deployment", "paused", paused=True),
        workload("Deployment", "web", strategy={"type": "Recreate"}),
        workload(
            "StatefulSet",
            "db",
            updateStrategy={"type": "RollingUpdate", "rollingUpdate": {"partition": 1}},
        ),
    ]
)


def shape(plan: Plan) -> tuple[list[list[str]], dict[str, str]]:
    waves = [[f"{s.action} {s.label}" for s in wave] for wave in plan.waves]
    return waves, {s.label: s.what for s in plan.left}


def test_the_plan_restarts_in_waves_and_leaves_the_rest_saying_why() -> None:
    waves, left = shape(make_plan(GROUPS, WORKLOADS, max_workloads=2, include_pods=False))
    assert waves == [
        ["restart DaemonSet/agent", "restart Deployment/api"],
        ["restart Deployment/web", "restart StatefulSet/db"],
    ]
    assert set(left) == {
        "CronJob/report", "DaemonSet/ondelete", "Deployment/gone", "Deployment/paused",
        "Job/once", "Pod/debug", "ReplicaSet/orphan", "ReplicationController/legacy",
    }  # fmt: skip
    assert "never restarted" in left["CronJob/report"] and "by hand" not in left["CronJob/report"]
    assert "never restarted" in left["Job/once"]
    assert "OnDelete" in left["DaemonSet/ondelete"]
    assert "not found" in left["Deployment/gone"]
    assert "kubectl rollout resume deployment/paused -n shop" in left["Deployment/paused"]
    assert "--include-pods" in left["Pod/debug"] and "will not come back" in left["Pod/debug"]
    assert "no rollout" in left["ReplicaSet/orphan"]
    assert "kubectl delete pod -n shop orphan-x" in left["ReplicaSet/orphan"]
    assert "no safe way" in left["ReplicationController/legacy"]


def test_one_workload_per_wave_by_default_and_evictions_come_last() -> None:
    plan = make_plan(GROUPS, WORKLOADS, max_workloads=1, include_pods=True)
    waves, left = shape(plan)
    assert waves == [
        ["restart DaemonSet/agent"], ["restart Deployment/api"], ["restart Deployment/web"],
        ["restart StatefulSet/db"], ["evict Pod/debug"],
    ]  # fmt: skip
    assert "Pod/debug" not in left
    (evicted,) = plan.waves[-1]
    assert evicted.action == EVICT and "will not come back" in evicted.what


def test_a_step_says_how_its_workload_replaces_pods_and_what_was_found() -> None:
    plan = make_plan(GROUPS, WORKLOADS, max_workloads=10, include_pods=False)
    steps = {s.label: s for s in plan.waves[0]}
    assert steps["Deployment/api"].what == (
        f"{RESTARTED_AT} on the pod template, as kubectl rollout restart; RollingUpdate, "
        "maxUnavailable 25%, maxSurge 25%"
    )
    assert "Recreate" in steps["Deployment/web"].what
    assert "partition 1: ordinals below 1 keep their pods" in steps["StatefulSet/db"].what
    assert steps["Deployment/api"].pods == ("api-1", "api-2")
    assert steps["Deployment/api"].replicas == 2
    assert steps["DaemonSet/agent"].counts() == {MISSING: 1}


def test_at_least_one_workload_per_wave() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        make_plan(GROUPS, WORKLOADS, max_workloads=0, include_pods=False)


def test_the_restart_is_kubectls() -> None:
    two_hours_east = datetime.timezone(datetime.timedelta(hours=2))
    at = restarted_at(datetime.datetime(2026, 1, 2, 3, 4, 5, 999, tzinfo=two_hours_east))
    assert at == "2026-01-02T01:04:05Z"
    assert restart_patch(at) == {
        "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: at}}}}
    }


def test_a_selector_becomes_a_label_query() -> None:
    selector = {
        "matchLabels": {"app": "web", "tier": "front"},
        "matchExpressions": [
            {"key": "track", "operator": "In", "values": ["stable", "canary"]},
            {"key": "env", "operator": "NotIn", "values": ["dev"]},
            {"key": "team", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"},
        ],
    }
    assert selector_query(selector) == (
        "app=web,tier=front,track in (canary,stable),env notin (dev),team,!legacy"
    )
    with pytest.raises(ValueError, match="Near"):
        selector_query({"matchExpressions": [{"key": "a", "operator": "Near"}]})


# Judging ----------------------------------------------------------------------------------------


def deployment(generation: int = 2, **status: Any) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "spec": {"replicas": 2}, "status": status}


DONE = {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2,
        "readyReplicas": 2}  # fmt: skip


@pytest.mark.parametrize(
    ("status", "waiting"),
    [
        pytest.param({**DONE, "observedGeneration": 1}, "observedGeneration 1 < 2", id="unseen"),
        pytest.param({**DONE, "updatedReplicas": 1, "replicas": 3}, "1 of 2 new", id="updating"),
        pytest.param(
            {**DONE, "replicas": 3, "availableReplicas": 3},
            "1 old replica(s) to terminate",
            id="old-left-however-many-available",
        ),
        pytest.param(
            {**DONE, "availableReplicas": 1}, "1 of 2 updated replicas available", id="unavailable"
        ),
        pytest.param(DONE, None, id="complete"),
    ],
)
def test_a_deployment_rollout_is_judged_as_kubectl_does(
    status: dict[str, Any], waiting: str | None
) -> None:
    said = rollout_waiting("Deployment", deployment(**status))
    if waiting is None:
        assert said is None
    else:
        assert said is not None and waiting in said


def test_a_deployment_past_its_progress_deadline_is_stuck() -> None:
    condition = {"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "slow"}
    with pytest.raises(Stuck, match="progress deadline: slow"):
        rollout_waiting("Deployment", deployment(**DONE, conditions=[condition]))


def test_a_partitioned_statefulset_is_done_above_its_partition() -> None:
    spec = {
        "replicas": 3,
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}},
    }
    status = {"observedGeneration": 1, "readyReplicas": 3, "updatedReplicas": 1,
              "currentRevision": "a", "updateRevision": "b"}  # fmt: skip
    sts = {"metadata": {"generation": 1}, "spec": spec, "status": status}
    assert rollout_waiting("StatefulSet", sts) == "1 of 2 new replicas updated (partition 1)"
    sts["status"] = {**status, "updatedReplicas": 2}
    assert rollout_waiting("StatefulSet", sts) is None
    assert kept_by_partition("db-0", "db", 1) and not kept_by_partition("db-1", "db", 1)
    assert not kept_by_partition("db-extra-0", "db", 1)


def test_a_daemonset_waits_for_every_scheduled_pod() -> None:
    status = {"observedGeneration": 1, "desiredNumberScheduled": 2, "updatedNumberScheduled": 2,
              "numberAvailable": 1}  # fmt: skip
    ds = {"metadata": {"generation": 1}, "spec": {}, "status": status}
    assert rollout_waiting("DaemonSet", ds) == "1 of 2 updated pods available"
    ds["status"] = {**status, "numberAvailable": 2}
    assert rollout_waiting("DaemonSet", ds) is None


def ready(pod: dict[str, Any]) -> dict[str, Any]:
    return {**pod, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def test_pods_wait_for_terminating_ones_then_readiness_then_must_be_clean() -> None:
    clean = ready(injected("web-1"))
    leaving = ready(injected("web-0"))
    leaving["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pods_waiting([clean, leaving], "shop", POLICY) == "pod web-0 to terminate"
    assert pods_waiting([clean, injected("web-2")], "shop", POLICY) == "pod web-2 to be Ready"
    assert pods_waiting([clean], "shop", POLICY) is None
    with pytest.raises(Stuck, match="pod db-0 is Ready but stale"):
        pods_waiting([clean, ready(stale("db-0"))], "shop", POLICY)
    assert pods_waiting([clean, ready(stale("db-0"))], "shop", POLICY, kept=["db-0"]) is None


def test_an_evicted_pod_is_done_once_gone_or_replaced() -> None:
    bare = pod("debug")
    bare["metadata"]["uid"] = "u1"
    assert eviction_waiting(bare, "u1") == "pod debug to be evicted"
    bare["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert eviction_waiting(bare, "u1") == "pod debug to terminate"
    assert eviction_waiting(bare, "u2") is None  # a new pod of the same name
    assert eviction_waiting(None, "u1") is None


# Reporting --------------------------------------------------------------------------------------

HOSTILE = Step("shop", "Deployment", "web\x1b[2J", RESTART, ("web\x1b[2J-1",), (STALE,), "r", 1)


def test_text_escapes_names_and_shows_progress_only_on_a_terminal() -> None:
    for terminal in (True, False):
        out, err = io.StringIO(), io.StringIO()
        reporter = TextReporter(out, err, terminal=terminal)
        reporter.plan(POLICY, Plan(((HOSTILE,),), ()), apply=True)
        reporter.waiting(3.0, "Deployment/web\x1b[2J: pod x to be Ready")
        reporter.emit({"event": "failed", "message": "wave 1/1: shop Deployment/web\x1b[2J: x"})
        assert "\x1b[2J" not in out.getvalue() + err.getvalue()
        assert "Deployment/web\\x1b[2J  1 of 1 pod(s): 1 stale" in out.getvalue()
        assert err.getvalue() == "outrigger: wave 1/1: shop Deployment/web\\x1b[2J: x\n"
        assert ("waiting for Deployment/web" in out.getvalue()) == terminal


def test_json_is_one_object_a_line_and_quiet_while_waiting() -> None:
    out, err = io.StringIO(), io.StringIO()
    reporter = JsonReporter(out, err)
    reporter.plan(POLICY, Plan(((HOSTILE,),), ()), apply=False)
    reporter.waiting(3.0, "anything")
    reporter.emit({"event": "wave-done", "wave": 1, "pods": ["web\x1b[2J-1"]})
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["plan", "wave-done"]
    assert all(line.isascii() and line.isprintable() for line in lines)
    assert json.loads(lines[0])["name"] == "web\x1b[2J" and err.getvalue() == ""


# End to end, against a real API server and controller manager ---------------------------------


def earlier_policy() -> Policy:
    """The embedded policy as a release before it had it: the log-watcher's image one back."""
    document = default_policy().model_dump(mode="json")
    (watcher,) = [s for s in document["sidecars"] if s["name"] == "log-watcher"]
    watcher["container"]["image"] = "cr.fluentbit.io/fluent/fluent-bit:4.1.0"
    return parse_policy(document, "the earlier policy")


@dataclass(frozen=True)
class Webhooks:
    kube: ControlPlane
    old: str  # the label value of namespaces under the earlier policy
    new: str  # ... and under the policy in force
    configuration: str  # the name of the webhook configuration of the policy in force
    earlier: str  # the version of the earlier policy


@pytest.fixture(scope="module")
def webhooks(
    kube_controllers: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Webhooks]:
    kube, old, new = kube_controllers, new_selector(), new_selector()
    folder = tmp_path_factory.mktemp("rollout-webhooks")
    with (
        running_webhook(folder / "old", earlier_policy()) as earlier,
        running_webhook(folder / "new") as current,
        registered(kube, configuration(earlier.url, earlier.server.cert_dir / "ca.crt", old)),
        registered(
            kube, configuration(current.url, current.server.cert_dir / "ca.crt", new)
        ) as name,
    ):
        assert earlier.policy.version != POLICY.version == current.policy.version
        yield Webhooks(kube, old, new, name, earlier.policy.version)


def stale_namespace(
    hooks: Webhooks,
    deployments: Sequence[str] = (),
    bare: Sequence[str] = (),
    *,
    cronjob: bool = False,
) -> str:
    """A namespace whose Deployments (one replica each, app=NAME), bare pods (run=NAME) and
    CronJob `report` were injected under the earlier policy, then moved to the one in force."""
    kube = hooks.kube
    namespace = selected_namespace(kube, hooks.old, "ro")
    for name in deployments:
        body = {
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": _template(name, LOG),
            },
        }
        kube.call("POST", f"/apis/apps/v1/namespaces/{namespace}/deployments", body)
    for name in bare:
        body = {
            "metadata": {"name": name, "labels": {"run": name}, "annotations": LOG},
            "spec": {"containers": [{"name": "app", "image": "registry.local/app:1.0"}]},
        }
        kube.call("POST", f"/api/v1/namespaces/{namespace}/pods", body)
    if cronjob:
        _job_of_a_cronjob(kube, namespace)
    apps = [f"app={name}" for name in deployments] + (["app=report"] if cronjob else [])
    for selector in apps:
        (made,) = kube.wait_for_pods(namespace, selector)
        assert hooks.earlier in made["metadata"]["annotations"]["outrigger.dev/status"]
    kube.call(
        "PATCH",
        f"/api/v1/namespaces/{namespace}",
        {"metadata": {"labels": {LABEL: hooks.new}}},
        content_type="application/merge-patch+json",
    )
    return namespace


def budget(kube: ControlPlane, namespace: str, name: str, labels: dict[str, str]) -> None:
    """A PodDisruptionBudget of maxUnavailable 0 over the pods with `labels`."""
    body = {"metadata": {"name": name},
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": labels}}}  # fmt: skip
    kube.call("POST", f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets", body)


def set_ready(kube: ControlPlane, namespace: str, item: dict[str, Any]) -> bool:
    """The status a kubelet would report for the pod once its containers run and pass their
    probes, written to `pods/status`; False when the pod is gone meanwhile."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def running(container: dict[str, Any]) -> dict[str, Any]:
        return {"name": container["name"], "image": container["image"], "imageID": "",
                "ready": True, "started": True, "restartCount": 0,
                "state": {"running": {"startedAt": now}}}  # fmt: skip

    spec = item["spec"]
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": kind, "status": "True", "lastTransitionTime": now}
            for kind in ("Initialized", "ContainersReady", "Ready")
        ],
        "containerStatuses": [running(c) for c in spec["containers"]],
    }
    if spec.get("initContainers"):  # the injected sidecars, native: running too
        status["initContainerStatuses"] = [running(c) for c in spec["initContainers"]]
    path = f"/api/v1/namespaces/{namespace}/pods/{item['metadata']['name']}/status"
    code, answer = kube.request(
        "PATCH", path, {"status": status}, content_type="application/strategic-merge-patch+json"
    )
    assert code in (200, 404, 409), answer
    return code == 200


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return {"type": "Ready", "status": "True"} in [
        {"type": c["type"], "status": c["status"]} for c in conditions
    ]


@contextmanager
def kubelet_double(kube: ControlPlane, namespace: str, selector: str) -> Iterator[set[str]]:
    """In the background, every pod `selector` matches is made Ready (`set_ready`) as it
    appears; yields the names of the pods it made Ready."""
    made: set[str] = set()
    stop = threading.Event()
    query = urllib.parse.quote(selector)

    def loop() -> None:
        while not stop.is_set():
            pods = kube.call("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={query}")
            for item in pods["items"]:
                if not is_ready(item) and set_ready(kube, namespace, item):
                    made.add(item["metadata"]["name"])
            stop.wait(0.2)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield made
    finally:
        stop.set()
        thread.join(timeout=30)


def rollout(tmp_path: Path, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_against_cluster("rollout", tmp_path, kubeconfig, *args, timeout=300)


def events(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def annotations_of_template(kube: ControlPlane, namespace: str, name: str) -> dict[str, str]:
    path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"
    return dict(kube.call("GET", path)["spec"]["template"]["metadata"].get("annotations") or {})


def pods_by_name(kube: ControlPlane, namespace: str) -> dict[str, str]:
    items = kube.call("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in items}


@pytest.fixture
def shop(webhooks: Webhooks) -> str:
    """Three stale Deployments (b under a PodDisruptionBudget of maxUnavailable 0), the stale
    pod of a CronJob's Job, and a stale bare pod."""
    namespace = stale_namespace(webhooks, ["a", "b", "c"], ["debug"], cronjob=True)
    budget(webhooks.kube, namespace, "b", {"app": "b"})
    return namespace


@pytest.mark.kube
def test_the_plan_lists_every_workload_and_changes_nothing(
    webhooks: Webhooks, shop: str, tmp_path: Path
) -> None:
    kube = webhooks.kube
    where = ("--webhook", webhooks.configuration, "-n", shop)
    result = rollout(tmp_path, kube.kubeconfig, *where, "-o", "json")
    assert result.returncode == 0, result.stderr
    plan = events(result)
    assert {e["event"] for e in plan} == {"plan"} and {e["policy"] for e in plan} == {
        POLICY.version
    }
    assert [(e["kind"], e["name"], e["wave"], e["action"]) for e in plan] == [
        ("Deployment", "a", 1, RESTART),
        ("Deployment", "b", 2, RESTART),
        ("Deployment", "c", 3, RESTART),
        ("CronJob", "report", None, LEAVE),
        ("Pod", "debug", None, LEAVE),
    ]
    assert all(e["findings"] == {STALE: 1} and len(e["pods"]) == 1 for e in plan)
    assert [e["replicas"] for e in plan[:3]] == [1, 1, 1]
    left = {e["name"]: e["what"] for e in plan[3:]}
    assert "never restarted" in left["report"] and "will not come back" in left["debug"]
    for name in ("a", "b", "c"):
        assert RESTARTED_AT not in annotations_of_template(kube, shop, name)

    wider = events(
        rollout(tmp_path, kube.kubeconfig, *where, "--max-workloads", "2", "--include-pods",
                "-o", "json")
    )  # fmt: skip
    assert [(e["name"], e["wave"], e["action"]) for e in wider] == [
        ("a", 1, RESTART), ("b", 1, RESTART), ("c", 2, RESTART), ("debug", 2, EVICT),
        ("report", None, LEAVE),
    ]  # fmt: skip

    table = rollout(tmp_path, kube.kubeconfig, *where, "-l", "app in (a,report)")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f"policy {POLICY.version}: 1 workload(s) in 1 wave(s), 1 left alone"
    assert f"wave 1  {shop}  Deployment/a  1 of 1 pod(s): 1 stale" in lines
    assert f"left    {shop}  CronJob/report  1 pod(s): 1 stale" in lines
    assert lines[-1] == "plan only, nothing changed: --apply runs it"


@pytest.mark.kube
def test_apply_restarts_one_wave_at_a_time_and_stops_at_a_deployment_never_ready(
    webhooks: Webhooks, shop: str, tmp_path: Path
) -> None:
    """a and b get Ready pods from the kubelet double, c never: waves a, then b, then c, which
    times out. b's PodDisruptionBudget does not hold its rolling restart back (a budget limits
    evictions; the Deployment's own maxUnavailable 0 and maxSurge 1 pace it)."""
    kube = webhooks.kube
    before = pods_by_name(kube, shop)
    with kubelet_double(kube, shop, "app in (a,b)") as made_ready:
        result = rollout(
            tmp_path, kube.kubeconfig, "--webhook", webhooks.configuration, "-n", shop,
            "--apply", "--timeout", "20s", "-o", "json",
        )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    done = [e for e in events(result) if e["event"] != "plan"]
    assert [(e["event"], e.get("name", e.get("wave"))) for e in done] == [
        ("wave", 1), ("restarted", "a"), ("wave-done", 1),
        ("wave", 2), ("restarted", "b"), ("wave-done", 2),
        ("wave", 3), ("restarted", "c"), ("failed", "c"),
    ]  # fmt: skip
    for wave, app in ((1, "a"), (2, "b")):
        (finished,) = [e for e in done if e["event"] == "wave-done" and e["wave"] == wave]
        assert len(finished["pods"]) == 1 and finished["pods"][0].startswith(f"{app}-")
        assert set(finished["pods"]) <= made_ready - set(before)  # new pods, made Ready
    failure = done[-1]
    assert failure["reason"] == "timeout"
    assert failure["waiting_for"] == "1 old replica(s) to terminate, as new pods become available"
    assert f"wave 3/3: {shop} Deployment/c: timed out after 20s (--timeout) waiting for: " in (
        result.stderr
    )
    assert RESTARTED_AT in annotations_of_template(kube, shop, "c")

    after = pods_by_name(kube, shop)
    untouched = {name: uid for name, uid in before.items() if not name.startswith(("a-", "b-"))}
    assert untouched.items() <= after.items()  # the CronJob's pod, the bare pod, c's old pod
    audit = subprocess.run(
        [outrigger_executable(), "audit", "--kubeconfig", str(kube.kubeconfig), "-o", "json",
         "--webhook", webhooks.configuration, "-n", shop],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    still = {(w["kind"], w["name"]) for w in json.loads(audit.stdout)["workloads"]}
    assert still == {("Deployment", "c"), ("CronJob", "report"), ("Pod", "debug")}


def read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError as error:  # EIO: the terminal's other side is closed
            if error.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.kube
def test_bare_pods_are_evicted_when_asked_and_a_budget_refusal_is_retried_until_the_timeout(
    webhooks: Webhooks, tmp_path: Path
) -> None:
    """`guarded` runs (a Pending pod is evicted whatever its budget says) under a budget of
    maxUnavailable 0: its eviction is refused, retried, and the wave times out. The run is
    on a terminal (a pseudo-terminal), where the waiting shows as a progress line."""
    kube = webhooks.kube
    namespace = stale_namespace(webhooks, bare=["loose", "guarded"])
    budget(kube, namespace, "guarded", {"run": "guarded"})
    guarded = kube.call("GET", f"/api/v1/namespaces/{namespace}/pods/guarded")
    assert set_ready(kube, namespace, guarded)
    where = ("--webhook", webhooks.configuration, "-n", namespace, "--apply", "--include-pods")

    terminal, other_side = pty.openpty()
    with subprocess.Popen(
        [outrigger_executable(), "rollout", "--kubeconfig", str(kube.kubeconfig), *where,
         "-l", "run=guarded", "--timeout", "3s"],
        stdout=other_side, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"},
    ) as process:  # fmt: skip
        os.close(other_side)
        shown = read_all(terminal).decode()
        _, stderr = process.communicate(timeout=120)
    os.close(terminal)
    assert process.returncode == 1, shown + stderr.decode()
    assert f"refused    {namespace}  Pod/guarded: 429 Too Many Requests" in shown
    assert "disruption budget" in shown.lower()
    assert "\r\x1b[K" in shown and "waiting for Pod/guarded: the eviction, refused" in shown
    assert "timed out after 3s (--timeout) waiting for: the eviction, refused" in stderr.decode()
    assert "guarded" in pods_by_name(kube, namespace)

    result = rollout(tmp_path, kube.kubeconfig, *where, "-l", "run=loose", "-o", "json")
    assert result.returncode == 0, result.stderr
    done = [(e["event"], e.get("name")) for e in events(result) if e["event"] != "plan"]
    assert done == [("wave", None), ("evicted", "loose"), ("wave-done", None), ("complete", None)]
    assert "loose" not in pods_by_name(kube, namespace)


# The least rights of `outrigger rollout` (docs/platform/upgrades.md has them): audit's reading, the
# workloads read and patched, bare pods evicted.
ROLLOUT_RULES = [
    {"apiGroups": [""], "resources": ["namespaces", "pods"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
    {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list"]},
    {
        "apiGroups": ["apps"],
        "resources": ["deployments", "statefulsets", "daemonsets"],
        "verbs": ["get", "patch"],
    },
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list"]},
    {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["mutatingwebhookconfigurations"],
        "verbs": ["get"],
    },
]


def account_kubeconfig(
    kube: ControlPlane, folder: Path, namespace: str, account: str, rules: list[dict[str, Any]]
) -> Path:
    """A kubeconfig of a new ServiceAccount that a ClusterRole of `rules` is bound to."""
    name, rbac = f"{account}-{namespace}", "/apis/rbac.authorization.k8s.io/v1"
    kube.call("POST", f"{rbac}/clusterroles", {"metadata": {"name": name}, "rules": rules})
    binding = {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    }
    kube.call("POST", f"{rbac}/clusterrolebindings", binding)
    return kube.token_kubeconfig(folder, namespace, account)


@pytest.mark.kube
def test_the_least_rights_suffice_and_a_refused_restart_names_the_workload(
    webhooks: Webhooks, tmp_path: Path
) -> None:
    """With ROLLOUT_RULES and nothing else: the policy from a ConfigMap, a Deployment
    restarted, a CronJob's pod left, a bare pod evicted. Without `patch`: the wave fails on
    the API server's 403, saying which workload."""
    kube = webhooks.kube
    namespace = stale_namespace(webhooks, ["web", "api"], ["debug"], cronjob=True)
    policy_configmap(kube, namespace)
    where = (
        "--webhook", webhooks.configuration, "-n", namespace, "--apply", "--include-pods",
        "--from-cluster", f"{namespace}/outrigger-policy", "-o", "json",
    )  # fmt: skip
    operator = account_kubeconfig(kube, tmp_path, namespace, "rollout", ROLLOUT_RULES)
    with kubelet_double(kube, namespace, "app=web"):
        result = rollout(tmp_path, operator, *where, "-l", "app in (web,report)")
        evicted = rollout(tmp_path, operator, *where, "-l", "run=debug")
    assert result.returncode == 0, result.stderr
    assert [(e["event"], e.get("name")) for e in events(result)] == [
        ("plan", "web"), ("plan", "report"), ("wave", None), ("restarted", "web"),
        ("wave-done", None), ("complete", None),
    ]  # fmt: skip
    assert evicted.returncode == 0, evicted.stderr
    assert ("evicted", "debug") in [(e["event"], e.get("name")) for e in events(evicted)]

    no_patch = [
        {**rule, "verbs": ["get"]} if "deployments" in rule["resources"] else rule
        for rule in ROLLOUT_RULES
    ]
    reader = account_kubeconfig(kube, tmp_path, namespace, "reader", no_patch)
    refused = rollout(tmp_path, reader, *where, "-l", "app=api")
    assert refused.returncode == 1, refused.stderr
    failure = events(refused)[-1]
    assert (failure["event"], failure["name"], failure["reason"]) == ("failed", "api", "refused")
    assert f"wave 1/1: {namespace} Deployment/api: the API server refused: 403 Forbidden" in (
        refused.stderr
    )
    assert 'cannot patch resource "deployments"' in refused.stderr


def test_an_unreachable_cluster_is_a_clear_error(tmp_path: Path) -> None:
    paths = write_certificates(tmp_path / "c", ["localhost"], ["127.0.0.1"])
    kubeconfig = write_kubeconfig(tmp_path, "https://127.0.0.1:1", paths.ca_cert)
    result = rollout(tmp_path, kubeconfig, "--apply")
    assert result.returncode == 2
    assert result.stderr.startswith("outrigger: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        pytest.param(["--max-workloads", "0"], "--max-workloads must be at least 1", id="waves"),
        pytest.param(["--timeout", "soon"], "invalid duration 'soon'", id="timeout"),
        pytest.param(["--from-cluster", "policy"], "takes NAMESPACE/NAME", id="policy"),
    ],
)
def test_bad_flags_exit_2_before_contacting_anything(
    tmp_path: Path, args: list[str], said: str
) -> None:
    result = rollout(tmp_path, tmp_path / "absent-kubeconfig", *args)
    assert result.returncode == 2 and said in result.stderr
