"""The injected ambassador, run: the real Envoy with the container's exact arguments, as uid
101, its Secret and SDS volumes laid out as the kubelet does, on loopback only.

One Envoy for the module, for a pod whose `ambassador-config` has a plain upstream reached
through DNS (`localhost`), one with retries, path routing to two upstreams, and TLS
origination with a client certificate to a local HTTPS upstream that requires it (a CA made
here). Then the client certificate's Secret is renewed the way the kubelet updates a mounted
Secret, and the next handshake presents the new certificate, with no restart.
"""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.real_envoy import (
    Pki,
    RunningEnvoy,
    ambassadors,
    mounted,
    needs_root,
    run_envoy,
    secret_files,
)
from webhook.core.injector import RequestContext, inject
from webhook.core.policy import Policy, default_policy

pytestmark = needs_root

PLAIN, FLAKY, USERS, ORDERS, BANK = 18001, 18002, 18003, 18004, 18005
HEALTH = "http://127.0.0.1:9902/ready"  # what the kubelet's startupProbe calls


class Upstream(http.server.ThreadingHTTPServer):
    """A local upstream that answers with its name, what it saw, and (TLS) the client's CN."""

    daemon_threads = True

    def __init__(self, name: str, port: int, fail_first: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.name, self.fail_first = name, fail_first
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Upstream

    def do_GET(self) -> None:
        with self.server.lock:
            attempt = self.server.attempts[self.path] = self.server.attempts.get(self.path, 0) + 1
        if attempt <= self.server.fail_first:
            self._answer(503, {"attempt": attempt})
            return
        client = None
        if isinstance(self.connection, ssl.SSLSocket):
            subject = dict(pair[0] for pair in self.connection.getpeercert()["subject"])
            client = subject["commonName"]
        self._answer(
            200,
            {
                "upstream": self.server.name,
                "path": self.path,
                "host": self.headers["Host"],
                "attempt": attempt,
                "client": client,
            },
        )

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")  # every request on a new upstream connection
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


CONFIG = f"""
upstreams:
  plain: {{address: "localhost:{PLAIN}", port: 9001}}
  flaky:
    address: "127.0.0.1:{FLAKY}"
    port: 9002
    retries: {{count: 3, retryOn: [5xx]}}
  users: {{address: "127.0.0.1:{USERS}"}}
  orders: {{address: "127.0.0.1:{ORDERS}"}}
  bank:
    address: "127.0.0.1:{BANK}"
    port: 9003
    tls: {{caSecret: ambassador-bank-ca, clientCertSecret: ambassador-bank-client, sni: bank.test}}
routing:
  port: 9004
  routes:
    - {{pathPrefix: /users, upstream: users}}
    - {{pathPrefix: /orders, upstream: orders}}
"""


def injected_pod(policy: Policy, config: str = CONFIG) -> dict[str, Any]:
    pod = {
        "metadata": {
            "generateName": "web-",
            "annotations": {
                "outrigger.dev/inject": "ambassador",
                "outrigger.dev/ambassador-config": config,
            },
        },
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1"}]},
    }
    result: dict[str, Any] = inject(pod, RequestContext("default"), policy).pod
    return result


def get(port: int, path: str = "/", host: str | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture(scope="module")
def upstreams(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Upstream]]:
    servers = {
        "plain": Upstream("plain", PLAIN),
        "flaky": Upstream("flaky", FLAKY, fail_first=2),
        "users": Upstream("users", USERS),
        "orders": Upstream("orders", ORDERS),
        "bank": Upstream("bank", BANK),
    }
    directory = tmp_path_factory.mktemp("bank")
    certificate, key = pki.issue("bank.test", sans=("bank.test",))
    (directory / "tls.crt").write_bytes(certificate)
    (directory / "tls.key").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "tls.crt", directory / "tls.key")
    context.load_verify_locations(cadata=pki.ca_pem.decode())
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the ambassador must present one
    bank = servers["bank"]
    bank.socket = context.wrap_socket(bank.socket, server_side=True)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers.values()]
    for thread in threads:
        thread.start()
    yield servers
    for server in servers.values():
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def running(
    pki: Pki, upstreams: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningEnvoy, Any]]:
    pod = injected_pod(default_policy())
    (container,) = ambassadors(pod)
    client = secret_files(pki, "ambassador-bank-client")
    log = tmp_path_factory.mktemp("envoy") / "envoy.log"
    with (
        mounted(pod, container, pki, {"ambassador-bank-client": client}) as volumes,
        run_envoy(container, log, HEALTH) as envoy,
    ):
        yield envoy, volumes


def test_the_app_port_is_open_once_the_startup_probe_passes(
    running: tuple[RunningEnvoy, Any],
) -> None:
    """run_envoy returned as soon as /ready on the health port answered: the app's ports are
    already open then (Envoy opens its listeners together once its clusters are ready)."""
    for port in (9001, 9002, 9003, 9004):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_proxies_to_an_upstream_found_through_dns(running: tuple[RunningEnvoy, Any]) -> None:
    status, body = get(9001, "/hello?x=1")
    assert status == 200
    assert body["upstream"] == "plain" and body["path"] == "/hello?x=1"
    assert body["host"] == "localhost"  # auto_host_rewrite: the upstream's name, not 127.0.0.1


def test_routes_by_path_prefix(running: tuple[RunningEnvoy, Any]) -> None:
    assert get(9004, "/users/7")[1]["upstream"] == "users"
    assert get(9004, "/orders?id=3")[1]["upstream"] == "orders"
    assert get(9004, "/other")[0] == 404


def test_retries_a_failing_upstream(
    running: tuple[RunningEnvoy, Any], upstreams: dict[str, Upstream]
) -> None:
    status, body = get(9002, "/pay")
    assert status == 200 and body["attempt"] == 3  # two 503s retried away
    assert upstreams["flaky"].attempts["/pay"] == 3


def test_tls_origination_presents_the_client_certificate(running: tuple[RunningEnvoy, Any]) -> None:
    status, body = get(9003, "/balance")
    assert status == 200
    assert (body["upstream"], body["client"]) == ("bank", "client ambassador-bank-client")


def test_a_renewed_client_certificate_is_used_without_a_restart(
    running: tuple[RunningEnvoy, Any], pki: Pki
) -> None:
    envoy, volumes = running
    certificate, key = pki.issue("client renewed")
    client_volume = volumes["/etc/outrigger/secrets/ambassador-bank-client"]
    client_volume.update({"ca.crt": pki.ca_pem, "tls.crt": certificate, "tls.key": key})
    deadline = time.monotonic() + 10
    while get(9003, "/balance")[1].get("client") != "client renewed":
        assert time.monotonic() < deadline, "the renewed certificate was not picked up"
        time.sleep(0.1)
    assert envoy.process.poll() is None  # the same process: no restart


def test_access_logs_are_json_lines_on_stdout(running: tuple[RunningEnvoy, Any]) -> None:
    get(9001, "/logged")
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in running[0].output().splitlines() if line.startswith("{")]
        logged = [json.loads(line) for line in lines if '"/logged"' in line]
        if logged or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert logged, running[0].output()[-2000:]
    assert logged[0]["response_code"] in (200, "200")
