"""Kubernetes Events for denials, warnings and policy mismatches (`webhook.cluster.events`).

The aggregation is tested on its own with a clock the test moves; the whole path through the
real API server with the controller manager: a Deployment whose pods are denied gets one
Event on its ReplicaSet however often the ReplicaSet controller retries, warnings become an
Event too, and a dry-run request records nothing.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube_env import ControlPlane, poll
from tests.kube_webhook import LABEL, configuration, new_selector, registered
from tests.test_https import Server, outrigger_executable, start_server, stop_server
from webhook.admission.review import AdmissionRequest, OwnerReference, Verdict
from webhook.cluster.events import (
    DENIED,
    KEYS,
    POLICY_MISMATCH,
    SEND_BURST,
    SEND_RATE,
    WARNED,
    EventAggregator,
    TokenBucket,
    event_name,
    event_reasons,
)

OWNER = OwnerReference("apps/v1", "ReplicaSet", "web-7d4b9c", "uid-rs-1")
REQUEST = AdmissionRequest("u1", "shop", None, "web-7d4b9c-", "ReplicaSet/web-7d4b9c", OWNER)
DENIAL = Verdict("denied", "invalid-annotation", message="outrigger.dev/inject: no such sidecar")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_denial_is_one_event_a_minute_and_the_repeats_are_counted_into_the_next() -> None:
    clock = Clock()
    aggregator = EventAggregator(clock)
    notes, held = aggregator.note(REQUEST, DENIAL, "v1", "")
    assert held == 0 and [(n.reason, n.count) for n in notes] == [(DENIED, 1)]
    assert "no such sidecar" in notes[0].message and notes[0].owner == OWNER
    for _ in range(5):
        clock.now += 10
        assert aggregator.note(REQUEST, DENIAL, "v1", "") == ([], 1)
    clock.now += 11  # 61 s after the first
    notes, held = aggregator.note(REQUEST, DENIAL, "v1", "")
    assert held == 0 and [n.count for n in notes] == [7]  # 1 sent + 5 held + this one


def test_reasons_and_owners_are_limited_apart() -> None:
    aggregator = EventAggregator(Clock())
    other = AdmissionRequest(
        "u2", "shop", None, "api-", "", OwnerReference("apps/v1", "ReplicaSet", "api", "uid-rs-2")
    )
    warned = Verdict("injected", "injected", ("log-watcher",), warnings=("runs as 65534",))
    assert [n.reason for n in aggregator.note(REQUEST, DENIAL, "v1", "")[0]] == [DENIED]
    assert [n.reason for n in aggregator.note(REQUEST, warned, "v1", "")[0]] == [WARNED]
    assert [n.reason for n in aggregator.note(other, DENIAL, "v1", "")[0]] == [DENIED]


def test_dry_runs_bare_pods_and_plain_answers_record_nothing() -> None:
    aggregator = EventAggregator(Clock())
    dry = AdmissionRequest("u", "shop", None, "web-", "", OWNER, dry_run=True)
    bare = AdmissionRequest("u", "shop", None, "debug", "")
    injected = Verdict("injected", "injected", ("log-watcher",))
    assert aggregator.note(dry, DENIAL, "v1", "") == ([], 0)
    assert aggregator.note(bare, DENIAL, "v1", "") == ([], 0)
    assert aggregator.note(None, Verdict("bad_request", "malformed"), "v1", "") == ([], 0)
    assert aggregator.note(REQUEST, injected, "v1", "v1") == ([], 0)


def test_an_injection_under_another_policy_than_the_published_one() -> None:
    injected = Verdict("injected", "injected", ("log-watcher",))
    assert event_reasons(injected, "abc", "def") == (POLICY_MISMATCH,)
    assert event_reasons(injected, "abc", "") == ()  # not published: nothing to compare
    notes, _ = EventAggregator(Clock()).note(REQUEST, injected, "abc", "def")
    assert "policy abc" in notes[0].message and "policy def" in notes[0].message


def test_the_memory_of_recent_owners_is_bounded() -> None:
    aggregator = EventAggregator(Clock())
    for index in range(KEYS + 10):
        owner = OwnerReference("apps/v1", "ReplicaSet", f"rs-{index}", f"uid-{index}")
        request = AdmissionRequest("u", "shop", None, "p", "", owner)
        assert len(aggregator.note(request, DENIAL, "v1", "")[0]) == 1
    assert len(aggregator._recent) == KEYS


def test_sends_are_limited_to_a_rate_after_a_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(SEND_RATE, SEND_BURST, clock)
    assert [bucket.wait() for _ in range(SEND_BURST)] == [0.0] * SEND_BURST
    assert bucket.wait() == 1 / SEND_RATE  # the next token, in 1/rate seconds
    assert bucket.wait() == 2 / SEND_RATE
    clock.now += 60  # refilled to the burst, no more
    assert [bucket.wait() for _ in range(SEND_BURST)] == [0.0] * SEND_BURST
    assert bucket.wait() > 0


def test_event_names_are_stable_per_owner_and_reason_and_valid() -> None:
    long_owner = OwnerReference("apps/v1", "ReplicaSet", "x" * 253, "uid-9")
    name = event_name(long_owner, DENIED)
    assert name == event_name(long_owner, DENIED) != event_name(long_owner, WARNED)
    assert len(name) <= 253


# Through the real API server ------------------------------------------------------------------

# What the server calls with --events (tests/test_chart.py checks the chart grants exactly it):
# the fixture below runs it with a ServiceAccount holding these rights and nothing else.
RBAC = {("create", "/api/v1/events"), ("patch", "/api/v1/events")}
DENIED_ANNOTATIONS = {"outrigger.dev/inject": "no-such-sidecar"}
WARNED_ANNOTATIONS = {"outrigger.dev/inject": "log-watcher"}  # the app sets no runAsUser


@pytest.fixture(scope="module")
def events_webhook(
    kube_controllers: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ControlPlane, Server, str]]:
    """`outrigger serve --events` with the API server's admin credentials, registered for the
    namespaces labelled with a fresh selector, calling the API as a ServiceAccount that may
    only create and patch Events (RBAC); yields one such namespace."""
    kube = kube_controllers
    root = tmp_path_factory.mktemp("events-webhook")
    account = f"events-{new_selector()}"
    rule = {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]}
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    kube.call("POST", f"{rbac}/clusterroles", {"metadata": {"name": account}, "rules": [rule]})
    subject = {"kind": "ServiceAccount", "name": account, "namespace": "default"}
    binding = {
        "metadata": {"name": account},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": account,
        },
        "subjects": [subject],
    }
    kube.call("POST", f"{rbac}/clusterrolebindings", binding)
    credentials = kube.token_kubeconfig(root, "default", account)
    server, process = start_server(root, "--events", "--kubeconfig", str(credentials))
    selected = new_selector()
    body = configuration(server.ip_url + "/mutate", server.cert_dir / "ca.crt", selected)
    try:
        with registered(kube, body):
            yield kube, server, kube.namespace("events", {LABEL: selected})
    finally:
        stop_server(server, process)


def _deployment(kube: ControlPlane, namespace: str, name: str, annotations: dict[str, str]) -> None:
    template = {
        "metadata": {"labels": {"app": name}, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.local/app:1.0"}]},
    }
    spec = {"replicas": 2, "selector": {"matchLabels": {"app": name}}, "template": template}
    kube.call(
        "POST",
        f"/apis/apps/v1/namespaces/{namespace}/deployments",
        {"metadata": {"name": name}, "spec": spec},
    )


def _replica_set(kube: ControlPlane, namespace: str, app: str) -> dict[str, Any]:
    path = f"/apis/apps/v1/namespaces/{namespace}/replicasets?labelSelector=app={app}"
    (first, *_) = poll(lambda: kube.call("GET", path)["items"], 60, f"a ReplicaSet for {app}")
    return dict(first)


def _events_of(kube: ControlPlane, namespace: str, uid: str) -> list[dict[str, Any]]:
    path = f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.uid={uid}"
    return [
        e
        for e in kube.call("GET", path)["items"]
        if e.get("source", {}).get("component") == "outrigger"
    ]


def _wait_for_events(kube: ControlPlane, namespace: str, uid: str) -> list[dict[str, Any]]:
    return poll(lambda: _events_of(kube, namespace, uid), 30, f"an Outrigger Event on {uid}")


def _metric(server: Server, name: str, labels: str) -> float:
    context = ssl.create_default_context(cafile=str(server.cert_dir / "ca.crt"))
    with urllib.request.urlopen(server.url + "/metrics", context=context, timeout=10) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name}{{{labels}}} in /metrics")


def test_a_denied_deployment_gets_one_event_on_its_replica_set(
    events_webhook: tuple[ControlPlane, Server, str],
) -> None:
    kube, server, namespace = events_webhook
    _deployment(kube, namespace, "denied", DENIED_ANNOTATIONS)
    replica_set = _replica_set(kube, namespace, "denied")
    uid = replica_set["metadata"]["uid"]
    (event,) = _wait_for_events(kube, namespace, uid)
    assert event["reason"] == DENIED and event["type"] == "Warning"
    assert event["involvedObject"]["kind"] == "ReplicaSet"
    assert event["involvedObject"]["name"] == replica_set["metadata"]["name"]
    assert "no-such-sidecar" in event["message"]
    # The ReplicaSet controller keeps retrying (two replicas, with backoff): the repeats are
    # counted, not sent, within the minute.
    deadline = time.monotonic() + 30
    while _metric(server, "outrigger_events_total", 'result="aggregated"') < 2:
        assert time.monotonic() < deadline, "the controller's retries were not aggregated"
        time.sleep(0.5)
    assert len(_events_of(kube, namespace, uid)) == 1
    assert _events_of(kube, namespace, uid)[0]["count"] == 1


def test_warnings_become_an_event_on_the_owner(
    events_webhook: tuple[ControlPlane, Server, str],
) -> None:
    kube, _, namespace = events_webhook
    _deployment(kube, namespace, "warned", WARNED_ANNOTATIONS)
    replica_set = _replica_set(kube, namespace, "warned")
    (event,) = _wait_for_events(kube, namespace, replica_set["metadata"]["uid"])
    assert event["reason"] == WARNED
    assert "log-watcher" in event["message"]


def test_a_dry_run_records_no_event(events_webhook: tuple[ControlPlane, Server, str]) -> None:
    kube, _, namespace = events_webhook
    owner = kube.call(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"metadata": {"name": "dry-owner"}},
    )
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "dry-owner",
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }
    pod = {
        "metadata": {
            "name": "dry",
            "annotations": DENIED_ANNOTATIONS,
            "ownerReferences": [reference],
        },
        "spec": {"containers": [{"name": "app", "image": "registry.local/app:1.0"}]},
    }
    status, answer = kube.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", pod)
    assert status == 400 and "no-such-sidecar" in json.dumps(answer)  # denied, dry run or not
    time.sleep(3)  # an Event is sent well within this (the real one's below is waited for)
    assert _events_of(kube, namespace, owner["metadata"]["uid"]) == []
    status, _ = kube.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
    assert status == 400
    (event,) = _wait_for_events(kube, namespace, owner["metadata"]["uid"])
    assert event["count"] == 1 and event["involvedObject"]["kind"] == "ConfigMap"


def test_serve_without_an_api_server_and_events_refuses_to_start(tmp_path: Path) -> None:
    """--events needs credentials: without any it is a one-line refusal, not a traceback."""
    kubeconfig = tmp_path / "missing"
    done = subprocess.run(
        [outrigger_executable(), "serve", "--events", "--kubeconfig", str(kubeconfig)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and done.stderr.strip()
