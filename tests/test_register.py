"""`outrigger register` against a stand-in for the API server.

No Kubernetes API server can run here. These tests therefore run the real `outrigger register`
(the installed entry point, in a subprocess, so the official `kubernetes` client does the HTTP)
against a local HTTPS endpoint that records every request the client sends and answers the way
the API server would, from a script per test: Status objects for 404/403/409, the stored object
with a resourceVersion for GET, the body echoed back with a new resourceVersion for POST/PUT.
It is a small `http.server` with TLS on 127.0.0.1, whose certificate comes from
`webhook.serving.certs.write_certificates`; the kubeconfig written to tmp_path points at it,
with that CA as `certificate-authority-data` and a bearer token. So what is verified is the
client's wire traffic (paths, verbs, headers, bodies) and the CLI's handling of the answers,
not the behaviour of a real API server (admission of the object, conflict detection, RBAC):
the builder's output is checked against the Kubernetes 1.31 OpenAPI schema separately, with
kubernetes_validate.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import outrigger_executable, validate_strict
from tests.fake_kube import TOKEN, https_server, send_json, write_kubeconfig
from tests.fake_kube import status as api_status
from webhook.cluster.registration import webhook_configuration
from webhook.serving.certs import write_certificates

NAMESPACE = "outrigger-system"
COLLECTION = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
OBJECT = f"{COLLECTION}/outrigger"
ECHO = "echo"  # script entry: answer with the request body, as stored by the API server


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeApiServer:
    """Answers each request with the next (status, body) of `script`; records the requests."""

    url: str
    ca_file: Path
    script: list[tuple[int, Any]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A meta/v1 Status about the configuration, as the API server sends with an error."""
    details = {
        "name": "outrigger",
        "group": "admissionregistration.k8s.io",
        "kind": "mutatingwebhookconfigurations",
    }
    return {**api_status(code, reason, message), "details": details}


NOT_FOUND = status(
    404,
    "NotFound",
    'mutatingwebhookconfigurations.admissionregistration.k8s.io "outrigger" not found',
)
CONFLICT = status(
    409,
    "Conflict",
    "Operation cannot be fulfilled on mutatingwebhookconfigurations.admissionregistration.k8s.io "
    '"outrigger": the object has been modified; please apply your changes to the latest version '
    "and try again",
)
FORBIDDEN = status(
    403,
    "Forbidden",
    'mutatingwebhookconfigurations.admissionregistration.k8s.io "outrigger" is forbidden: User '
    '"system:serviceaccount:default:deployer" cannot get resource "mutatingwebhookconfigurations"'
    ' in API group "admissionregistration.k8s.io" at the cluster scope',
)


def stored(obj: dict[str, Any], resource_version: str) -> dict[str, Any]:
    """`obj` as the API server returns it once stored."""
    metadata = {
        **obj["metadata"],
        "resourceVersion": resource_version,
        "uid": "6d1f0b9e-2f4a-4f57-9d7e-3c1c1a0f0b42",
        "generation": 1,
        "creationTimestamp": "2025-01-01T00:00:00Z",
    }
    return {**obj, "metadata": metadata}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds a client may stay silent on a connection

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        body: Any = json.loads(raw) if raw else None
        api = self.server.api
        headers = {key.lower(): value for key, value in self.headers.items()}
        api.requests.append(Request(self.command, path, query, headers, body))
        if api.script:
            code, answer = api.script.pop(0)
        else:
            code, answer = 500, status(500, "InternalError", "test script exhausted")
        if answer == ECHO:
            answer = stored(body, str(41 + len(api.requests)))  # "43" after two requests
        send_json(self, code, answer)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: FakeApiServer


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[FakeApiServer]:
    server = _Server(("127.0.0.1", 0), _Handler)
    with https_server(tmp_path, server) as (url, ca_file):
        server.api = FakeApiServer(url, ca_file)
        yield server.api


@pytest.fixture
def webhook_ca(tmp_path: Path) -> Path:
    """The CA the webhook's serving certificate chains to: what goes into caBundle."""
    return write_certificates(
        tmp_path / "webhook-certs", ["outrigger.outrigger-system.svc"], []
    ).ca_cert


