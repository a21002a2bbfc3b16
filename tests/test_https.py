"""End to end over real HTTPS: `outrigger certs`, then `outrigger serve` as a subprocess.

One server for the whole module. Every client trusts only the CA that `outrigger certs` wrote,
so each request also proves that the chain verifies against that CA for `localhost` and for
127.0.0.1 (the SANs asked for), and that the server presents the certificate it was given.
"""

from __future__ import annotations

import base64
import copy
import os
import resource
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import admission_review, as_pod, outrigger_executable, validate_strict

STARTUP_SECONDS = 30.0
SHUTDOWN_SECONDS = 15.0
UID = "3f0c2a8e-1b7d-4c55-9e61-2b8f0d9a7c11"


@dataclass(frozen=True)
class Server:
    port: int
    cert_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def ip_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def trusting_ca(self) -> ssl.SSLContext:
        """A client context that trusts the generated CA and nothing else."""
        return ssl.create_default_context(cafile=str(self.cert_dir / "ca.crt"))


def _run_certs(out: Path) -> subprocess.CompletedProcess[str]:
    command = [outrigger_executable(), "certs", "--dns", "localhost", "--ip", "127.0.0.1"]
    result = subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_healthy(process: subprocess.Popen[bytes], server: Server) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    last_error: Exception | None = None
    with httpx.Client(verify=server.trusting_ca(), timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(
                    f"outrigger serve exited with {process.returncode} before answering:\n"
                    + server.log.read_text(errors="replace")
                )
            try:
                if client.get(f"{server.url}/healthz").status_code == 200:
                    return
            except httpx.TransportError as error:
                last_error = error
            time.sleep(0.1)
    pytest.fail(
        f"outrigger serve did not answer /healthz within {STARTUP_SECONDS}s "
        f"(last error: {last_error!r}):\n" + server.log.read_text(errors="replace")
    )


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=SHUTDOWN_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=SHUTDOWN_SECONDS)
            pytest.fail(f"outrigger serve ignored SIGTERM for {SHUTDOWN_SECONDS}s")
    return process.returncode


def start_server(
    root: Path, *extra: str, open_files: tuple[int, int] | None = None
) -> tuple[Server, subprocess.Popen[bytes]]:
    """`outrigger certs` into root/certs, then `outrigger serve` with them (and `extra`
    arguments), until healthy; `open_files`: the (soft, hard) RLIMIT_NOFILE it starts with."""
    cert_dir = root / "certs"
    _run_certs(cert_dir)
    server = Server(port=_free_port(), cert_dir=cert_dir, log=root / "serve.log")
    command = [outrigger_executable(), "serve", "--host", "127.0.0.1"]
    command += ["--port", str(server.port), "--cert-dir", str(cert_dir), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with server.log.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=None if open_files is None else _limit_open_files(open_files),
        )
    try:
        _wait_until_healthy(process, server)
    except BaseException:
        _stop(process)
        raise
    return server, process


