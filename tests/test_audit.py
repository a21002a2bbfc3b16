"""`outrigger audit`: the classification (pure, on pod lists) and the command end to end.

No Kubernetes API server can run on these machines. The end-to-end tests therefore run the
real `outrigger audit` (the installed entry point, in a subprocess, so that the official
`kubernetes` client does the HTTP) against a local HTTPS server that answers the API's list
and get requests with JSON as the Kubernetes API writes it, paging lists by `limit` and
`continue` the way the API server does; what it verifies is the client's requests and the
command's handling of the answers, not a real API server's behaviour.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import yaml

from tests.conftest import FIXTURES, outrigger_executable
from tests.fake_kube import https_server, send_json, write_kubeconfig
from webhook.core.audit import MISMATCHED, MISSING, STALE, classify, group, workload_of
from webhook.core.injector import RequestContext, inject
from webhook.core.policy import default_policy
from webhook.serving.certs import write_certificates

POLICY = default_policy()
LOG = {"outrigger.dev/inject": "log-watcher"}


def pod(
    name: str,
    annotations: dict[str, str] | None = None,
    owner: tuple[str, str] | None = None,
    namespace: str = "shop",
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "annotations": annotations or {},
    }
    if owner:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": owner[0],
                "name": owner[1],
                "uid": "u",
                "controller": True,
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "containers": [{"name": "app", "image": "registry.example.com/app:1"}],
            "nodeName": "node-1",
        },
        "status": {"phase": "Running"},
    }


def injected(name: str, **kwargs: Any) -> dict[str, Any]:
    """A pod as the webhook injected it, then defaulted by the API server and scheduled."""
    # A copy: the injector's result shares its sidecars with its caches, never to be modified.
    result = copy.deepcopy(
        inject(pod(name, dict(LOG), **kwargs), RequestContext("shop"), POLICY).pod
    )
    for container in result["spec"]["initContainers"]:
        container["terminationMessagePath"] = "/dev/termination-log"
        container["imagePullPolicy"] = "IfNotPresent"
    return result


def stale(name: str, **kwargs: Any) -> dict[str, Any]:
    """Injected under the policy of an earlier release (a golden of that time)."""
    old = yaml.safe_load((FIXTURES / "stale-status.yaml").read_text())["request"]["object"]
    result = copy.deepcopy(old)
    result["metadata"] = {
        **pod(name, **kwargs)["metadata"],
        "annotations": old["metadata"]["annotations"],
    }
    return result


# The classification -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        pytest.param(pod("a", LOG), MISSING, id="missing"),
        pytest.param(
            pod(
                "a",
                {"outrigger.dev/inject": "ambassador", "outrigger.dev/ambassador-upstream": "x:80"},
            ),
            MISSING,
            id="missing-ambassador",
        ),
        pytest.param(injected("a"), None, id="as-injected-with-defaults"),
        pytest.param(stale("a"), STALE, id="stale"),
        pytest.param(
            pod(
                "a",
                {
                    **LOG,
                    "outrigger.dev/status": json.dumps(
                        {"injected": ["log-watcher"], "policy": POLICY.version}
                    ),
                },
            ),
            MISMATCHED,
            id="mismatched",
        ),
        pytest.param(pod("a"), None, id="not-requested"),
        pytest.param(pod("a", {"outrigger.dev/inject": "false"}), None, id="opted-out"),
        pytest.param(pod("a", {"outrigger.dev/inject": "bogus"}), None, id="would-be-denied"),
    ],
)
def test_classify(sent: dict[str, Any], expected: str | None) -> None:
    finding = classify(sent, "shop", POLICY)
    assert (finding.kind if finding else None) == expected


def test_a_tampered_injected_pod_is_mismatched() -> None:
    tampered = injected("a")
    tampered["spec"]["initContainers"][0]["image"] = "cr.fluentbit.io/fluent/fluent-bit:4.1.0"
    finding = classify(tampered, "shop", POLICY)
    assert finding is not None and finding.kind == MISMATCHED


def test_excluded_namespaces_are_not_audited() -> None:
    assert classify(pod("a", LOG, namespace="kube-system"), "kube-system", POLICY) is None


def test_findings_are_grouped_by_workload_with_the_fix() -> None:
    pods = [
        pod("web-1", LOG, owner=("ReplicaSet", "web-5d")),
        pod("web-2", LOG, owner=("ReplicaSet", "web-5d")),
        pod("report-1", LOG, owner=("Job", "report-29")),
        pod("debug", LOG),
        pod("db-0", LOG, owner=("StatefulSet", "db")),
    ]
    parents = {
        ("shop", "ReplicaSet", "web-5d"): ("Deployment", "web"),
        ("shop", "Job", "report-29"): ("CronJob", "report"),
    }
    findings = [f for p in pods if (f := classify(p, "shop", POLICY))]
    owners = {("shop", p["metadata"]["name"]): workload_of(p, "shop", parents) for p in pods}
    fixes = {
        (g.owner_kind, g.owner_name): (len(g.findings), g.fix) for g in group(findings, owners)
    }
    assert fixes == {
        ("CronJob", "report"): (
            1,
            "delete the pods (CronJob report makes new ones): kubectl delete pod -n shop report-1",
        ),
        ("Deployment", "web"): (2, "kubectl rollout restart deployment/web -n shop"),
        ("Pod", "debug"): (
            1,
            "delete the pod and create it again: kubectl delete pod -n shop debug",
        ),
        ("StatefulSet", "db"): (1, "kubectl rollout restart statefulset/db -n shop"),
    }


# End to end, against a local HTTPS server that answers as the API does -----------------------

SELECTOR = {
    "matchExpressions": [
        {"key": "outrigger.dev/injection", "operator": "In", "values": ["enabled"]},
        {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", "kube-public", "outrigger-system"],
        },
    ]
}


def namespace(name: str, enabled: bool) -> dict[str, Any]:
    labels = {"kubernetes.io/metadata.name": name}
    if enabled:
        labels["outrigger.dev/injection"] = "enabled"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def owned(kind: str, name: str, owner: tuple[str, str], namespace: str = "shop") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": owner[0],
                    "name": owner[1],
                    "uid": "u",
                    "controller": True,
                }
            ],
        }
    }


CLUSTER: dict[str, list[dict[str, Any]]] = {
    "/api/v1/namespaces": [
        namespace("shop", True),
        namespace("lab", False),
        namespace("kube-system", False),
    ],
    "/api/v1/pods": [
        pod("web-5d-a", LOG, owner=("ReplicaSet", "web-5d")),
        pod("web-5d-b", LOG, owner=("ReplicaSet", "web-5d")),
        injected("api-7c-a", owner=("ReplicaSet", "api-7c")),
        stale("db-0", owner=("StatefulSet", "db")),
        pod(
            "report-29-x",
            {
                **LOG,
                "outrigger.dev/status": json.dumps(
                    {"injected": ["log-watcher"], "policy": POLICY.version}
                ),
            },
            owner=("Job", "report-29"),
        ),
        pod("debug", LOG),
        pod("lab-1", LOG, namespace="lab"),
        pod("coredns-1", LOG, namespace="kube-system"),
    ],
    "/apis/apps/v1/namespaces/shop/replicasets": [
        owned("ReplicaSet", "web-5d", ("Deployment", "web")),
        owned("ReplicaSet", "api-7c", ("Deployment", "api")),
    ],
    "/apis/batch/v1/namespaces/shop/jobs": [owned("Job", "report-29", ("CronJob", "report"))],
}
OBJECTS: dict[str, dict[str, Any]] = {
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/outrigger": {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "outrigger"},
        "webhooks": [{"name": "inject.outrigger.dev", "namespaceSelector": SELECTOR}],
    },
    "/api/v1/namespaces/outrigger-system/configmaps/outrigger-policy": {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "outrigger-policy", "namespace": "outrigger-system"},
        "data": {
            "policy.yaml": (
                Path(__file__).parent.parent / "webhook" / "core" / "default-policy.yaml"
            ).read_text()
        },
    },
}


class FakeApi(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[tuple[str, dict[str, list[str]]]]


class _Handler(BaseHTTPRequestHandler):
    server: FakeApi

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        params = parse_qs(query)
        self.server.requests.append((path, params))
        if path in OBJECTS:
            return self._send(200, OBJECTS[path])
        items = CLUSTER.get(path)
        if items is None and path.startswith("/api/v1/namespaces/") and path.endswith("/pods"):
            ns = path.split("/")[4]
            items = [p for p in CLUSTER["/api/v1/pods"] if p["metadata"]["namespace"] == ns]
        if items is None and path.startswith("/api/v1/namespaces/"):
            name = path.split("/")[4]
            found = [n for n in CLUSTER["/api/v1/namespaces"] if n["metadata"]["name"] == name]
            if found and path.count("/") == 4:
                return self._send(200, found[0])
        if items is None:
            items = [] if path.endswith(("/replicasets", "/jobs")) else None
        if items is None:
            return self._send(
                404,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "NotFound",
                    "code": 404,
                    "message": f"{path} not found",
                },
            )
        # Paging as the API server does: `limit` items, and a `continue` token while more remain.
        start = int(params.get("continue", ["0"])[0])
        limit = int(params.get("limit", [str(len(items) or 1)])[0])
        page = items[start : start + limit]
        metadata: dict[str, Any] = {"resourceVersion": "4711"}
        if start + limit < len(items):
            metadata["continue"] = str(start + limit)
        self._send(200, {"kind": "List", "apiVersion": "v1", "metadata": metadata, "items": page})

    def _send(self, code: int, body: dict[str, Any]) -> None:
        send_json(self, code, body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeApi, Path]]:
    server = FakeApi(("127.0.0.1", 0), _Handler)
    server.requests = []
    with https_server(tmp_path, server) as (url, ca_file):
        yield server, write_kubeconfig(tmp_path, url, ca_file)


def audit(tmp_path: Path, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(
        [outrigger_executable(), "audit", "--kubeconfig", str(kubeconfig), *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def test_audit_finds_every_class_grouped_by_workload(
    api: tuple[FakeApi, Path], tmp_path: Path
) -> None:
    server, kubeconfig = api
    result = audit(
        tmp_path,
        kubeconfig,
        "--chunk-size",
        "2",
        "-o",
        "json",
        "--from-cluster",
        "outrigger-system/outrigger-policy",
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["policy"] == POLICY.version
    found = {
        (w["namespace"], w["kind"], w["name"]): sorted((p["name"], p["finding"]) for p in w["pods"])
        for w in report["workloads"]
    }
    assert found == {
        ("shop", "Deployment", "web"): [("web-5d-a", "missing"), ("web-5d-b", "missing")],
        ("shop", "StatefulSet", "db"): [("db-0", "stale")],
        ("shop", "CronJob", "report"): [("report-29-x", "mismatched")],
        ("shop", "Pod", "debug"): [("debug", "missing")],
    }  # api-7c-a is as injected; lab is not selected; kube-system never is
    fixes = {w["name"]: w["fix"] for w in report["workloads"]}
    assert fixes["web"] == "kubectl rollout restart deployment/web -n shop"
    # Every list was paged: `limit` on each request, `continue` followed to the end.
    pods = [params for path, params in server.requests if path == "/api/v1/pods"]
    assert [p.get("limit") for p in pods] == [["2"]] * 4
    assert [p.get("continue") for p in pods] == [None, ["2"], ["4"], ["6"]]
    assert all(
        "limit" in params
        for path, params in server.requests
        if path.endswith(("/pods", "/namespaces", "/replicasets", "/jobs"))
    )


def test_audit_prints_a_table_and_one_namespace(api: tuple[FakeApi, Path], tmp_path: Path) -> None:
    _, kubeconfig = api
    result = audit(tmp_path, kubeconfig, "-n", "shop")
    assert result.returncode == 1, result.stderr
    assert "shop  Deployment/web" in result.stdout
    assert "  missing     web-5d-a  should have log-watcher" in result.stdout
    assert "fix: kubectl rollout restart deployment/web -n shop" in result.stdout
    assert "5 pod(s) in 4 workload(s)" in result.stdout


def test_audit_of_a_clean_namespace_exits_0(api: tuple[FakeApi, Path], tmp_path: Path) -> None:
    _, kubeconfig = api
    result = audit(tmp_path, kubeconfig, "-n", "lab")  # not selected by the webhook
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing found" in result.stdout


def test_an_unreachable_cluster_is_a_clear_error(tmp_path: Path) -> None:
    paths = write_certificates(tmp_path / "c", ["localhost"], ["127.0.0.1"])
    kubeconfig = write_kubeconfig(tmp_path, "https://127.0.0.1:1", paths.ca_cert)
    result = audit(tmp_path, kubeconfig)
    assert result.returncode == 2
    assert result.stderr.startswith("outrigger: ") and "Traceback" not in result.stderr