def register(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`outrigger register` in a subprocess that can find no other cluster credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HTTP", "http"))}
    env["HOME"] = str(tmp_path / "home")
    return subprocess.run(
        [outrigger_executable(), "register", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=False,
    )


def register_against(
    tmp_path: Path, api: FakeApiServer, ca_file: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    kubeconfig = write_kubeconfig(tmp_path, api.url, api.ca_file)
    return register(
        tmp_path,
        "--namespace",
        NAMESPACE,
        "--ca-file",
        str(ca_file),
        "--kubeconfig",
        str(kubeconfig),
        *args,
    )


def expected(ca_file: Path, **options: Any) -> dict[str, Any]:
    bundle = base64.b64encode(ca_file.read_bytes()).decode()
    return webhook_configuration(namespace=NAMESPACE, ca_bundle=bundle, **options)


def assert_clean_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outrigger: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


def test_creates_when_absent(tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path) -> None:
    api_server.script = [(404, NOT_FOUND), (201, ECHO)]
    result = register_against(tmp_path, api_server, webhook_ca)
    assert result.returncode == 0, result.stderr
    assert [(r.method, r.path) for r in api_server.requests] == [
        ("GET", OBJECT),
        ("POST", COLLECTION),
    ]
    create = api_server.requests[1]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in api_server.requests)
    assert create.headers["content-type"] == "application/json"
    assert create.query == "fieldManager=outrigger"
    assert create.body == expected(webhook_ca)
    assert "resourceVersion" not in create.body["metadata"]
    assert "mutatingwebhookconfiguration/outrigger created" in result.stdout
    assert "resourceVersion 43" in result.stdout


def test_replaces_keeping_resource_version(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    old_ca = write_certificates(tmp_path / "old-certs", ["old.example"], []).ca_cert
    api_server.script = [
        (200, stored(expected(old_ca, failure_policy="Ignore"), "42")),
        (200, ECHO),
    ]
    result = register_against(
        tmp_path, api_server, webhook_ca, "--timeout-seconds", "10", "--injection-mode", "opt-out"
    )
    assert result.returncode == 0, result.stderr
    assert [(r.method, r.path) for r in api_server.requests] == [("GET", OBJECT), ("PUT", OBJECT)]
    replace = api_server.requests[1]
    assert replace.headers["authorization"] == f"Bearer {TOKEN}"
    assert replace.headers["content-type"] == "application/json"
    assert replace.body["metadata"]["resourceVersion"] == "42"
    new = expected(webhook_ca, timeout_seconds=10, injection_mode="opt-out")
    new["metadata"]["resourceVersion"] = "42"
    assert replace.body == new
    bundle = replace.body["webhooks"][0]["clientConfig"]["caBundle"]
    assert base64.b64decode(bundle) == webhook_ca.read_bytes() != old_ca.read_bytes()
    assert "mutatingwebhookconfiguration/outrigger replaced" in result.stdout
    assert "resourceVersion 42 -> 43" in result.stdout


HELM_METADATA = {
    "labels": {"app.kubernetes.io/managed-by": "Helm"},
    "annotations": {
        "meta.helm.sh/release-name": "outrigger",
        "meta.helm.sh/release-namespace": NAMESPACE,
        "cert-manager.io/inject-ca-from": "outrigger-system/outrigger-serving",
    },
}


def managed(ca_file: Path, **metadata: Any) -> dict[str, Any]:
    existing = expected(ca_file)
    existing["metadata"].update(metadata)
    return stored(existing, "7")


def test_refuses_to_replace_a_helm_release_s_configuration(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    """What a real install showed: replacing the chart's object breaks the release."""
    api_server.script = [(200, managed(webhook_ca, **HELM_METADATA))]
    result = register_against(tmp_path, api_server, webhook_ca, "--failure-policy", "Ignore")
    assert_clean_failure(
        result,
        "mutatingwebhookconfiguration outrigger is managed by Helm release "
        "outrigger-system/outrigger: helm upgrade outrigger CHART -n outrigger-system "
        "--reuse-values --set failurePolicy=Ignore --set timeoutSeconds=5 "
        "--set injection.mode=opt-in; --force would replace it anyway",
    )
    assert [r.method for r in api_server.requests] == ["GET"]  # nothing written


@pytest.mark.parametrize(
    ("metadata", "who"),
    [
        ({"labels": {"kustomize.toolkit.fluxcd.io/name": "webhooks",
                     "kustomize.toolkit.fluxcd.io/namespace": "flux-system"}},
         "Flux Kustomization flux-system/webhooks"),
        ({"labels": {"helm.toolkit.fluxcd.io/name": "outrigger",
                     "helm.toolkit.fluxcd.io/namespace": "platform"}},
         "Flux HelmRelease platform/outrigger"),
        ({"annotations": {"argocd.argoproj.io/tracking-id":
                          "platform:admissionregistration.k8s.io/MutatingWebhookConfiguration:/outrigger"}},
         "Argo CD application platform"),
        ({"managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1"},
                            {"manager": "outrigger", "operation": "Apply", "apiVersion": "v1"}]},
         "server-side apply (kubectl)"),
    ],
    ids=["flux-kustomization", "flux-helmrelease", "argo-cd", "server-side-apply"],
)  # fmt: skip
def test_refuses_what_another_tool_manages(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path, metadata: Any, who: str
) -> None:
    api_server.script = [(200, managed(webhook_ca, **metadata))]
    result = register_against(tmp_path, api_server, webhook_ca)
    assert_clean_failure(result, f"is managed by {who}: ", "--force would replace it anyway")
    assert [r.method for r in api_server.requests] == ["GET"]


def test_its_own_and_other_update_managers_are_not_foreign(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    """outrigger's own writes and plain updates (cert-manager's cainjector patching the
    caBundle, kubectl edit) do not make a configuration someone else's."""
    fields = [
        {"manager": "outrigger", "operation": "Update", "apiVersion": "v1"},
        {"manager": "outrigger", "operation": "Apply", "apiVersion": "v1"},
        {"manager": "cainjector", "operation": "Update", "apiVersion": "v1"},
    ]
    api_server.script = [(200, managed(webhook_ca, managedFields=fields)), (200, ECHO)]
    result = register_against(tmp_path, api_server, webhook_ca)
    assert result.returncode == 0, result.stderr
    assert [r.method for r in api_server.requests] == ["GET", "PUT"]


def test_force_replaces_keeping_helm_and_cert_manager_metadata(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    existing = managed(webhook_ca, **HELM_METADATA)
    api_server.script = [(200, existing), (200, ECHO)]
    result = register_against(tmp_path, api_server, webhook_ca, "--force")
    assert result.returncode == 0, result.stderr
    metadata = api_server.requests[1].body["metadata"]
    assert metadata["labels"] == {
        "app.kubernetes.io/managed-by": "Helm",
        **expected(webhook_ca)["metadata"]["labels"],
    }
    assert metadata["annotations"] == HELM_METADATA["annotations"]


def unregister(tmp_path: Path, api: FakeApiServer, *args: str) -> subprocess.CompletedProcess[str]:
    kubeconfig = write_kubeconfig(tmp_path, api.url, api.ca_file)
    return register(tmp_path, "--namespace", NAMESPACE, "--kubeconfig", str(kubeconfig),
                    "--delete", *args)  # fmt: skip


def test_delete_removes_its_own_configuration_with_preconditions(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    ours = stored(expected(webhook_ca), "42")
    success = {"kind": "Status", "apiVersion": "v1", "status": "Success"}
    api_server.script = [(200, ours), (200, success)]
    result = unregister(tmp_path, api_server)  # no CA needed to delete
    assert result.returncode == 0, result.stderr
    calls = [(r.method, r.path) for r in api_server.requests]
    assert calls == [("GET", OBJECT), ("DELETE", OBJECT)]
    assert api_server.requests[1].body["preconditions"] == {
        "uid": ours["metadata"]["uid"], "resourceVersion": "42",
    }  # fmt: skip
    assert result.stdout == (
        "mutatingwebhookconfiguration/outrigger deleted (was resourceVersion 42)\n"
    )


def test_delete_of_nothing_says_so(tmp_path: Path, api_server: FakeApiServer) -> None:
    api_server.script = [(404, NOT_FOUND)]
    result = unregister(tmp_path, api_server)
    assert result.returncode == 0, result.stderr
    assert "does not exist: nothing to delete" in result.stdout


def test_delete_refuses_a_helm_release_s_configuration_unless_forced(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    api_server.script = [(200, managed(webhook_ca, **HELM_METADATA))]
    result = unregister(tmp_path, api_server)
    assert_clean_failure(result, "managed by Helm release outrigger-system/outrigger",
                         "helm uninstall", "--force would delete it anyway")  # fmt: skip
    assert [r.method for r in api_server.requests] == ["GET"]
    success = {"kind": "Status", "apiVersion": "v1", "status": "Success"}
    api_server.script = [(200, managed(webhook_ca, **HELM_METADATA)), (200, success)]
    assert unregister(tmp_path, api_server, "--force").returncode == 0
    assert [r.method for r in api_server.requests] == ["GET", "GET", "DELETE"]


def test_delete_after_a_concurrent_change_reads_again(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    changed = status(409, "Conflict", "Precondition failed: ResourceVersion in precondition")
    success = {"kind": "Status", "apiVersion": "v1", "status": "Success"}
    api_server.script = [
        (200, stored(expected(webhook_ca), "42")),
        (409, changed),
        (200, stored(expected(webhook_ca), "43")),
        (200, success),
    ]
    result = unregister(tmp_path, api_server)
    assert result.returncode == 0, result.stderr
    assert api_server.requests[3].body["preconditions"]["resourceVersion"] == "43"


def test_conflict_is_retried_with_the_fresh_resource_version(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    existing = expected(webhook_ca)
    api_server.script = [
        (200, stored(existing, "42")),
        (409, CONFLICT),
        (200, stored(existing, "44")),
        (200, ECHO),
    ]
    result = register_against(tmp_path, api_server, webhook_ca)
    assert result.returncode == 0, result.stderr
    assert [r.method for r in api_server.requests] == ["GET", "PUT", "GET", "PUT"]
    assert api_server.requests[1].body["metadata"]["resourceVersion"] == "42"
    assert api_server.requests[3].body["metadata"]["resourceVersion"] == "44"
    assert "after 1 conflict" in result.stdout


def test_create_that_loses_a_race_replaces(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    exists = status(
        409, "AlreadyExists", 'mutatingwebhookconfigurations "outrigger" already exists'
    )
    api_server.script = [
        (404, NOT_FOUND),
        (409, exists),
        (200, stored(expected(webhook_ca), "50")),
        (200, ECHO),
    ]
    result = register_against(tmp_path, api_server, webhook_ca)
    assert result.returncode == 0, result.stderr
    assert [r.method for r in api_server.requests] == ["GET", "POST", "GET", "PUT"]
    assert api_server.requests[3].body["metadata"]["resourceVersion"] == "50"


def test_endless_conflicts_give_up(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    existing = stored(expected(webhook_ca), "42")
    api_server.script = [(200, existing), (409, CONFLICT)] * 5
    result = register_against(tmp_path, api_server, webhook_ca)
    assert_clean_failure(result, "conflicting after 5 attempts")
    assert len(api_server.requests) == 10


def test_forbidden(tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path) -> None:
    api_server.script = [(403, FORBIDDEN)]
    result = register_against(tmp_path, api_server, webhook_ca)
    assert_clean_failure(result, "403", "is forbidden", "system:serviceaccount:default:deployer")
    assert [r.method for r in api_server.requests] == ["GET"]


def test_unreachable_api_server(tmp_path: Path, webhook_ca: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ca = write_certificates(tmp_path / "unused", ["localhost"], []).ca_cert
    kubeconfig = write_kubeconfig(tmp_path, f"https://127.0.0.1:{port}", ca)
    result = register(
        tmp_path,
        "--namespace",
        NAMESPACE,
        "--ca-file",
        str(webhook_ca),
        "--kubeconfig",
        str(kubeconfig),
    )
    assert_clean_failure(result, "cannot reach the API server")


def test_untrusted_api_server_certificate(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    kubeconfig = write_kubeconfig(tmp_path, api_server.url, webhook_ca)  # the wrong CA
    result = register(
        tmp_path,
        "--namespace",
        NAMESPACE,
        "--ca-file",
        str(webhook_ca),
        "--kubeconfig",
        str(kubeconfig),
    )
    assert_clean_failure(result, "cannot reach the API server", "CERTIFICATE_VERIFY_FAILED")
    assert api_server.requests == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read CA file"),
        (b"not a certificate\n", "holds no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "no PEM certificate"),
    ],
)
def test_bad_ca_file(
    tmp_path: Path, api_server: FakeApiServer, content: bytes | None, message: str
) -> None:
    ca_file = tmp_path / "ca.crt"
    if content is not None:
        ca_file.write_bytes(content)
    result = register_against(tmp_path, api_server, ca_file)
    assert_clean_failure(result, message)
    assert api_server.requests == []


def test_ca_bundle_option(tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path) -> None:
    bundle = base64.b64encode(webhook_ca.read_bytes()).decode()
    api_server.script = [(404, NOT_FOUND), (201, ECHO)]
    kubeconfig = write_kubeconfig(tmp_path, api_server.url, api_server.ca_file)
    result = register(
        tmp_path, "--namespace", NAMESPACE, "--ca-bundle", bundle, "--kubeconfig", str(kubeconfig)
    )
    assert result.returncode == 0, result.stderr
    assert api_server.requests[1].body == expected(webhook_ca)
    bad = register(tmp_path, "--namespace", NAMESPACE, "--ca-bundle", "%%%", "--dry-run")
    assert_clean_failure(bad, "not valid base64")


def test_dry_run_prints_valid_yaml_and_contacts_nothing(
    tmp_path: Path, api_server: FakeApiServer, webhook_ca: Path
) -> None:
    result = register_against(
        tmp_path, api_server, webhook_ca, "--dry-run", "--failure-policy", "Ignore"
    )
    assert result.returncode == 0, result.stderr
    assert api_server.requests == []
    document = yaml.safe_load(result.stdout)
    validate_strict(document)
    assert document == expected(webhook_ca, failure_policy="Ignore")


def test_options_are_checked(tmp_path: Path, webhook_ca: Path) -> None:
    for args in (
        ["--timeout-seconds", "0"],
        ["--timeout-seconds", "31"],
        ["--failure-policy", "Maybe"],
        ["--injection-mode", "everywhere"],
    ):
        result = register(
            tmp_path, "--namespace", NAMESPACE, "--ca-file", str(webhook_ca), "--dry-run", *args
        )
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr
    result = register(tmp_path, "--namespace", "Bad_NS", "--ca-file", str(webhook_ca), "--dry-run")
    assert_clean_failure(result, "invalid namespace")


@pytest.mark.parametrize(
    ("mode", "selector"),
    [
        ("opt-in", {"key": "outrigger.dev/injection", "operator": "In", "values": ["enabled"]}),
        (
            "opt-out",
            {"key": "outrigger.dev/injection", "operator": "NotIn", "values": ["disabled"]},
        ),
    ],
)
def test_builder(mode: str, selector: dict[str, Any]) -> None:
    obj = webhook_configuration(
        namespace="hooks", ca_bundle=base64.b64encode(b"pem").decode(), injection_mode=mode
    )
    validate_strict(obj)
    assert obj["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert obj["kind"] == "MutatingWebhookConfiguration"
    assert obj["metadata"] == {
        "name": "outrigger",
        "labels": {"app.kubernetes.io/name": "outrigger"},
    }
    [webhook] = obj["webhooks"]
    assert webhook["name"] == "inject.outrigger.dev"
    assert webhook["namespaceSelector"]["matchExpressions"] == [
        selector,
        {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", "kube-public", "hooks"],
        },
    ]
    assert webhook["clientConfig"]["service"] == {
        "name": "outrigger",
        "namespace": "hooks",
        "path": "/mutate",
        "port": 443,
    }
    # Nothing a pod's creator can write skips the call (a required sidecar would be skipped).
    assert "objectSelector" not in webhook and "matchConditions" not in webhook
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["timeoutSeconds"] == 5
    assert webhook["sideEffects"] == "None"
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["matchPolicy"] == "Equivalent"


def test_builder_rejects_what_the_api_server_would() -> None:
    for options in (
        {"timeout_seconds": 31},
        {"timeout_seconds": 0},
        {"failure_policy": "Retry"},
        {"injection_mode": "all"},
        {"name": "Outrigger"},
        {"service": "1svc"},
    ):
        with pytest.raises(ValueError):
            webhook_configuration(namespace="hooks", ca_bundle="cGVt", **options)
