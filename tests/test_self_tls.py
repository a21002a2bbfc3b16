"""`outrigger serve --tls-source self` end to end, against a stand-in for the API server.

No Kubernetes API server runs on these machines. `tests/fake_kube.py` is a local HTTPS server
that stores objects and answers the webhook's calls the way the API server does (resource
versions, 404 NotFound, 409 AlreadyExists and Conflict, JSON patches, 403 for anything the
chart's Role does not grant); it is not a real API server. The webhook runs for real: the
installed `outrigger serve`, in subprocesses, talking through the official `kubernetes`
client. The test's HTTPS client plays the API server calling the webhook: before each call it
reads the caBundle from the stored MutatingWebhookConfiguration and trusts only that, and it
names the Service's DNS name in SNI, as the API server does.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import admission_review, outrigger_executable
from tests.fake_kube import FakeKube, fake_kube, write_kubeconfig
from webhook.cluster.registration import webhook_configuration

NAMESPACE = "outrigger-system"
SERVICE_DNS = f"outrigger.{NAMESPACE}.svc"
SECRETS = f"/api/v1/namespaces/{NAMESPACE}/secrets"
SECRET = f"{SECRETS}/outrigger-self-tls"  # the CLI's default, as the chart names it
WEBHOOK = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/outrigger"
# What the chart's Role and ClusterRole grant, and nothing more.
RBAC = {
    ("get", SECRET),
    ("update", SECRET),
    ("create", SECRETS),
    ("get", WEBHOOK),
    ("patch", WEBHOOK),
}
STARTUP_SECONDS = 40.0


@dataclass
class Replica:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[FakeKube]:
    with fake_kube(tmp_path) as api:
        configuration = webhook_configuration(namespace=NAMESPACE, ca_bundle="unused")
        del configuration["webhooks"][0]["clientConfig"]["caBundle"]  # as the chart renders it
        api.put(WEBHOOK, configuration)
        api.allow = set(RBAC)
        yield api


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start(root: Path, kube: FakeKube, name: str, *extra: str) -> Replica:
    """One `outrigger serve --tls-source self` replica, not yet waited for."""
    directory = root / name
    directory.mkdir()
    kubeconfig = write_kubeconfig(directory, kube.url, kube.ca_file)
    port = _free_port()
    command = [outrigger_executable(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--cert-dir", str(directory / "tls"), "--policy-poll-seconds", "0.2"]
    command += ["--tls-source", "self", "--kubeconfig", str(kubeconfig)]
    command += ["--self-tls-namespace", NAMESPACE, "--self-tls-sync-seconds", "0.5", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "POD_"))}
    log = directory / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    return Replica(port, process, log)


def stop(replica: Replica) -> None:
    if replica.process.poll() is None:
        replica.process.send_signal(signal.SIGTERM)
        try:
            replica.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()
    assert "Traceback" not in replica.output(), replica.output()


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for replica in started:
        stop(replica)


def published_ca(kube: FakeKube) -> bytes:
    """The PEM CA bundle the API server would trust: the stored webhook's caBundle."""
    configuration = kube.get(WEBHOOK)
    assert configuration is not None
    value = configuration["webhooks"][0]["clientConfig"].get("caBundle", "")
    return base64.b64decode(value)


def trusting(ca_pem: bytes) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca_pem.decode())


