"""`outrigger serve --policy-configmap`: the policy watched through the API.

The watch's decisions are tested pure (`from_list`, `from_event`). End to end, the real
`outrigger serve` runs in subprocesses against the real API server (the `kube` fixture: etcd
and kube-apiserver v1.36.2, see tests/kube_env.py), as the chart's ServiceAccount: its Role,
rendered from the chart by the real helm (tls.mode=helm, so the Role holds the policy watch's
rule and nothing else), its token from the TokenRequest API. Which policy a replica serves is
read the way an operator reads it: `outrigger_policy_info{version}` on its `/metrics`.

What the real server was found to do, which shaped these tests (v1.36.2, etcd 3.4):
- a watch is served from the API server's watch cache, which ignores etcd compaction: a watch
  from a compacted revision is answered from the cache's own window of events, no 410; the
  window keeps every event younger than 75 s, so it cannot be made to drop one on cue;
- an API server that starts anew begins its cache at the current revision: a watch from an
  older resourceVersion gets the ERROR event with 410 Expired ("too old resource version").
  A second kube-apiserver on the same etcd (an HA control plane's other member), killed and
  started again, is how `test_a_410_gone_forces_a_relist_that_finds_the_change` gets one;
- it ends a watch after the timeoutSeconds asked for, with a BOOKMARK 2 s before if its
  resourceVersion moved on while the watch was open (none for a watch of 2 s or less, none
  when nothing was written meanwhile). Outrigger asks for 300 s (`WATCH_SECONDS`, no option),
  so the renewal test drives a `PolicyWatch` in this process with a short `watch_seconds`,
  against the same real server;
- on SIGTERM it waits for open watches to end (their timeout) before exiting, so the test
  that needs it gone kills it.

Two tests stay on `tests/fake_kube.py` (a local HTTPS stand-in that streams watch events and
expires resourceVersions on request); their docstrings say what the real server cannot be
made to do on cue.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import outrigger_executable
from tests.fake_kube import FakeKube, fake_kube, write_kubeconfig
from tests.kube_env import ControlPlane
from tests.test_chart import CHART
from tests.test_https import Server, _stop, start_server
from tests.test_reload import BAD_FIELD, DEFAULT_TEXT, INVALID_SCHEMA, variant
from webhook.cluster.policywatch import PolicyWatch, Step, from_event, from_list
from webhook.cluster.registration import client_configuration
from webhook.core.policy import load_policy_text
from webhook.serving.metrics import Metrics

NAMESPACE = "outrigger-system"
CONFIGMAPS = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
POLICY = f"{CONFIGMAPS}/outrigger-policy"
# What the chart's Role grants for the watch, and nothing more (tests/test_chart.py checks it).
RBAC = {("list", POLICY), ("watch", POLICY)}
NAME = "outrigger-policy"  # the chart's <fullname>-policy for the release `outrigger`
ACCOUNT = "outrigger"  # the chart's ServiceAccount
WAIT_SECONDS = 15.0  # a bound on waits for what takes milliseconds (a change) or seconds
RELIST_SECONDS = 60.0  # an API server start, plus the backoff of a replica that lost it


def version_of(text: str) -> str:
    return load_policy_text(text, "test").version


def configmap(text: str, key: str = "policy.yaml", namespace: str = NAMESPACE) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "outrigger-policy", "namespace": namespace},
        "data": {key: text},
    }


# The watch's decisions ---------------------------------------------------------------------


def test_a_list_gives_the_content_and_the_version_to_watch_from() -> None:
    answer = {"metadata": {"resourceVersion": "120"}, "items": [configmap("a: 1")]}
    assert from_list(answer, "outrigger-policy", "policy.yaml") == Step("120", b"a: 1")
    empty = from_list({"metadata": {"resourceVersion": "7"}, "items": []}, "x", "policy.yaml")
    assert empty == Step("7", note="ConfigMap x does not exist")


def test_events() -> None:
    stored = configmap("b: 2")
    stored["metadata"]["resourceVersion"] = "130"
    key = "policy.yaml"
    assert from_event({"type": "MODIFIED", "object": stored}, "120", key) == Step("130", b"b: 2")
    assert from_event({"type": "ADDED", "object": stored}, "120", key).content == b"b: 2"
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "999"}}}
    assert from_event(bookmark, "120", key) == Step("999")
    deleted = from_event({"type": "DELETED", "object": stored}, "120", key)
    assert deleted.resource_version == "130" and deleted.content is None
    assert "deleted; the policy in force stays" in deleted.note
    gone = {"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}
    expired = from_event(gone, "120", key)
    assert expired.resource_version is None and "expired" in expired.note
    other = from_event({"type": "ERROR", "object": {"code": 500, "message": "x"}}, "120", key)
    assert other.resource_version is None and "500" in other.note


def test_a_configmap_without_the_key_is_a_problem_naming_its_keys() -> None:
    event = {"type": "MODIFIED", "object": configmap("c", key="other")}
    step = from_event(event, "1", "policy.yaml")
    assert step.content is None
    assert step.problem == "the ConfigMap has no key 'policy.yaml' (its keys: other)"


@pytest.mark.parametrize(
    "obj",
    [{"metadata": {"name": "outrigger-policy"}, "data": "policy.yaml"},
     {"metadata": {"name": "outrigger-policy"}, "data": ["policy.yaml"]},
     {"metadata": {"name": "outrigger-policy"}}],
    ids=["data-a-string", "data-a-list", "no-data"],
)  # fmt: skip
def test_malformed_objects_are_problems_not_crashes(obj: dict[str, Any]) -> None:
    step = from_event({"type": "MODIFIED", "object": obj}, "1", "policy.yaml")
    assert step.content is None and "has no key 'policy.yaml'" in step.problem
    listed = from_list({"items": [obj, "junk", 3]}, "outrigger-policy", "policy.yaml")
    assert listed.content is None and listed.problem


# The cluster, as the chart sets it up ---------------------------------------------------------


def chart_rbac(helm: Path, namespace: str) -> str:
    """The chart's ServiceAccount, Role and RoleBinding in `namespace`, rendered by the real
    helm with tls.mode=helm: the Role then holds the policy watch's rule alone (checked)."""
    result = subprocess.run(
        [str(helm), "template", "outrigger", str(CHART), "--namespace", namespace,
         "--set", "tls.mode=helm", "--show-only", "templates/rbac.yaml",
         "--show-only", "templates/serviceaccount.yaml"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (role,) = [doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": [NAME], "verbs": ["list", "watch"]}]  # fmt: skip
    return result.stdout


@dataclass(frozen=True)
class Cluster:
    """A namespace of the real API server with the policy ConfigMap's place, and a kubeconfig
    with a token of the namespace's `outrigger` ServiceAccount."""

    kube: ControlPlane
    namespace: str
    kubeconfig: Path

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/configmaps/{NAME}"

    def put(self, text: str) -> None:
        """Replace the policy ConfigMap, or create it: another client's write."""
        body = configmap(text, namespace=self.namespace)
        status, answer = self.kube.request("PUT", self.path, body)
        if status == 404:
            self.kube.call("POST", self.path.rsplit("/", 1)[0], body)
        else:
            assert status == 200, answer

    def delete(self) -> None:
        self.kube.call("DELETE", self.path)

    def write_elsewhere(self) -> int:
        """Another ConfigMap of the namespace, created: the resourceVersion it moved on to."""
        other = {"metadata": {"name": f"unrelated-{uuid.uuid4().hex[:6]}"}, "data": {"a": "1"}}
        created = self.kube.call("POST", self.path.rsplit("/", 1)[0], other)
        return int(created["metadata"]["resourceVersion"])

    def pointed_at(self, url: str, written: Path) -> Path:
        """This kubeconfig for another API server of the same cluster."""
        document = json.loads(self.kubeconfig.read_text())
        document["clusters"][0]["cluster"]["server"] = url
        written.write_text(json.dumps(document))
        return written


def wait_for_rbac(kube: ControlPlane, namespace: str, verb: str) -> None:
    """Until the API server's RBAC cache grants the ServiceAccount `verb` on the policy."""
    subject = f"system:serviceaccount:{namespace}:{ACCOUNT}"
    wait_until(
        lambda: kube.kubectl("auth", "can-i", verb, f"configmaps/{NAME}", "-n", namespace,
                             "--as", subject, check=False).strip() == "yes",
        f"RBAC to grant {subject} {verb}",
    )  # fmt: skip


@pytest.fixture
def cluster(kube: ControlPlane, helm: Path, tmp_path: Path) -> Cluster:
    """A new namespace with the chart's RBAC for the watch and the default policy."""
    namespace = kube.namespace("policy")
    kube.kubectl("apply", "-f", "-", input=chart_rbac(helm, namespace))
    wait_for_rbac(kube, namespace, "watch")
    found = Cluster(kube, namespace, kube.token_kubeconfig(tmp_path, namespace, ACCOUNT))
    found.put(DEFAULT_TEXT)
    return found


# Replicas and what they serve -----------------------------------------------------------------


def serve_watching(root: Path, kubeconfig: Path, namespace: str, name: str) -> tuple[Server, Any]:
    """`outrigger serve --policy-configmap NAMESPACE/outrigger-policy`, healthy."""
    directory = root / name
    directory.mkdir()
    return start_server(
        directory,
        "--policy-configmap", f"{namespace}/{NAME}",
        "--kubeconfig", str(kubeconfig),
    )  # fmt: skip


@pytest.fixture
def replicas() -> Iterator[list[tuple[Server, Any]]]:
    started: list[tuple[Server, Any]] = []
    yield started
    for server, process in started:
        assert _stop(process) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.log.read_text(errors="replace")


def metrics(server: Server) -> str:
    with httpx.Client(verify=server.trusting_ca(), timeout=5) as client:
        return client.get(f"{server.url}/metrics").text


def served_version(server: Server) -> str:
    match = re.search(r'outrigger_policy_info\{version="([0-9a-f]+)"\}', metrics(server))
    assert match, metrics(server)
    return match.group(1)


def count(exposition: str, name: str, label: str) -> float:
    match = re.search(rf"^{name}_total\{{{label}\}} (\S+)$", exposition, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def counter(server: Server, name: str, label: str) -> float:
    return count(metrics(server), name, label)


def restarts(exposition: str, reason: str) -> float:
    return count(exposition, "outrigger_policy_watch_restarts", f'reason="{reason}"')


def wait_until(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> float:
    """Seconds until `condition()` holds; fails, saying `what`, after `seconds`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"no {what} within {seconds}s"
        time.sleep(0.02)
    return time.monotonic() - start


def wait_for_version(server: Server, version: str, seconds: float = WAIT_SECONDS) -> float:
    """Seconds until `server` serves `version` (fails after `seconds`, showing its log)."""
    try:
        return wait_until(lambda: served_version(server) == version, version, seconds)
    except AssertionError as failed:
        raise AssertionError(f"{failed}:\n{server.log.read_text()}") from None


# End to end against the real API server -------------------------------------------------------


@pytest.mark.kube
def test_a_change_applies_on_every_replica_at_once(
    tmp_path: Path, cluster: Cluster, replicas: list[tuple[Server, Any]]
) -> None:
    """Two replicas, as the chart's ServiceAccount (its Role's list and watch are enough):
    three changes, each served by both (the delays are printed; the bound is only a wait),
    all carried by the one watch each opened at its start: no renewal, re-list or error."""
    for name in ("a", "b"):
        replicas.append(serve_watching(tmp_path, cluster.kubeconfig, cluster.namespace, name))
    for server, _ in replicas:
        assert served_version(server) == version_of(DEFAULT_TEXT)
    delays: list[float] = []
    for number in (1, 2, 3):
        written = time.monotonic()
        cluster.put(variant(number))
        for server, _ in replicas:
            wait_for_version(server, version_of(variant(number)))
            delays.append(time.monotonic() - written)
    print(f"\npolicy change served by a replica after {min(delays) * 1000:.0f} to "
          f"{max(delays) * 1000:.0f} ms (metrics polled every 20 ms)")  # fmt: skip
    for server, _ in replicas:
        exposition = metrics(server)
        assert count(exposition, "outrigger_policy_reloads", 'result="success"') == 3
        assert [restarts(exposition, r) for r in ("renewed", "relisted", "error")] == [0, 0, 0]


@pytest.mark.kube
def test_a_bad_version_is_rejected_counted_and_the_old_one_serves(
    tmp_path: Path, cluster: Cluster, replicas: list[tuple[Server, Any]]
) -> None:
    server, process = serve_watching(tmp_path, cluster.kubeconfig, cluster.namespace, "a")
    replicas.append((server, process))
    cluster.put(INVALID_SCHEMA)
    wait_until(
        lambda: counter(server, "outrigger_policy_reloads", 'result="failure"') >= 1,
        "rejection",
    )
    assert served_version(server) == version_of(DEFAULT_TEXT)
    log = server.log.read_text()
    assert f"rejected a new version of ConfigMap {cluster.namespace}/{NAME}" in log
    assert BAD_FIELD in log
    cluster.put(variant(1))
    wait_for_version(server, version_of(variant(1)))


@pytest.mark.kube
def test_a_watch_the_server_ends_is_renewed_from_its_bookmark(cluster: Cluster) -> None:
    """The real server ends a watch after the timeoutSeconds asked for, with a BOOKMARK 2 s
    before carrying its current resourceVersion (when it moved on while the watch was open):
    the watch is renewed from there, without a re-list, and the renewed watch carries the next
    change. In this process, with `watch_seconds=4`: `outrigger serve` asks for 300 s and has
    no option to ask for less."""
    metrics = Metrics()
    configuration = client_configuration(cluster.kubeconfig, None)
    watch = PolicyWatch(cluster.namespace, NAME, configuration, metrics=metrics, watch_seconds=4)
    slot = watch.start(WAIT_SECONDS)
    listed = int(watch._version or 0)  # where the first watch starts (private: read only here)

    def exposition() -> str:
        return metrics.exposition().decode()

    threading.Thread(target=watch.run, name="test policy watch", daemon=True).start()
    try:
        first, started = cluster.write_elsewhere(), time.monotonic()  # not events of this watch
        while restarts(exposition(), "renewed") < 1:  # until the server ends the stream
            assert time.monotonic() - started < WAIT_SECONDS, "the watch was never ended"
            cluster.write_elsewhere()
            time.sleep(0.5)
        assert int(watch._version or 0) >= first > listed
        cluster.put(variant(1))
        wait_until(lambda: slot.current().version == version_of(variant(1)), "change")
        assert restarts(exposition(), "relisted") == restarts(exposition(), "error") == 0
    finally:
        watch.stop()


@pytest.fixture
def own_apiserver(kube: ControlPlane, tmp_path: Path) -> Iterator[ControlPlane]:
    """A second kube-apiserver on the session's etcd, as an HA control plane has one, for a
    test to kill and start again: the session's own must stay up for the other tests."""
    plane = kube.second_apiserver(tmp_path / "own-apiserver")
    yield plane
    plane.kill_apiserver()


def crash_and_start(plane: ControlPlane, meanwhile: Callable[[], None]) -> None:
    """Kill the API server (SIGKILL: on SIGTERM it would wait out the open watches), do
    `meanwhile`, and start it again on its port, until ready."""
    plane.kill_apiserver()
    meanwhile()
    plane.start_apiserver()


@pytest.mark.kube
def test_a_410_gone_forces_a_relist_that_finds_the_change(
    tmp_path: Path,
    cluster: Cluster,
    own_apiserver: ControlPlane,
    replicas: list[tuple[Server, Any]],
) -> None:
    """The replica's API server crashes; the policy changes through the other one meanwhile.
    Started again, that API server's watch cache begins at the current resourceVersion, after
    the replica's: its renewed watch gets the ERROR event with 410 Expired, and the re-list
    finds the change."""
    kubeconfig = cluster.pointed_at(own_apiserver.url, tmp_path / "own.kubeconfig")
    server, process = serve_watching(tmp_path, kubeconfig, cluster.namespace, "a")
    replicas.append((server, process))
    crash_and_start(own_apiserver, lambda: cluster.put(variant(2)))
    wait_for_version(server, version_of(variant(2)), RELIST_SECONDS)
    exposition = metrics(server)
    assert restarts(exposition, "relisted") == 1
    assert restarts(exposition, "error") >= 1  # the crash, then refused connections
    assert count(exposition, "outrigger_policy_reloads", 'result="success"') == 1
    assert "the watch expired (too old resource version: " in server.log.read_text()


@pytest.mark.kube
def test_a_deleted_configmap_keeps_the_policy_and_a_new_one_applies(
    tmp_path: Path, cluster: Cluster, replicas: list[tuple[Server, Any]]
) -> None:
    server, process = serve_watching(tmp_path, cluster.kubeconfig, cluster.namespace, "a")
    replicas.append((server, process))
    cluster.delete()
    wait_until(lambda: "the ConfigMap was deleted" in server.log.read_text(), "deletion")
    assert served_version(server) == version_of(DEFAULT_TEXT)
    cluster.put(variant(1))  # created again
    wait_for_version(server, version_of(variant(1)))


@pytest.mark.kube
def test_shutdown_does_not_wait_for_the_open_watch(tmp_path: Path, cluster: Cluster) -> None:
    """The open watch would hold a shutdown that waited for it up to 300 s (its timeout)."""
    server, process = serve_watching(tmp_path, cluster.kubeconfig, cluster.namespace, "a")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 10
    assert "Traceback" not in server.log.read_text()


def _serve_fails(tmp_path: Path, kubeconfig: Path, namespace: str) -> tuple[int, str]:
    """`outrigger serve --policy-configmap` expected to fail before serving."""
    command = [outrigger_executable(), "serve", "--cert-dir", str(tmp_path / "certs")]
    command += ["--policy-configmap", f"{namespace}/{NAME}"]
    command += ["--kubeconfig", str(kubeconfig), "--api-startup-seconds", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr.strip()


@pytest.mark.kube
def test_a_missing_configmap_fails_the_start_naming_it(tmp_path: Path, cluster: Cluster) -> None:
    cluster.delete()
    code, line = _serve_fails(tmp_path, cluster.kubeconfig, cluster.namespace)
    assert code == 1
    assert line.splitlines()[-1] == (
        f"outrigger: ConfigMap {cluster.namespace}/{NAME} (policy.yaml): ConfigMap "
        f"{NAME} does not exist (gave up after 1s, --api-startup-seconds)"
    )


@pytest.mark.kube
def test_a_forbidden_list_fails_the_start_with_the_status(
    tmp_path: Path, kube: ControlPlane
) -> None:
    """A Role that lets the ServiceAccount get the ConfigMap, not list or watch it."""
    namespace = kube.namespace("policy")
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    rule = {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [NAME],
            "verbs": ["get"]}  # fmt: skip
    kube.call("POST", f"{rbac}/roles", {"metadata": {"name": "getter"}, "rules": [rule]})
    kube.call("POST", f"{rbac}/rolebindings", {
        "metadata": {"name": "getter"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "getter"},
        "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": namespace}],
    })  # fmt: skip
    kubeconfig = kube.token_kubeconfig(tmp_path, namespace, ACCOUNT)
    Cluster(kube, namespace, kubeconfig).put(DEFAULT_TEXT)
    wait_for_rbac(kube, namespace, "get")  # granted: what is refused below is list alone
    code, line = _serve_fails(tmp_path, kubeconfig, namespace)
    assert code == 1
    assert "cannot list the ConfigMap: 403 Forbidden: " in line
    assert f'User "system:serviceaccount:{namespace}:{ACCOUNT}" cannot list resource' in line


@pytest.mark.kube
def test_a_bad_first_version_fails_the_start_like_a_bad_file(
    tmp_path: Path, cluster: Cluster
) -> None:
    cluster.put(INVALID_SCHEMA)
    code, line = _serve_fails(tmp_path, cluster.kubeconfig, cluster.namespace)
    assert code == 2
    first, *details = line.splitlines()
    assert first.startswith("outrigger: ")
    assert f"ConfigMap {cluster.namespace}/{NAME}" in first
    assert any(BAD_FIELD in detail for detail in details)


# On the stand-in: what the real server cannot be made to do on cue ----------------------------


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeKube]:
    with fake_kube(tmp_path) as api:
        api.put(POLICY, configmap(DEFAULT_TEXT))
        api.allow = set(RBAC)
        yield api


def serve_on_fake(root: Path, fake: FakeKube) -> tuple[Server, Any]:
    (root / "fake-kubeconfig").mkdir()
    kubeconfig = write_kubeconfig(root / "fake-kubeconfig", fake.url, fake.ca_file)
    return serve_watching(root, kubeconfig, NAMESPACE, "a")


def test_bookmarks_keep_a_renewed_watch_from_expiring(
    tmp_path: Path, fake: FakeKube, replicas: list[tuple[Server, Any]]
) -> None:
    """On the stand-in: a real API server's watch cache ignores etcd compaction and keeps
    every event younger than 75 s, so no resourceVersion a bookmark saved can be made to
    expire on cue; and one that starts anew expires every earlier resourceVersion, bookmarked
    or not. (That the real server's bookmark moves the watch on is tested above.)"""
    fake.bookmark_seconds = 0.2
    server, process = serve_on_fake(tmp_path, fake)
    replicas.append((server, process))
    for number in range(5):  # other objects move the resourceVersion on, not ours
        fake.put(f"{CONFIGMAPS}/unrelated", configmap(f"n: {number}"))
    time.sleep(0.6)  # a bookmark carries the new resourceVersion to the replica
    compacted = fake.compact()
    fake.end_watches()  # the API server ends the stream (its timeout, a restart)
    fake.put(POLICY, configmap(variant(1)))
    wait_for_version(server, version_of(variant(1)))
    watches = fake.made("watch", POLICY)
    assert len(watches) == 2
    resumed = re.search(r"resourceVersion=(\d+)", watches[1].query)
    assert resumed and int(resumed.group(1)) >= compacted, "resumed from before the bookmark"
    assert len(fake.made("list", POLICY)) == 1, "no 410, so no re-list"
    assert counter(server, "outrigger_policy_watch_restarts", 'reason="renewed"') == 1


def test_watches_that_end_at_once_are_not_renewed_in_a_hot_loop(
    tmp_path: Path, fake: FakeKube, replicas: list[tuple[Server, Any]]
) -> None:
    """On the stand-in: the real API server keeps a watch open for the timeoutSeconds asked
    (0 means its own default, 30 to 60 minutes); only a misbehaving server or proxy ends
    every stream at once."""
    fake.max_watch_seconds = 0
    server, process = serve_on_fake(tmp_path, fake)
    replicas.append((server, process))
    time.sleep(3)
    assert 2 <= len(fake.made("watch", POLICY)) <= 5  # about one a second, not thousands