def _limit_open_files(limits: tuple[int, int]) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def stop_server(server: Server, process: subprocess.Popen[bytes]) -> None:
    """Stop a `start_server` process, which must have written no traceback."""
    _stop(process)
    output = server.log.read_text(errors="replace")
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server, process = start_server(tmp_path_factory.mktemp("https"))
    try:
        yield server
    finally:
        returncode = _stop(process)
    output = server.log.read_text(errors="replace")
    assert "Traceback" not in output, output
    # A clean shutdown: exit 0, or the SIGTERM re-raised by uvicorn after its graceful stop.
    assert returncode in (0, -signal.SIGTERM), output
    # The certificates were there, so serve must not have generated (or overwritten) any.
    assert "generated a development CA" not in output, output


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA, also for localhost/127.0.0.1, made the same way."""
    out = tmp_path_factory.mktemp("other-ca")
    _run_certs(out)
    return out / "ca.crt"


@pytest.fixture()
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, verify=server.trusting_ca(), timeout=10.0) as c:
        yield c


# Pods and reviews -----------------------------------------------------------------------------

INJECT_BOTH = {
    "outrigger.dev/inject": "log-watcher,ambassador",
    "outrigger.dev/ambassador-upstream": "external-service:80",
}


def pod(annotations: dict[str, str] | None = None, **metadata: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "web", "namespace": "default", **metadata}
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [
                {
                    "name": "main-app",
                    "image": "registry.example.com/main-app:1.4.2",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                }
            ]
        },
    }


def post_review(client: httpx.Client, review: dict[str, Any]) -> dict[str, Any]:
    """POST a review that must be well-formed; checks the envelope and returns `response`."""
    reply = client.post(
        "/mutate", content=orjson.dumps(review), headers={"content-type": "application/json"}
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    answer = reply.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response: dict[str, Any] = answer["response"]
    assert response["uid"] == review["request"]["uid"]
    return response


def assert_allowed_unpatched(response: dict[str, Any]) -> None:
    assert response["allowed"] is True, response
    assert "patch" not in response, response
    assert "patchType" not in response, response


def applied(response: dict[str, Any], sent: dict[str, Any]) -> dict[str, Any]:
    assert response["allowed"] is True, response
    assert response["patchType"] == "JSONPatch"
    operations = orjson.loads(base64.b64decode(response["patch"], validate=True))
    assert isinstance(operations, list) and operations
    result: dict[str, Any] = jsonpatch.apply_patch(sent, operations)
    return result


# Health -------------------------------------------------------------------------------------


@pytest.mark.skipif(
    os.environ.get("OUTRIGGER_COMPILE") == "0", reason="OUTRIGGER_COMPILE=0: pure Python asked for"
)
def test_the_server_runs_the_compiled_hot_path(client: httpx.Client, server: Server) -> None:
    assert client.get("/healthz").status_code == 200
    assert "; hot path compiled" in server.log.read_text(errors="replace")


@pytest.mark.parametrize(("path", "status"), [("/healthz", "ok"), ("/readyz", "ready")])
def test_health_endpoints(client: httpx.Client, path: str, status: str) -> None:
    reply = client.get(path)
    assert reply.status_code == 200
    assert reply.json() == {"status": status}


def test_mutate_only_accepts_post(client: httpx.Client) -> None:
    assert client.get("/mutate").status_code == 405


# Injection ----------------------------------------------------------------------------------


def test_annotated_pod_is_injected(client: httpx.Client) -> None:
    sent = pod(INJECT_BOTH)
    original = copy.deepcopy(sent)
    response = post_review(client, admission_review(sent, uid=UID))
    assert response["uid"] == UID
    result = applied(response, sent)
    assert sent == original, "jsonpatch.apply_patch must not have changed the sent pod"

    spec = result["spec"]
    assert [c["name"] for c in spec["containers"]] == ["main-app"]
    assert [c["name"] for c in spec["initContainers"]] == ["log-watcher", "ambassador"]
    assert [v["name"] for v in spec["volumes"]] == [
        "shared-logs",
        "log-watcher-state",
        "log-watcher-config",
    ]
    assert "emptyDir" in spec["volumes"][0]
    app = spec["containers"][0]
    assert {"name": "shared-logs", "mountPath": "/var/log/app"} in app["volumeMounts"]
    watcher = spec["initContainers"][0]
    assert any(
        m["name"] == "shared-logs" and m["mountPath"] == "/var/log/app"
        for m in watcher["volumeMounts"]
    )
    annotations = result["metadata"]["annotations"]
    assert orjson.loads(annotations["outrigger.dev/status"])["injected"] == [
        "log-watcher",
        "ambassador",
    ]
    assert {k: annotations[k] for k in INJECT_BOTH} == INJECT_BOTH
    validate_strict(as_pod(result))


def test_pod_with_generate_name_is_injected(client: httpx.Client) -> None:
    """Pods made by controllers have no name yet, only generateName."""
    sent = pod({"outrigger.dev/inject": "log-watcher"})
    del sent["metadata"]["name"]
    sent["metadata"]["generateName"] = "web-7d9c5b-"
    result = applied(post_review(client, admission_review(sent)), sent)
    assert [c["name"] for c in result["spec"]["initContainers"]] == ["log-watcher"]
    assert result["metadata"]["generateName"] == "web-7d9c5b-"
    assert "name" not in result["metadata"]
    validate_strict(as_pod(result))


def test_pod_without_annotations_is_not_patched(client: httpx.Client) -> None:
    sent = pod()
    del sent["metadata"]["name"]
    sent["metadata"]["generateName"] = "web-"
    assert "annotations" not in sent["metadata"]
    assert_allowed_unpatched(post_review(client, admission_review(sent)))


def test_reinvocation_of_injected_pod_is_not_patched(client: httpx.Client) -> None:
    first = pod(INJECT_BOTH)
    injected = applied(post_review(client, admission_review(first)), first)
    assert "outrigger.dev/status" in injected["metadata"]["annotations"]
    # reinvocationPolicy: IfNeeded sends the already-mutated pod back.
    assert_allowed_unpatched(post_review(client, admission_review(injected)))


def test_a_forged_status_annotation_exempts_nothing(client: httpx.Client) -> None:
    """Only what a pod holds counts: a status without the sidecars it claims is injected over."""
    sent = pod({**INJECT_BOTH, "outrigger.dev/status": '{"injected":["log-watcher"]}'})
    result = applied(post_review(client, admission_review(sent)), sent)
    assert [c["name"] for c in result["spec"]["initContainers"]] == ["log-watcher", "ambassador"]
    assert_allowed_unpatched(post_review(client, admission_review(result)))


def test_invalid_annotation_is_denied(client: httpx.Client) -> None:
    sent = pod({"outrigger.dev/inject": "bogus"})
    response = post_review(client, admission_review(sent, uid=UID))
    assert response["allowed"] is False
    assert "patch" not in response
    assert response["status"]["code"] == 400
    message = response["status"]["message"]
    assert "outrigger.dev/inject" in message
    assert "log-watcher" in message
    assert "bogus" in message


# Requests that are not pod creations ----------------------------------------------------------


def _delete() -> dict[str, Any]:
    review = admission_review(None, operation="DELETE")
    review["request"]["oldObject"] = pod(INJECT_BOTH)
    return review


def _update() -> dict[str, Any]:
    review = admission_review(pod(INJECT_BOTH), operation="UPDATE")
    review["request"]["oldObject"] = pod(INJECT_BOTH)
    return review


def _deployment() -> dict[str, Any]:
    template = pod(INJECT_BOTH)
    del template["apiVersion"], template["kind"]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template},
    }
    review = admission_review(
        deployment, kind={"group": "apps", "version": "v1", "kind": "Deployment"}
    )
    review["request"]["resource"] = {"group": "apps", "version": "v1", "resource": "deployments"}
    return review


@pytest.mark.parametrize(
    "review",
    [
        pytest.param(_delete(), id="delete"),
        pytest.param(_update(), id="update"),
        pytest.param(_deployment(), id="deployment"),
        pytest.param(admission_review(pod(INJECT_BOTH), sub_resource="status"), id="subresource"),
        pytest.param(admission_review(pod(INJECT_BOTH), namespace="kube-system"), id="kube-system"),
        pytest.param(admission_review(pod(INJECT_BOTH), namespace="kube-public"), id="kube-public"),
    ],
)
def test_not_a_pod_creation_is_allowed_unpatched(
    client: httpx.Client, review: dict[str, Any]
) -> None:
    assert_allowed_unpatched(post_review(client, review))


# Bodies that are not AdmissionReviews ---------------------------------------------------------


def _review_without(*path: str) -> bytes:
    review = admission_review(pod(INJECT_BOTH))
    node: dict[str, Any] = review
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return orjson.dumps(review)


def _wrong_api_version() -> bytes:
    review = admission_review(pod(INJECT_BOTH))
    review["apiVersion"] = "admission.k8s.io/v1beta1"
    return orjson.dumps(review)


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        pytest.param(b"{not json", "JSON", id="not-json"),
        pytest.param(b"", "JSON", id="empty"),
        pytest.param(orjson.dumps([admission_review(pod())]), "object", id="json-array"),
        pytest.param(_wrong_api_version(), "apiVersion", id="wrong-api-version"),
        pytest.param(_review_without("request"), "request", id="missing-request"),
        pytest.param(_review_without("request", "uid"), "uid", id="missing-uid"),
    ],
)
def test_bad_body_is_a_400_with_json_error(
    client: httpx.Client, body: bytes, mentions: str
) -> None:
    reply = client.post("/mutate", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert isinstance(error, str) and mentions in error
    assert "Traceback" not in reply.text
    assert 'File "' not in reply.text


def test_body_over_8_mib_is_refused(client: httpx.Client) -> None:
    reply = client.post("/mutate", content=b" " * (8 * 1024 * 1024 + 1))
    assert reply.status_code == 413
    assert "error" in reply.json()


def test_chunked_body_over_8_mib_is_refused(client: httpx.Client) -> None:
    """A chunked body declares no length: the limit is enforced while reading it."""
    reply = client.post("/mutate", content=(b" " * 2**20 for _ in range(9)))
    assert reply.status_code == 413


# TLS ----------------------------------------------------------------------------------------


def test_keep_alive_connection_serves_many_requests(server: Server) -> None:
    """Many requests, one TLS connection: the client's local address never changes."""
    client_addresses: set[tuple[str, int] | None] = set()
    with httpx.Client(base_url=server.url, verify=server.trusting_ca(), timeout=10.0) as client:
        for number in range(12):
            review = admission_review(pod(INJECT_BOTH), uid=f"{UID[:-2]}{number:02d}")
            response = post_review(client, review)
            assert response["allowed"] is True and response["patchType"] == "JSONPatch"
            reply = client.get("/healthz")
            assert reply.status_code == 200
            stream = reply.extensions["network_stream"]
            client_addresses.add(stream.get_extra_info("client_addr"))
    (address,) = client_addresses
    assert address is not None and address[0] == "127.0.0.1" and address[1] > 0