def served_certificate(replica: Replica, kube: FakeKube) -> bytes:
    """The DER certificate the replica presents to a client that trusts the caBundle."""
    context = trusting(published_ca(kube))
    with (
        socket.create_connection(("127.0.0.1", replica.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=SERVICE_DNS) as tls,
    ):
        certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def review(replica: Replica, kube: FakeKube, client: httpx.Client | None = None) -> dict[str, Any]:
    """One AdmissionReview through a fresh connection (or `client`), as the API server sends."""
    body = admission_review({"metadata": {"name": "web", "namespace": "shop"}, "spec": {
        "containers": [{"name": "app", "image": "nginx"}]}})  # fmt: skip
    url = f"https://127.0.0.1:{replica.port}/mutate"
    extensions = {"sni_hostname": SERVICE_DNS}
    if client is not None:
        response = client.post(url, json=body, extensions=extensions)
    else:
        with httpx.Client(verify=trusting(published_ca(kube)), timeout=5) as fresh:
            response = fresh.post(url, json=body, extensions=extensions)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def wait_serving(replica: Replica, kube: FakeKube) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if replica.process.poll() is not None:
            pytest.fail(f"serve exited with {replica.process.returncode}:\n{replica.output()}")
        try:
            if review(replica, kube)["response"]["allowed"]:
                return
        except (httpx.HTTPError, ssl.SSLError, OSError, ValueError):
            time.sleep(0.2)
    pytest.fail(f"serve did not answer within {STARTUP_SECONDS}s:\n{replica.output()}")


def stored_secret_data(kube: FakeKube) -> dict[str, bytes]:
    secret = kube.get(SECRET)
    assert secret is not None
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def der_of(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def test_two_replicas_racing_agree_on_one_secret(
    tmp_path: Path, kube: FakeKube, replicas: list[Replica]
) -> None:
    # Both replicas' first reads of the Secret are held until both have arrived: both see
    # 404, both create, and the API server lets one create win.
    kube.hold("get", SECRET, 2)
    replicas += [start(tmp_path, kube, "a"), start(tmp_path, kube, "b")]
    for replica in replicas:
        wait_serving(replica, kube)

    creates = kube.made("create", SECRETS)
    assert sorted(r.code for r in creates) == [201, 409]
    assert len([r for r in kube.requests if r.verb == "update" and r.path == SECRET]) == 0
    data = stored_secret_data(kube)
    assert set(data) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    secret = kube.get(SECRET)
    assert secret is not None and secret["type"] == "kubernetes.io/tls"
    # One CA published, one certificate served by both, the one in the Secret.
    assert published_ca(kube) == data["ca.crt"]
    served = {served_certificate(replica, kube) for replica in replicas}
    assert served == {der_of(data["tls.crt"])}
    # The chart's RBAC was enough: nothing was refused, nothing else was asked for.
    assert all(r.code != 403 for r in kube.requests), [
        (r.verb, r.path) for r in kube.requests if r.code == 403
    ]
    # The loser says so, and the key is in no log line.
    outputs = [replica.output() for replica in replicas]
    assert sum("another replica wrote Secret" in output for output in outputs) == 1
    assert all(data["tls.key"].decode().splitlines()[1] not in output for output in outputs)


def _hammer(replica: Replica, kube: FakeKube, seconds: float) -> tuple[int, list[str], set[bytes]]:
    """Reviews for `seconds`: fresh connections on one thread, one keep-alive client on
    another. Returns (answered, failures, certificates seen on the fresh connections)."""
    failures: list[str] = []
    seen: set[bytes] = set()
    answered = [0, 0]
    deadline = time.monotonic() + seconds

    def fresh() -> None:
        while time.monotonic() < deadline:
            try:
                seen.add(hashlib.sha256(served_certificate(replica, kube)).digest())
                assert review(replica, kube)["response"]["allowed"]
                answered[0] += 1
            except Exception as error:  # every failure is counted and shown
                failures.append(f"fresh: {type(error).__name__}: {error}")
            time.sleep(0.02)

    def kept_alive() -> None:
        # Trust is fixed at connect time, as for an established API server connection.
        with httpx.Client(verify=trusting(published_ca(kube)), timeout=5) as client:
            while time.monotonic() < deadline:
                try:
                    assert review(replica, kube, client)["response"]["allowed"]
                    answered[1] += 1
                except Exception as error:
                    failures.append(f"keep-alive: {type(error).__name__}: {error}")
                time.sleep(0.02)

    threads = [threading.Thread(target=fresh), threading.Thread(target=kept_alive)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(answered), failures, seen


def _rotating(
    root: Path, kube: FakeKube, replicas: list[Replica], lifetimes: tuple[str, str, str]
) -> tuple[Replica, bytes, set[bytes]]:
    """A replica with short (certificate, renew-before, CA) lifetimes and a 1 s CA overlap,
    under reviews for 10 s that must all succeed. Returns it, the CA published first, and the
    certificates seen."""
    cert, renew, ca = lifetimes
    replica = start(
        root, kube, "a",
        "--self-tls-cert-validity", cert, "--self-tls-renew-before", renew,
        "--self-tls-ca-validity", ca, "--self-tls-ca-overlap", "1s",
    )  # fmt: skip
    replicas.append(replica)
    wait_serving(replica, kube)
    first_ca = published_ca(kube)
    answered, failures, seen = _hammer(replica, kube, 10.0)
    assert failures == [], failures[:5]
    assert answered > 50
    return replica, first_ca, seen


def test_renewal_while_serving_drops_nothing(
    tmp_path: Path, kube: FakeKube, replicas: list[Replica]
) -> None:
    # Certificates of 6 s renewed when 4 s remain: a renewal every 2 s or so.
    replica, first_ca, seen = _rotating(tmp_path, kube, replicas, ("6s", "4s", "1h"))
    assert len(seen) >= 3, "the served certificate was renewed at least twice"
    assert len([r for r in kube.made("update", SECRET) if r.code == 200]) >= 2
    assert published_ca(kube) == first_ca  # renewals keep the CA: no caBundle change
    assert "serving certificate reloaded" in replica.output()


def test_ca_rotation_while_serving_drops_nothing(
    tmp_path: Path, kube: FakeKube, replicas: list[Replica]
) -> None:
    # CAs of 13 s, replaced when 6 s remain; certificates of 4 s renewed when 2 s remain.
    replica, first_ca, _ = _rotating(tmp_path, kube, replicas, ("4s", "2s", "13s"))
    final_ca = published_ca(kube)
    assert final_ca != first_ca
    # The served certificate now chains to a CA that the first bundle did not hold.
    newest = final_ca.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    assert newest not in first_ca
    only_newest = ssl.create_default_context(cadata=newest.decode())
    with (
        socket.create_connection(("127.0.0.1", replica.port), timeout=5) as raw,
        only_newest.wrap_socket(raw, server_hostname=SERVICE_DNS),
    ):
        pass
    assert "new-ca" in replica.output()


def test_a_deleted_secret_is_written_back_unchanged(
    tmp_path: Path, kube: FakeKube, replicas: list[Replica]
) -> None:
    replica = start(tmp_path, kube, "a")
    replicas.append(replica)
    wait_serving(replica, kube)
    before = stored_secret_data(kube)
    kube.delete(SECRET)
    deadline = time.monotonic() + 15
    while kube.get(SECRET) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stored_secret_data(kube) == before
    assert served_certificate(replica, kube) == der_of(before["tls.crt"])
    assert (
        "restored"
        in (kube.get(SECRET) or {})["metadata"]["annotations"]["outrigger.dev/tls-reason"]
    )


@pytest.mark.parametrize(
    "data",
    [["not", "a", "map"], {"tls.crt": "bm90IGEgY2VydA==", "tls.key": "!!"}, {}],
    ids=["data-a-list", "garbage", "empty"],
)
def test_a_spoiled_secret_at_start_is_replaced(
    tmp_path: Path, kube: FakeKube, replicas: list[Replica], data: Any
) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": "outrigger-self-tls", "namespace": NAMESPACE},
        "data": data,
    }
    kube.put(SECRET, secret)  # fmt: skip
    replica = start(tmp_path, kube, "a")
    replicas.append(replica)
    wait_serving(replica, kube)
    assert [r.code for r in kube.made("update", SECRET)] == [200]
    assert set(stored_secret_data(kube)) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    reason = (kube.get(SECRET) or {})["metadata"]["annotations"]["outrigger.dev/tls-reason"]
    assert "(stored: " in reason


def test_a_missing_webhook_configuration_is_published_once_it_exists(
    tmp_path: Path, kube: FakeKube, replicas: list[Replica]
) -> None:
    configuration = kube.get(WEBHOOK)
    assert configuration is not None
    kube.delete(WEBHOOK)
    # Syncs every minute, but an unpublished round is retried within 5 s.
    replica = start(tmp_path, kube, "a", "--self-tls-sync-seconds", "60")
    replicas.append(replica)
    deadline = time.monotonic() + STARTUP_SECONDS
    while "does not exist; not published" not in replica.output():
        assert time.monotonic() < deadline, replica.output()
        time.sleep(0.1)
    kube.put(WEBHOOK, configuration)  # e.g. applied by Helm just after the Deployment
    published_at = time.monotonic()
    wait_serving(replica, kube)
    assert time.monotonic() - published_at < 15
    assert published_ca(kube) == stored_secret_data(kube)["ca.crt"]


def _failed_start(replica: Replica) -> str:
    assert replica.process.wait(timeout=60) == 1
    output = replica.output()
    assert "Traceback" not in output, output
    return output.strip().splitlines()[-1]


def test_an_unreachable_api_server_fails_the_start_with_a_message(
    tmp_path: Path, kube: FakeKube
) -> None:
    kube.url = f"https://127.0.0.1:{_free_port()}"  # nothing listens there
    replica = start(tmp_path, kube, "a", "--api-startup-seconds", "2")
    line = _failed_start(replica)
    assert line.startswith("outrigger: cannot read Secret outrigger-system/outrigger-self-tls")
    assert "API server unreachable" in line and "gave up after 2s" in line


def test_a_role_without_create_fails_the_start_naming_it(tmp_path: Path, kube: FakeKube) -> None:
    kube.allow = RBAC - {("create", SECRETS)}
    replica = start(tmp_path, kube, "a", "--api-startup-seconds", "1")
    line = _failed_start(replica)
    assert "cannot create Secret outrigger-system/outrigger-self-tls: 403 Forbidden" in line


def test_self_mode_options_are_checked(tmp_path: Path, kube: FakeKube) -> None:
    replica = start(tmp_path, kube, "a", "--self-tls-renew-before", "91d")
    assert replica.process.wait(timeout=60) == 2
    assert "renewal window" in replica.output()
    assert "Traceback" not in replica.output()
