"""`outrigger serve --policy-configmap`: the policy watched through the API.

The watch's decisions are tested pure (`from_list`, `from_event`). End to end, the real
`outrigger serve` runs in subprocesses against `tests/fake_kube.py`, a local HTTPS stand-in for
the API server (no API server runs on these machines): it answers the list with a
resourceVersion, streams watch events over chunked HTTP/1.1, one JSON object per line, sends
BOOKMARK events when asked, ends streams on request, and answers a watch from a compacted
resourceVersion with an ERROR event carrying a 410 Expired Status, as the API server does
after etcd compaction. It is not a real API server. Which policy a replica serves is read the
way an operator reads it: `outrigger_policy_info{version}` on its `/metrics`.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_kube import FakeKube, fake_kube, write_kubeconfig
from tests.test_https import Server, _stop, start_server
from tests.test_reload import BAD_FIELD, DEFAULT_TEXT, INVALID_SCHEMA, variant
from webhook.cluster.policywatch import Step, from_event, from_list
from webhook.core.policy import load_policy_text

NAMESPACE = "outrigger-system"
CONFIGMAPS = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
POLICY = f"{CONFIGMAPS}/outrigger-policy"
# What the chart's Role grants for the watch, and nothing more.
RBAC = {("list", POLICY), ("watch", POLICY)}
APPLY_SECONDS = 2.0  # what the issue asks: a valid change in force within a second or two


def version_of(text: str) -> str:
    return load_policy_text(text, "test").version


def configmap(text: str, key: str = "policy.yaml") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "outrigger-policy", "namespace": NAMESPACE},
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


# End to end -------------------------------------------------------------------------------


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[FakeKube]:
    with fake_kube(tmp_path) as api:
        api.put(POLICY, configmap(DEFAULT_TEXT))
        api.allow = set(RBAC)
        yield api


def serve_watching(root: Path, kube: FakeKube, name: str, *extra: str) -> tuple[Server, Any]:
    directory = root / name
    directory.mkdir()
    kubeconfig = write_kubeconfig(directory, kube.url, kube.ca_file)
    return start_server(
        directory,
        "--policy-configmap", f"{NAMESPACE}/outrigger-policy",
        "--kubeconfig", str(kubeconfig), *extra,
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


def counter(server: Server, name: str, label: str) -> float:
    match = re.search(rf"^{name}_total\{{{label}\}} (\S+)$", metrics(server), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for_version(server: Server, version: str, seconds: float) -> float:
    """Seconds until `server` serves `version`; fails after `seconds`."""
    start = time.monotonic()
    while served_version(server) != version:
        assert time.monotonic() - start < seconds, server.log.read_text()
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_change_applies_on_every_replica_within_two_seconds(
    tmp_path: Path, kube: FakeKube, replicas: list[tuple[Server, Any]]
) -> None:
    replicas += [serve_watching(tmp_path, kube, "a"), serve_watching(tmp_path, kube, "b")]
    for server, _ in replicas:
        assert served_version(server) == version_of(DEFAULT_TEXT)
    for number in (1, 2, 3):
        kube.put(POLICY, configmap(variant(number)))
        wanted = version_of(variant(number))
        delays = [wait_for_version(server, wanted, APPLY_SECONDS) for server, _ in replicas]
        assert max(delays) < APPLY_SECONDS, delays
    watches = kube.made("watch", POLICY)
    assert len(watches) == 2  # one stream each carried all three changes
    for request in watches:
        assert "allowWatchBookmarks=true" in request.query
        assert "fieldSelector=metadata.name%3Doutrigger-policy" in request.query
    assert all(r.code != 403 for r in kube.requests)  # the Role's list and watch were enough
    for server, _ in replicas:
        assert counter(server, "outrigger_policy_reloads", 'result="success"') == 3


def test_a_bad_version_is_rejected_counted_and_the_old_one_serves(
    tmp_path: Path, kube: FakeKube, replicas: list[tuple[Server, Any]]
) -> None:
    server, process = serve_watching(tmp_path, kube, "a")
    replicas.append((server, process))
    kube.put(POLICY, configmap(INVALID_SCHEMA))
    deadline = time.monotonic() + APPLY_SECONDS
    while counter(server, "outrigger_policy_reloads", 'result="failure"') < 1:
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.02)
    assert served_version(server) == version_of(DEFAULT_TEXT)
    log = server.log.read_text()
    assert "rejected a new version of ConfigMap outrigger-system/outrigger-policy" in log
    assert BAD_FIELD in log
    kube.put(POLICY, configmap(variant(1)))
    wait_for_version(server, version_of(variant(1)), APPLY_SECONDS)


def test_bookmarks_keep_a_renewed_watch_from_expiring(
    tmp_path: Path, kube: FakeKube, replicas: list[tuple[Server, Any]]
) -> None:
    kube.bookmark_seconds = 0.2
    server, process = serve_watching(tmp_path, kube, "a")
    replicas.append((server, process))
    for number in range(5):  # other objects move the resourceVersion on, not ours
        kube.put(f"{CONFIGMAPS}/unrelated", configmap(f"n: {number}"))
    time.sleep(0.6)  # a bookmark carries the new resourceVersion to the replica
    compacted = kube.compact()
    kube.end_watches()  # the API server ends the stream (its timeout, a restart)
    kube.put(POLICY, configmap(variant(1)))
    wait_for_version(server, version_of(variant(1)), APPLY_SECONDS)
    watches = kube.made("watch", POLICY)
    assert len(watches) == 2
    resumed = int(re.search(r"resourceVersion=(\d+)", watches[1].query).group(1))  # type: ignore[union-attr]
    assert resumed >= compacted, "the watch resumed from the bookmark, not from before"
    assert len(kube.made("list", POLICY)) == 1, "no 410, so no re-list"
    assert counter(server, "outrigger_policy_watch_restarts", 'reason="renewed"') == 1


def test_a_410_gone_forces_a_relist_that_finds_the_change(
    tmp_path: Path, kube: FakeKube, replicas: list[tuple[Server, Any]]
) -> None:
    kube.bookmark_seconds = None  # nothing moves the replica's resourceVersion on
    server, process = serve_watching(tmp_path, kube, "a")
    replicas.append((server, process))
    kube.pause_watches(True)
    kube.end_watches()
    kube.put(POLICY, configmap(variant(2)))  # while no watch is open...
    kube.compact()  # ...and then compacted away: a watch from before cannot see it
    kube.pause_watches(False)
    wait_for_version(server, version_of(variant(2)), APPLY_SECONDS + 1)
    assert len(kube.made("list", POLICY)) == 2
    assert counter(server, "outrigger_policy_watch_restarts", 'reason="relisted"') == 1
    assert "the watch expired" in server.log.read_text()


def test_watches_that_end_at_once_are_not_renewed_in_a_hot_loop(
    tmp_path: Path, kube: FakeKube, replicas: list[tuple[Server, Any]]
) -> None:
    kube.max_watch_seconds = 0  # a misbehaving server (or proxy) that ends every stream
    server, process = serve_watching(tmp_path, kube, "a")
    replicas.append((server, process))
    time.sleep(3)
    assert 2 <= len(kube.made("watch", POLICY)) <= 5  # about one a second, not thousands


def test_a_deleted_configmap_keeps_the_policy_and_a_new_one_applies(
    tmp_path: Path, kube: FakeKube, replicas: list[tuple[Server, Any]]
) -> None:
    server, process = serve_watching(tmp_path, kube, "a")
    replicas.append((server, process))
    kube.delete(POLICY)
    deadline = time.monotonic() + APPLY_SECONDS
    while "the ConfigMap was deleted" not in server.log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert served_version(server) == version_of(DEFAULT_TEXT)
    kube.put(POLICY, configmap(variant(1)))
    wait_for_version(server, version_of(variant(1)), APPLY_SECONDS)


def test_shutdown_does_not_wait_for_the_open_watch(
    tmp_path: Path, kube: FakeKube, replicas: list[tuple[Server, Any]]
) -> None:
    server, process = serve_watching(tmp_path, kube, "a")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 5
    assert "Traceback" not in server.log.read_text()


def _serve_fails(tmp_path: Path, kube: FakeKube, *extra: str) -> tuple[int, str]:
    """`outrigger serve --policy-configmap` expected to fail before serving."""
    import subprocess

    from tests.conftest import outrigger_executable

    kubeconfig = write_kubeconfig(tmp_path, kube.url, kube.ca_file)
    command = [outrigger_executable(), "serve", "--cert-dir", str(tmp_path / "certs")]
    command += ["--policy-configmap", f"{NAMESPACE}/outrigger-policy"]
    command += ["--kubeconfig", str(kubeconfig), "--api-startup-seconds", "1", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr.strip()


def test_a_missing_configmap_fails_the_start_naming_it(tmp_path: Path, kube: FakeKube) -> None:
    kube.delete(POLICY)
    code, line = _serve_fails(tmp_path, kube)
    assert code == 1
    assert line.splitlines()[-1] == (
        "outrigger: ConfigMap outrigger-system/outrigger-policy (policy.yaml): ConfigMap "
        "outrigger-policy does not exist (gave up after 1s, --api-startup-seconds)"
    )


def test_a_forbidden_watch_fails_the_start_with_the_status(tmp_path: Path, kube: FakeKube) -> None:
    kube.allow = set()
    code, line = _serve_fails(tmp_path, kube)
    assert code == 1
    assert "cannot list the ConfigMap: 403 Forbidden" in line


def test_a_bad_first_version_fails_the_start_like_a_bad_file(
    tmp_path: Path, kube: FakeKube
) -> None:
    kube.put(POLICY, configmap(INVALID_SCHEMA))
    code, line = _serve_fails(tmp_path, kube)
    assert code == 2
    first, *details = line.splitlines()
    assert first.startswith("outrigger: ")
    assert "ConfigMap outrigger-system/outrigger-policy" in first
    assert any(BAD_FIELD in detail for detail in details)