def test_server_presents_the_generated_certificate(server: Server) -> None:
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        server.trusting_ca().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        presented = tls.getpeercert(binary_form=True)
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    generated = x509.load_pem_x509_certificate((server.cert_dir / "tls.crt").read_bytes())
    assert presented == generated.public_bytes(serialization.Encoding.DER)


def test_ip_address_san_verifies(server: Server) -> None:
    with httpx.Client(verify=server.trusting_ca(), timeout=10.0) as client:
        assert client.get(f"{server.ip_url}/healthz").status_code == 200


def test_wrong_hostname_fails_verification(server: Server) -> None:
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname"),
    ):
        server.trusting_ca().wrap_socket(raw, server_hostname="not-localhost.example")


def test_client_trusting_another_ca_fails(server: Server, other_ca: Path) -> None:
    assert other_ca.read_bytes() != (server.cert_dir / "ca.crt").read_bytes()
    context = ssl.create_default_context(cafile=str(other_ca))
    with (
        httpx.Client(verify=context, timeout=10.0) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.get(f"{server.url}/healthz")


def _legacy_client(server: Server, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    """A client trusting the CA that is able to offer protocols up to `maximum`.

    OpenSSL 3 disables TLS 1.0/1.1 at the default security level, so without lowering it the
    client itself would fail (NO_CIPHERS_AVAILABLE) and prove nothing about the server.
    """
    context = server.trusting_ca()
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = maximum
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _handshake(context: ssl.SSLContext, port: int) -> str | None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.version()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_client_is_refused(server: Server) -> None:
    # Control: the same permissive client settings do connect when TLS 1.2 is allowed.
    assert _handshake(_legacy_client(server, ssl.TLSVersion.TLSv1_2), server.port) == "TLSv1.2"
    with pytest.raises(ssl.SSLError) as refused:
        _handshake(_legacy_client(server, ssl.TLSVersion.TLSv1_1), server.port)
    # Refused by the server (alert or hang-up), not by this client's own configuration.
    assert refused.value.reason not in ("NO_CIPHERS_AVAILABLE", "NO_PROTOCOLS_AVAILABLE")


def test_plain_http_is_not_served(server: Server) -> None:
    with httpx.Client(timeout=10.0) as client:
        try:
            reply = client.get(f"http://127.0.0.1:{server.port}/healthz")
        except httpx.TransportError:
            return
    assert reply.status_code != 200
